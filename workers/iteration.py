"""The iteration state machine: the one place that decides what runs next.

An iteration moves OPEN -> GENERATING -> TRAINING -> EVALUATING -> DONE:

1. `open_iteration` refuses problems with no tests and held-out ones, records the
   problem set and size in `Iteration.params`, and starts generation in batches
   (or, while no reward model exists, a warm-start reward training first).
   Iteration 1 also starts evaluation 0, the baseline.
2. Each stored batch is followed by one execution per problem (`after_generation`),
   each execution by one labeling (`after_execution`), each labeling by a check of
   the retraining threshold (`after_labeling`).
3. `advance_iteration` is the one step between states. Every task calls it after
   its own work; it looks only at the store, so calling it twice is harmless.
   After training it starts the iteration's evaluation on the held-out problems
   (`workers.evaluation`), and the iteration is done when its evaluations are.

Tasks never send each other: they call these functions, which send by the names in
`workers.names` once the caller's transaction commits (`enqueue_after_commit`).
Idempotence comes from the store: unique keys with ON CONFLICT DO NOTHING, and
"already done?" checks taken under a lock on the iteration row.
"""

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from models import Evaluation, HardNegativeLabel, Iteration, ModelVersion, Problem, TrainingRun
from models.base import utcnow
from models.enums import EvaluationStatus, IterationStatus, ModelKind, RunKind, RunStatus, Split
from models.repository import (
    current_model,
    dataset_version,
    is_collected,
    lock_row,
    problem_progress,
    register_model_version,
)
from models.settings import get_settings
from workers.after_commit import enqueue_after_commit
from workers.celery_app import celery
from workers.evaluation import batches, open_evaluation
from workers.names import (
    DRAW_SAMPLES,
    EXECUTE_DRAWN,
    EXECUTE_PROBLEM,
    GENERATE_BATCH,
    LABEL_PROBLEM,
    SCORE_DRAWN,
    VERSION_DATASET,
)
from workers.runs import enqueue_training

MAX_RUN_FAILURES = 3
"""Failed trainings of one kind per iteration before the flywheel stops retrying it."""


class ProblemsWithoutTests(ValueError):
    def __init__(self, problem_ids: list[int]):
        super().__init__(f"problems without tests cannot be judged: ids {problem_ids}")
        self.problem_ids = problem_ids


@dataclass(frozen=True)
class FlywheelParams:
    """The size and knobs of one iteration, stored on its row so a resume uses the same."""

    backend: str = field(
        default="transformers",
        metadata={
            "help": "transformers (CPU or GPU), vllm (GPU workers with the gpu extra) or mutation."
        },
    )
    candidates: int = field(
        # Four: the bundled model samples slowly on this project's 2-core machines.
        default=4,
        metadata={"help": "Candidates sampled per problem."},
    )
    batch_size: int = field(default=2, metadata={"help": "Problems per generation task."})
    max_new_tokens: int = field(default=128, metadata={"help": "Token cap per sample."})
    prompt_style: str = field(
        default="auto",
        metadata={"help": "auto (chat if the model has a template), chat or completion."},
    )
    reward_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Epochs of each reward training; None: the method's own (RewardConfig.epochs)."
        },
    )
    eval_problems: int = field(
        # Few by default: the bundled model samples slowly on 2 CPU cores. Every
        # evaluation reuses the baseline's problems, so all are paired.
        default=8,
        metadata={"help": "Held-out problems each evaluation samples (the first by id; 0: all)."},
    )
    policy_steps: int = field(
        # One step: on the 2-core default machine each PPO step of the bundled
        # model costs minutes, and two made the default run miss 20 minutes.
        default=1,
        metadata={"help": "PPO steps per policy update; 0 skips it."},
    )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FlywheelParams":
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


def _send(session: Session, task_name: str, *args: Any) -> None:
    """Send task `task_name` (routed by its name) once `session` commits."""
    enqueue_after_commit(session, celery.signature(task_name, args=args))


def _generator_version(session: Session) -> ModelVersion:
    """The current generator, registering the configured base model the first time."""
    version = current_model(session, ModelKind.GENERATOR)
    if version is None:
        spec = get_settings().generator_model
        version = register_model_version(
            session, ModelVersion(kind=ModelKind.GENERATOR, name="base", base_model=spec, path=None)
        )
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
    held_out = sorted(p.id for p in problems if p.split == Split.EVAL)
    if held_out:
        raise ValueError(f"held-out (eval) problems never train: ids {held_out}")
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
    send_generation(session, iteration, iteration.params["problem_ids"])
    # The baseline, queued behind the iteration's own batches: it then samples
    # while the iteration's candidates are judged and the reward model retrains.
    if iteration.number == 1:
        start_evaluation(session, 0, iteration)


def start_evaluation(
    session: Session, number: int, iteration: Iteration, *, enqueue: bool = True
) -> Evaluation | None:
    """Open evaluation `number` of the iteration's models (see `workers.evaluation`)
    and, unless `enqueue` is False, send its batches; None when there is nothing
    to evaluate."""
    params = FlywheelParams.from_dict(iteration.params)
    evaluation = open_evaluation(
        session,
        number,
        iteration,
        eval_problems=params.eval_problems,
        generation={
            "backend": params.backend,
            "max_new_tokens": params.max_new_tokens,
            "prompt_style": params.prompt_style,
            "batch_size": params.batch_size,
        },
    )
    if evaluation is not None and enqueue and not evaluation.params["generated"]:
        send_draws(session, evaluation, evaluation.params["problem_ids"])
    return evaluation


def send_draws(session: Session, evaluation: Evaluation, problem_ids: list[int]) -> int:
    """Send the sampling of these held-out problems in batches; returns batches."""
    sent = batches(evaluation, problem_ids)
    for batch in sent:
        _send(session, DRAW_SAMPLES, evaluation.id, batch)
    return len(sent)


def send_generation(session: Session, iteration: Iteration, problem_ids: list[int]) -> int:
    """Send the generation of these problems in the iteration's batches; returns batches."""
    size = FlywheelParams.from_dict(iteration.params).batch_size
    batches = [problem_ids[i : i + size] for i in range(0, len(problem_ids), size)]
    for batch in batches:
        _send(session, GENERATE_BATCH, iteration.id, batch)
    return len(batches)


def iteration_to_follow(
    session: Session, params: FlywheelParams, *, size: int, iterations: int, continuous: bool
) -> tuple[int | None, bool]:
    """The iteration a driver follows next and whether it resumes one: the oldest
    unfinished iteration, else a new one over `size` problems while fewer than
    `iterations` are done (with `continuous`, always, over problems no iteration
    used yet after the first); (None, False) when there is nothing to run."""
    unfinished = session.scalar(
        select(Iteration.id)
        .where(Iteration.status != IterationStatus.DONE)
        .order_by(Iteration.number)
    )
    if unfinished is not None:
        return unfinished, True
    done = session.scalar(
        select(func.count()).select_from(Iteration).where(Iteration.status == IterationStatus.DONE)
    )
    if continuous or done < iterations:
        problem_ids = next_problems(session, size, fresh_only=continuous and done > 0)
        if problem_ids:
            return open_iteration(session, problem_ids, params).id, False
    return None, False


def next_problems(session: Session, size: int, *, fresh_only: bool) -> list[int]:
    """The first `size` training-split problems with tests; with `fresh_only`, only
    problems no iteration has used yet."""
    query = select(Problem.id).where(
        Problem.split == Split.TRAIN, or_(Problem.tests != "", Problem.io_cases.is_not(None))
    )
    if fresh_only:
        used = {
            p
            for ids in session.scalars(select(Iteration.params))
            for p in ids.get("problem_ids", [])
        }
        query = query.where(Problem.id.not_in(used)) if used else query
    return list(session.scalars(query.order_by(Problem.id).limit(size)))


# --- 2. after each stage's task ------------------------------------------------------


def after_generation(session: Session, iteration_id: int, problem_ids: list[int]) -> None:
    """A batch is stored: execute each of its problems."""
    for problem_id in problem_ids:
        _send(session, EXECUTE_PROBLEM, iteration_id, problem_id)


def after_execution(session: Session, iteration_id: int, problem_id: int) -> None:
    """A problem's candidates have verdicts: score and label them."""
    _send(session, LABEL_PROBLEM, iteration_id, problem_id)


def after_drawing(session: Session, evaluation_id: int, problem_ids: list[int]) -> None:
    """An evaluation's draws are stored: judge each problem's programs."""
    for problem_id in problem_ids:
        _send(session, EXECUTE_DRAWN, evaluation_id, problem_id)


def after_drawn_execution(session: Session, evaluation_id: int, problem_id: int) -> None:
    """A problem's drawn programs have verdicts: score them."""
    _send(session, SCORE_DRAWN, evaluation_id, problem_id)


def maybe_trigger_retraining(session: Session, iteration_id: int) -> TrainingRun | None:
    """Enqueue one reward retraining once the current reward model's hard negatives
    reach RR_RETRAIN_THRESHOLD. The unique partial index on active runs, not this
    check, is what stops two labelers from both starting one."""

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


# --- 3. between states -------------------------------------------------------------


def advance_iteration(session: Session, iteration_id: int) -> IterationStatus:
    """Take the iteration's next step if the store says it is due; idempotent."""

    iteration = lock_row(session, Iteration, iteration_id)
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
        if dataset_version(session, iteration_id) is None:
            _send(session, VERSION_DATASET, iteration_id)
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
        iteration.status = IterationStatus.EVALUATING
        start_evaluation(session, iteration.number, iteration)
    if iteration.status == IterationStatus.EVALUATING:
        pending = session.scalar(
            select(func.count())
            .select_from(Evaluation)
            .where(
                Evaluation.iteration_id == iteration_id,
                Evaluation.status != EvaluationStatus.DONE,
            )
        )
        if pending:
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
