"""The flywheel's services: the logic behind the thin tasks in `workers/tasks.py`.

An iteration moves OPEN -> GENERATING -> TRAINING -> DONE:

1. `open_iteration` refuses problems with no tests, records the problem set and
   size in `Iteration.params`, and starts generation in batches (or, while no
   reward model exists, a warm-start reward training first).
2. `generate_batch` stores a batch's candidates; each problem then gets one
   `execute_problem` (all its candidates in one sandbox batch), then one
   `label_problem`: scores by the iteration's reward model and hard-negative labels.
3. `advance_iteration` is the one state-machine step. Everything calls it after
   its own work; it looks only at the store, so calling it twice is harmless.

Every service only flushes; follow-ups go through `enqueue_after_commit`, so the
caller's commit is what releases them. Idempotence comes from the store: unique
keys with ON CONFLICT DO NOTHING, and "already done?" checks taken under a lock
on the iteration row.
"""

import logging
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from app.settings import get_settings
from models import (
    Candidate,
    DatasetVersion,
    Execution,
    HardNegativeLabel,
    Iteration,
    ModelVersion,
    Problem,
    Score,
    TrainingRun,
)
from models.base import utcnow
from models.enums import (
    IterationStatus,
    ModelKind,
    ModelStatus,
    Origin,
    RunKind,
    RunStatus,
    Verdict,
)
from models.repository import content_hash, dialect_insert, insert_candidates, insert_executions
from workers.after_commit import enqueue_after_commit
from workers.celery_app import celery

log = logging.getLogger(__name__)

SANDBOX_ATTEMPTS = 3
"""Runs of a candidate that keeps ending in SANDBOX_ERROR before it is recorded as such."""
MAX_RUN_FAILURES = 3
"""Failed trainings of one kind per iteration before the flywheel stops retrying it."""


class RunLost(RuntimeError):
    """A training finished after reconcile had given its run up (no heartbeat):
    its result is dropped, since a replacement run may already be training."""


class ProblemsWithoutTests(ValueError):
    def __init__(self, problem_ids: list[int]):
        super().__init__(f"problems without tests cannot be judged: ids {problem_ids}")
        self.problem_ids = problem_ids


@dataclass(frozen=True)
class FlywheelParams:
    """The size and knobs of one iteration, stored on its row so a resume uses the same."""

    backend: str = field(
        default="transformers", metadata={"help": "Generation backend: transformers or mutation."}
    )
    candidates: int = field(default=8, metadata={"help": "Candidates sampled per problem."})
    batch_size: int = field(default=2, metadata={"help": "Problems per generation task."})
    max_new_tokens: int = field(default=128, metadata={"help": "Token cap per sample."})
    prompt_style: str = field(
        default="auto",
        metadata={"help": "Prompt format of generation and of the policy update on it."},
    )
    reward_epochs: int = field(default=1, metadata={"help": "Epochs of each reward training."})
    policy_steps: int = field(
        # One step: on the 2-core default machine each PPO step of the bundled
        # model costs minutes, and two made the default run miss 20 minutes.
        default=1,
        metadata={"help": "PPO steps of the policy update; 0 skips the update."},
    )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FlywheelParams":
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


# --- small store helpers -------------------------------------------------------


def _send(session: Session, task_name: str, *args: Any) -> None:
    """Send task `task_name` (routed by its name) once `session` commits."""
    enqueue_after_commit(session, celery.signature(task_name, args=args))


def lock_iteration(session: Session, iteration_id: int) -> Iteration:
    """Take the iteration's row lock and return it freshly read.

    A no-op UPDATE rather than SELECT ... FOR UPDATE: it locks the row on
    Postgres and takes the database write lock on SQLite, which ignores FOR UPDATE.
    """
    session.execute(
        update(Iteration).where(Iteration.id == iteration_id).values(status=Iteration.status)
    )
    iteration = session.get(Iteration, iteration_id, populate_existing=True)
    if iteration is None:
        raise LookupError(f"no iteration {iteration_id}")
    return iteration


def current_model(session: Session, kind: ModelKind) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion)
        .where(ModelVersion.kind == kind, ModelVersion.status == ModelStatus.READY)
        .order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())
        .limit(1)
    ).first()


def _generator_version(session: Session) -> ModelVersion:
    """The current generator, registering the configured base model the first time."""
    version = current_model(session, ModelKind.GENERATOR)
    if version is None:
        spec = get_settings().generator_model
        version = ModelVersion(kind=ModelKind.GENERATOR, name="base", base_model=spec, path=None)
        session.add(version)
        session.flush()
    return version


def _runs(session: Session, iteration_id: int, kind: RunKind) -> list[TrainingRun]:
    return list(
        session.scalars(
            select(TrainingRun)
            .where(TrainingRun.iteration_id == iteration_id, TrainingRun.kind == kind)
            .order_by(TrainingRun.id)
        )
    )


# --- 1. open ---------------------------------------------------------------------


def open_iteration(session: Session, problem_ids: list[int], params: FlywheelParams) -> Iteration:
    """Open the next iteration over `problem_ids` and start it."""
    problems = session.scalars(select(Problem).where(Problem.id.in_(problem_ids))).all()
    missing = sorted(set(problem_ids) - {p.id for p in problems})
    if missing:
        raise LookupError(f"no problems with ids {missing}")
    untested = sorted(p.id for p in problems if not p.has_tests)
    if untested:
        raise ProblemsWithoutTests(untested)
    number = (session.scalar(select(func.max(Iteration.number))) or 0) + 1
    iteration = Iteration(
        number=number,
        status=IterationStatus.OPEN,
        generator_version_id=_generator_version(session).id,
        params={**asdict(params), "problem_ids": sorted(problem_ids), "generated": []},
    )
    session.add(iteration)
    session.flush()
    advance_iteration(session, iteration.id)
    return iteration


def _start_generation(session: Session, iteration: Iteration, reward: ModelVersion) -> None:
    iteration.status = IterationStatus.GENERATING
    iteration.reward_model_version_id = reward.id
    for batch in _batches(iteration, iteration.params["problem_ids"]):
        _send(session, "generation.generate_batch", iteration.id, batch)


def _batches(iteration: Iteration, problem_ids: list[int]) -> list[list[int]]:
    size = FlywheelParams.from_dict(iteration.params).batch_size
    return [problem_ids[i : i + size] for i in range(0, len(problem_ids), size)]


# --- 2. generate, execute, label -------------------------------------------------


# One at a time: a new policy version replaces the last, and a vLLM engine holds
# its share of the GPU until it is dropped.
@lru_cache(maxsize=1)
def _generator(
    backend: str, model: str, seed: int, max_new_tokens: int, prompt_style: str = "auto"
):
    """One generator per worker process and configuration: loading a model is slow."""
    from pipelines.generation import GenerationConfig, make_generator

    return make_generator(
        GenerationConfig(
            backend=backend,
            model=model,
            seed=seed,
            max_new_tokens=max_new_tokens,
            prompt_style=prompt_style,
        )
    )


def generate_batch(session: Session, iteration_id: int, problem_ids: list[int]) -> list[int]:
    """Store the iteration's candidates for these problems, once. Returns the problems
    to execute (all of the batch: executing is itself idempotent)."""
    from pipelines.generation import PromptSpec

    iteration = session.get(Iteration, iteration_id)
    todo = [p for p in problem_ids if p not in iteration.params["generated"]]
    if not todo:
        return problem_ids
    params = FlywheelParams.from_dict(iteration.params)
    problems = session.scalars(
        select(Problem).where(Problem.id.in_(todo)).order_by(Problem.id)
    ).all()
    version = session.get(ModelVersion, iteration.generator_version_id)
    generator = _generator(
        params.backend,
        version.path or version.base_model,
        iteration.number,
        params.max_new_tokens,
        params.prompt_style,
    )
    # Generate before taking the lock: the lock is held only for the write.
    samples = generator.generate([PromptSpec.from_problem(p) for p in problems], params.candidates)
    iteration = lock_iteration(session, iteration_id)
    generated = set(iteration.params["generated"])
    origin = Origin.MUTATION if params.backend == "mutation" else Origin.GENERATOR
    rows = [
        {
            "problem_id": problem.id,
            "code": sample.code,
            "origin": origin,
            "iteration_id": iteration_id,
            "generator_version_id": version.id,
            "num_tokens": sample.num_tokens,
        }
        for problem, problem_samples in zip(problems, samples, strict=True)
        if problem.id not in generated  # a concurrent copy of this task got here first
        for sample in problem_samples
    ]
    insert_candidates(session, rows)
    iteration.params = {**iteration.params, "generated": sorted(generated | set(todo))}
    return problem_ids


def execute_problem(session: Session, iteration_id: int, problem_id: int) -> int:
    """Run the problem's unexecuted candidates of this iteration; returns executions written."""
    problem = session.get(Problem, problem_id)
    candidates = session.scalars(
        select(Candidate)
        .outerjoin(Execution, Execution.candidate_id == Candidate.id)
        .where(
            Candidate.iteration_id == iteration_id,
            Candidate.problem_id == problem_id,
            Execution.id.is_(None),
        )
        .order_by(Candidate.id)
    ).all()
    if not candidates:
        return 0
    results = run_with_retries([c.code for c in candidates], problem)
    return insert_executions(
        session,
        [
            execution_row(candidate.id, result, attempts)
            for candidate, (result, attempts) in zip(candidates, results, strict=True)
        ],
    )


def execution_row(candidate_id: int, result: Any, attempts: int) -> dict[str, Any]:
    """An `executions` row from a sandbox `ExecutionResult`."""
    return {
        "candidate_id": candidate_id,
        "verdict": result.verdict,
        "passed": result.passed,
        "total": result.total,
        "duration_ms": result.duration_ms,
        "peak_memory_kb": result.peak_memory_kb,
        "stdout_tail": result.stdout_tail,
        "stderr_tail": result.stderr_tail,
        "attempts": attempts,
        "tampered": result.tampered,
        "tamper_reason": result.tamper_reason,
    }


def run_with_retries(codes: list[str], problem: Problem) -> list[tuple[Any, int]]:
    """Sandbox results with the attempts each took: SANDBOX_ERROR (the sandbox failed,
    not the program) is retried up to SANDBOX_ATTEMPTS runs, then kept as it is."""
    from pipelines.sandbox import Job, run_batch

    def job(code: str) -> Job:
        return Job(
            language=str(problem.language),
            code=code,
            tests=problem.tests,
            io_cases=problem.io_cases,
        )

    outcome: list[tuple[Any, int]] = [(result, 1) for result in run_batch([job(c) for c in codes])]
    for attempt in range(2, SANDBOX_ATTEMPTS + 1):
        again = [
            i for i, (result, _) in enumerate(outcome) if result.verdict == Verdict.SANDBOX_ERROR
        ]
        if not again:
            break
        for i, result in zip(again, run_batch([job(codes[i]) for i in again]), strict=True):
            outcome[i] = (result, attempt)
    return outcome


@lru_cache(maxsize=2)
def _scorer(path_or_spec: str):
    from pipelines.reward_model import RewardScorer

    return RewardScorer(path_or_spec)


def label_problem(session: Session, iteration_id: int, problem_id: int) -> int:
    """Score the problem's executed candidates with the iteration's reward model and
    label the hard negatives; returns labels written. SANDBOX_ERROR is never judged."""
    from pipelines.mining import MiningPolicy, ScoredCandidate, mine_hard_negatives

    iteration = session.get(Iteration, iteration_id)
    reward = session.get(ModelVersion, iteration.reward_model_version_id)
    problem = session.get(Problem, problem_id)
    if _unexecuted(session, iteration_id, problem_id):
        # Mining compares a candidate with its problem's others: labelling before
        # they all have verdicts would make the labels depend on timing.
        return 0
    rows = session.execute(
        select(Candidate.id, Candidate.code, Execution.verdict, Score.score)
        .join(Execution, Execution.candidate_id == Candidate.id)
        .outerjoin(
            Score,
            and_(Score.candidate_id == Candidate.id, Score.reward_model_version_id == reward.id),
        )
        .where(
            Candidate.iteration_id == iteration_id,
            Candidate.problem_id == problem_id,
            Execution.verdict != Verdict.SANDBOX_ERROR,
        )
        .order_by(Candidate.id)
    ).all()
    scores = {cid: score for cid, _, _, score in rows if score is not None}
    unscored = [(cid, code) for cid, code, _, score in rows if score is None]
    if unscored:
        values = _scorer(reward.path or reward.base_model).score(
            [problem.prompt] * len(unscored), [code for _, code in unscored]
        )
        new = [
            {"candidate_id": cid, "reward_model_version_id": reward.id, "score": float(value)}
            for (cid, _), value in zip(unscored, values, strict=True)
        ]
        session.execute(dialect_insert(session, Score).on_conflict_do_nothing(), new)
        scores.update({row["candidate_id"]: row["score"] for row in new})
    scored = [
        ScoredCandidate(cid, problem_id, verdict == Verdict.OK, scores[cid])
        for cid, _, verdict, _ in rows
    ]
    labels = [
        {
            "candidate_id": candidate_id,
            "reward_model_version_id": reward.id,
            "iteration_id": iteration_id,
            "rule": rule,
        }
        for candidate_id, rule in mine_hard_negatives(scored, MiningPolicy())
    ]
    if not labels:
        return 0
    written = session.execute(
        dialect_insert(session, HardNegativeLabel)
        .on_conflict_do_nothing(index_elements=["candidate_id", "reward_model_version_id"])
        .returning(HardNegativeLabel.id),
        labels,
    )
    return len(written.all())


def _unexecuted(session: Session, iteration_id: int, problem_id: int) -> int:
    return session.scalar(
        select(func.count())
        .select_from(Candidate)
        .outerjoin(Execution)
        .where(
            Candidate.iteration_id == iteration_id,
            Candidate.problem_id == problem_id,
            Execution.id.is_(None),
        )
    )


def maybe_trigger_retraining(session: Session, iteration_id: int) -> TrainingRun | None:
    """Enqueue one reward retraining once the current reward model's hard negatives
    reach RR_RETRAIN_THRESHOLD. The unique partial index on active runs, not this
    check, is what stops two labelers from both starting one."""
    from workers.control import enqueue_training

    reward = current_model(session, ModelKind.REWARD)
    iteration = session.get(Iteration, iteration_id)
    if reward is None or iteration.reward_model_version_id != reward.id:
        return None  # labels of an older model: its successor is already trained
    mined = session.scalar(
        select(func.count())
        .select_from(HardNegativeLabel)
        .where(HardNegativeLabel.reward_model_version_id == reward.id)
    )
    if mined < get_settings().retrain_threshold:
        return None
    run, created = enqueue_training(
        session, RunKind.REWARD, iteration_id=iteration_id, params={"trigger": "threshold"}
    )
    return run if created else None


# --- 3. the state machine --------------------------------------------------------


def problem_progress(session: Session, iteration: Iteration) -> dict[str, int]:
    """Counts that say how far the iteration's collection is."""
    in_iteration = Candidate.iteration_id == iteration.id
    candidates = session.scalar(select(func.count()).select_from(Candidate).where(in_iteration))
    executed = session.scalar(
        select(func.count()).select_from(Candidate).join(Execution).where(in_iteration)
    )
    judgeable = session.scalar(
        select(func.count())
        .select_from(Candidate)
        .join(Execution)
        .where(in_iteration, Execution.verdict != Verdict.SANDBOX_ERROR)
    )
    scored = session.scalar(
        select(func.count())
        .select_from(Candidate)
        .join(Score, Score.candidate_id == Candidate.id)
        .where(in_iteration, Score.reward_model_version_id == iteration.reward_model_version_id)
    )
    return {
        "problems": len(iteration.params["problem_ids"]),
        "generated": len(iteration.params["generated"]),
        "candidates": candidates,
        "executed": executed,
        "judgeable": judgeable,
        "scored": scored,
    }


def is_collected(progress: dict[str, int]) -> bool:
    return (
        progress["generated"] == progress["problems"]
        and progress["executed"] == progress["candidates"]
        and progress["scored"] == progress["judgeable"]
    )


def advance_iteration(session: Session, iteration_id: int) -> IterationStatus:
    """Take the iteration's next step if the store says it is due; idempotent."""
    from workers.control import enqueue_training

    iteration = lock_iteration(session, iteration_id)
    params = FlywheelParams.from_dict(iteration.params)
    if iteration.status == IterationStatus.OPEN:
        reward = current_model(session, ModelKind.REWARD)
        if reward is not None:
            _start_generation(session, iteration, reward)
        elif _may_retry(_runs(session, iteration_id, RunKind.REWARD)):
            enqueue_training(
                session,
                RunKind.REWARD,
                iteration_id=iteration_id,
                params={"warm_start": True, "epochs": params.reward_epochs},
            )
        return iteration.status
    if iteration.status == IterationStatus.GENERATING:
        if not is_collected(problem_progress(session, iteration)):
            return iteration.status
        runs = [
            r
            for r in _runs(session, iteration_id, RunKind.REWARD)
            if not r.params.get("warm_start")
        ]
        if not any(r.status == RunStatus.SUCCEEDED for r in runs):
            if _may_retry(runs):
                enqueue_training(
                    session,
                    RunKind.REWARD,
                    iteration_id=iteration_id,
                    params={"trigger": "iteration_end", "epochs": params.reward_epochs},
                )
            return iteration.status
        iteration.status = IterationStatus.TRAINING
    if iteration.status == IterationStatus.TRAINING:
        if (
            session.scalar(
                select(DatasetVersion.id).where(DatasetVersion.iteration_id == iteration_id)
            )
            is None
        ):
            _send(session, "training.version_dataset", iteration_id)
            return iteration.status
        runs = _runs(session, iteration_id, RunKind.POLICY)
        if params.policy_steps > 0 and not any(r.status == RunStatus.SUCCEEDED for r in runs):
            if _may_retry(runs):
                enqueue_training(
                    session,
                    RunKind.POLICY,
                    iteration_id=iteration_id,
                    params={
                        "steps": params.policy_steps,
                        "max_new_tokens": params.max_new_tokens,
                        "prompt_style": params.prompt_style,  # train on what generation fed
                    },
                )
            return iteration.status
        _finish(session, iteration)
    return iteration.status


def _may_retry(runs: list[TrainingRun]) -> bool:
    """No run active and fewer than MAX_RUN_FAILURES failures so far."""
    if any(r.status in (RunStatus.QUEUED, RunStatus.RUNNING) for r in runs):
        return False
    return sum(r.status == RunStatus.FAILED for r in runs) < MAX_RUN_FAILURES


def blocked_reason(session: Session, iteration_id: int) -> str | None:
    """Why the iteration cannot go on by itself (a training failed MAX_RUN_FAILURES
    times), or None."""
    for kind in RunKind:
        runs = _runs(session, iteration_id, kind)
        if runs and not _may_retry(runs) and runs[-1].status == RunStatus.FAILED:
            last_error = (runs[-1].error or "").strip().splitlines()[-1:]
            return f"{kind.value} training failed {MAX_RUN_FAILURES} times: {' '.join(last_error)}"
    return None


def _finish(session: Session, iteration: Iteration) -> None:
    from pipelines.evaluation import evaluate_iteration

    iteration.metrics = {
        **iteration.metrics,
        "evaluation": evaluate_iteration(session, iteration.id),
    }
    iteration.status = IterationStatus.DONE
    iteration.finished_at = utcnow()


def version_dataset(session: Session, iteration_id: int) -> None:
    """Export and DVC-tag the iteration's data, once."""
    from pipelines.datasets import version_iteration

    exists = session.scalar(
        select(DatasetVersion.id).where(DatasetVersion.iteration_id == iteration_id)
    )
    if exists is None:
        version_iteration(session, iteration_id, data_dir=get_settings().data_dir)


# --- 4. training runs --------------------------------------------------------------


def claim_run(session: Session, run_id: int) -> bool:
    """Mark a queued run running; False when another delivery already took it."""
    now = utcnow()
    claimed = session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status == RunStatus.QUEUED)
        .values(status=RunStatus.RUNNING, started_at=now, heartbeat_at=now, progress=0.0)
    )
    return claimed.rowcount == 1


def prepare_run(session: Session, run_id: int) -> None:
    """What a run needs stored before it trains: a warm start's executed mutants.
    Committed on its own so that no write lock is held through the training."""
    run = session.get(TrainingRun, run_id)
    if run.kind == RunKind.REWARD and run.params.get("warm_start"):
        store_warm_start_candidates(session, run.iteration_id)


def train_run(session: Session, run_id: int, progress: Callable[[float], None]) -> TrainingRun:
    """Train what the run asks for and register it; the model row and the run's
    success are flushed together, so the caller's commit publishes both or neither."""
    run = session.get(TrainingRun, run_id)
    if run.kind == RunKind.REWARD:
        version = _train_reward(session, run, progress)
    else:
        version = _train_policy(session, run, progress)
    # Still ours? Reconcile fails a run whose heartbeat went stale and may have
    # queued another: registering this one too would train the stage twice.
    session.refresh(run, with_for_update=True)
    if run.status != RunStatus.RUNNING:
        shutil.rmtree(version.path, ignore_errors=True)  # the caller rolls its row back
        raise RunLost(f"training run {run_id} was given up ({run.status}) before it finished")
    run.status = RunStatus.SUCCEEDED
    run.progress = 1.0
    run.finished_at = utcnow()
    run.result_model_version_id = version.id
    run.metrics = {k: v for k, v in version.metrics.items() if isinstance(v, int | float)}
    return run


def _train_reward(
    session: Session, run: TrainingRun, progress: Callable[[float], None]
) -> ModelVersion:
    from pipelines.reward_model import RewardConfig, train_and_register_reward_model

    settings = get_settings()
    parent = current_model(session, ModelKind.REWARD)
    return train_and_register_reward_model(
        session,
        config=RewardConfig(backbone=settings.reward_model, epochs=run.params.get("epochs", 1)),
        data_dir=settings.data_dir,
        parent_id=parent.id if parent else None,
        iteration_id=run.iteration_id,
        progress=progress,
    )


def store_warm_start_candidates(session: Session, iteration_id: int) -> int:
    """Warm start: with no reward model to rank anything yet, the first one learns
    reference solutions (chosen) against executed mutants of them (rejected when
    they fail). Mutants belong to no iteration. All sandbox runs happen before the
    first write, so no lock is held while they run. Returns executions written."""
    from pipelines.generation import PromptSpec

    iteration = session.get(Iteration, iteration_id)
    params = FlywheelParams.from_dict(iteration.params)
    problems = session.scalars(
        select(Problem)
        .where(
            Problem.id.in_(iteration.params["problem_ids"]),
            Problem.reference_solution.is_not(None),
        )
        .order_by(Problem.id)
    ).all()
    mutants = _generator("mutation", get_settings().generator_model, 0, 1).generate(
        [PromptSpec.from_problem(p) for p in problems], params.candidates
    )
    executed = set(
        session.execute(
            select(Candidate.problem_id, Candidate.content_hash)
            .join(Execution)
            .where(Candidate.problem_id.in_([p.id for p in problems]))
        ).all()
    )
    candidates, results = [], []
    for problem, samples in zip(problems, mutants, strict=True):
        todo = [s.code for s in samples if (problem.id, content_hash(s.code)) not in executed]
        if todo:
            candidates += [
                {"problem_id": problem.id, "code": c, "origin": Origin.MUTATION} for c in todo
            ]
            results += run_with_retries(todo, problem)
    ids = insert_candidates(session, candidates)
    return insert_executions(
        session,
        [execution_row(cid, r, attempts) for cid, (r, attempts) in zip(ids, results, strict=True)],
    )


def _train_policy(
    session: Session, run: TrainingRun, progress: Callable[[float], None]
) -> ModelVersion:
    from pipelines.generation import PromptSpec
    from pipelines.policy import PolicyConfig, train_and_register_policy

    iteration = session.get(Iteration, run.iteration_id)
    problems = session.scalars(
        select(Problem).where(Problem.id.in_(iteration.params["problem_ids"])).order_by(Problem.id)
    ).all()
    return train_and_register_policy(
        session,
        generator_version=session.get(ModelVersion, iteration.generator_version_id),
        reward_version=current_model(session, ModelKind.REWARD),
        prompts=[PromptSpec.from_problem(p) for p in problems],
        config=PolicyConfig(
            steps=run.params.get("steps", 2),
            max_new_tokens=run.params.get("max_new_tokens", 128),
            prompt_style=run.params.get("prompt_style", "auto"),
        ),
        data_dir=get_settings().data_dir,
        iteration_id=run.iteration_id,
        progress=progress,
        tests={p.id: p.tests for p in problems},
    )


def fail_run(session: Session, run_id: int, error: str) -> None:
    session.execute(
        update(TrainingRun)
        .where(
            TrainingRun.id == run_id, TrainingRun.status.in_([RunStatus.QUEUED, RunStatus.RUNNING])
        )
        .values(status=RunStatus.FAILED, error=error[-4000:], finished_at=utcnow())
    )


def heartbeat(session: Session, run_id: int, fraction: float | None = None) -> None:
    """Mark a running run alive, and record its progress when given."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if fraction is not None:
        values["progress"] = max(0.0, min(1.0, float(fraction)))
    session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status == RunStatus.RUNNING)
        .values(**values)
    )


# --- 5. reconcile -------------------------------------------------------------------


def reconcile(
    session: Session, *, stale_after: timedelta = timedelta(minutes=10)
) -> dict[str, int]:
    """Re-enqueue whatever the store shows as unfinished; the broker is never trusted
    for completeness (a lost Redis, a killed worker, the embedded broker). Enqueuing
    work that is merely in flight is harmless: every task re-checks the store."""
    counts: Counter[str] = Counter()
    now = utcnow()
    for run in session.scalars(
        select(TrainingRun).where(TrainingRun.status.in_([RunStatus.QUEUED, RunStatus.RUNNING]))
    ):
        beat = _aware(run.heartbeat_at or run.created_at)
        if run.status == RunStatus.RUNNING and now - beat > stale_after:
            fail_run(session, run.id, f"worker lost: no heartbeat since {beat.isoformat()}")
            counts["stale_runs_failed"] += 1
        elif run.status == RunStatus.QUEUED:
            _send(session, "training.run", run.id)
            counts["runs_resent"] += 1
    session.flush()
    open_ids = session.scalars(
        select(Iteration.id)
        .where(Iteration.status != IterationStatus.DONE)
        .order_by(Iteration.number)
    ).all()
    for iteration_id in open_ids:
        counts.update(_reconcile_iteration(session, iteration_id))
    return dict(counts)


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were written in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=utcnow().tzinfo)


def _reconcile_iteration(session: Session, iteration_id: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    iteration = session.get(Iteration, iteration_id)
    if iteration.status == IterationStatus.GENERATING:
        missing = [
            p for p in iteration.params["problem_ids"] if p not in iteration.params["generated"]
        ]
        for batch in _batches(iteration, missing):
            _send(session, "generation.generate_batch", iteration_id, batch)
            counts["batches"] += 1
        in_iteration = Candidate.iteration_id == iteration_id
        unexecuted = session.scalars(
            select(Candidate.problem_id)
            .distinct()
            .outerjoin(Execution)
            .where(in_iteration, Execution.id.is_(None))
        ).all()
        for problem_id in unexecuted:
            _send(session, "execution.execute_problem", iteration_id, problem_id)
        counts["executions"] += len(unexecuted)
        unlabelled = session.scalars(
            select(Candidate.problem_id)
            .distinct()
            .join(Execution)
            .outerjoin(
                Score,
                and_(
                    Score.candidate_id == Candidate.id,
                    Score.reward_model_version_id == iteration.reward_model_version_id,
                ),
            )
            .where(in_iteration, Execution.verdict != Verdict.SANDBOX_ERROR, Score.id.is_(None))
        ).all()
        for problem_id in set(unlabelled) - set(unexecuted):
            _send(session, "labeling.label_problem", iteration_id, problem_id)
            counts["labels"] += 1
    advance_iteration(session, iteration_id)
    return counts


# --- 6. reporting ---------------------------------------------------------------------


def iteration_rows(session: Session) -> list[dict[str, Any]]:
    """Per iteration: what `rewardranker status --json` and the run report show."""
    rows = []
    for iteration in session.scalars(select(Iteration).order_by(Iteration.number)):
        progress = problem_progress(session, iteration)
        verdicts = dict(
            session.execute(
                select(Execution.verdict, func.count())
                .join(Candidate, Candidate.id == Execution.candidate_id)
                .where(Candidate.iteration_id == iteration.id)
                .group_by(Execution.verdict)
            ).all()
        )
        reward_run = session.scalars(
            select(TrainingRun)
            .where(
                TrainingRun.iteration_id == iteration.id,
                TrainingRun.kind == RunKind.REWARD,
                TrainingRun.status == RunStatus.SUCCEEDED,
            )
            .order_by(TrainingRun.id.desc())
        ).first()
        rows.append(
            {
                "number": iteration.number,
                "status": iteration.status.value,
                "problems": progress["problems"],
                "candidates": progress["candidates"],
                "executions": progress["executed"],
                "verdicts": {verdict.value: count for verdict, count in verdicts.items()},
                "hard_negatives": session.scalar(
                    select(func.count())
                    .select_from(HardNegativeLabel)
                    .where(HardNegativeLabel.iteration_id == iteration.id)
                ),
                "reward_model_version": iteration.reward_model_version_id,
                "generator_version": iteration.generator_version_id,
                "dvc_tag": session.scalar(
                    select(DatasetVersion.dvc_tag).where(
                        DatasetVersion.iteration_id == iteration.id
                    )
                ),
                "reward_accuracy": (
                    reward_run.metrics.get("pairwise_accuracy") if reward_run else None
                ),
                "evaluation": iteration.metrics.get("evaluation", {}),
            }
        )
    return rows
