"""The `training` queue: reward-model and policy trainings, each a `TrainingRun`
row started by the short `training.run` task, and the iteration's dataset version.

The run's lifecycle (enqueue, claim, heartbeat, register, fail) is `workers.runs`;
what is trained and on what is here."""

import json
import logging
import shutil
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import (
    Candidate,
    Execution,
    Iteration,
    ModelVersion,
    Problem,
    TrainingRun,
)
from models.base import as_utc
from models.db import is_connection_error, session_scope, write_with_retry
from models.enums import ModelKind, Origin, RunKind
from models.repository import (
    content_hash,
    current_model,
    dataset_version,
    insert_candidates,
    insert_executions,
    register_model_version,
)
from models.settings import get_settings
from pipelines.checkpoints import Checkpoints, step_of
from pipelines.generation import PromptSpec
from pipelines.loading import write_then_rename
from pipelines.pairs import Pair, build_pairs
from pipelines.reward_model import RewardConfig, train_reward_model
from workers.celery_app import RETRY, celery
from workers.execution import execution_row, run_with_retries
from workers.generation import generator_for
from workers.iteration import FlywheelParams, advance_iteration
from workers.names import RUN_TRAINING, VERSION_DATASET
from workers.runs import (
    Heartbeat,
    RunLost,
    claim_run,
    fail_run,
    mark_resumed,
    reclaim_run,
    succeed_run,
)

if TYPE_CHECKING:  # torch and TRL load when a policy update runs, not with the worker
    from pipelines.policy import PolicyConfig

log = logging.getLogger(__name__)

# A training may run for hours: the short-task limit (RR_TASK_TIME_LIMIT) does not
# apply; the run row's heartbeat is what tells a live training from a lost one.
TRAINING_TIME_LIMIT_S = 48 * 3600


def run_folder(run: TrainingRun) -> Path:
    """A run's own folder: its frozen inputs, its checkpoints, its finished result.
    Named by the row's id and creation time, so a new store in an old data folder
    never picks up another store's run."""
    stamp = as_utc(run.created_at).strftime("%Y%m%dT%H%M%S%f")
    return get_settings().data_dir.resolve() / "runs" / f"run-{run.id}-{stamp}"


INPUTS = "inputs.json"  # what the run trains on, read from the store once
RESULT = "result.json"  # the trained model's row, written once its folder is in place


def prepare_run(session: Session, run_id: int) -> None:
    """What a run needs stored before it trains: a warm start's executed mutants.
    Committed on its own so that no write lock is held through the training."""
    run = session.get(TrainingRun, run_id)
    if run.kind == RunKind.REWARD and run.params.get("warm_start"):
        store_warm_start_candidates(session, run.iteration_id)


def freeze_inputs(session: Session, run_id: int) -> None:
    """Read what the run trains on from the store, once, into its folder: every
    attempt trains on the same data in the same order, and none holds a
    connection while it trains."""
    run = session.get(TrainingRun, run_id)
    path = run_folder(run) / INPUTS
    if path.is_file():
        return
    reward = run.kind == RunKind.REWARD
    inputs = _reward_inputs(session, run) if reward else _policy_inputs(session, run)
    write_then_rename(path, lambda staging: staging.write_text(json.dumps(inputs)))


def _reward_inputs(session: Session, run: TrainingRun) -> dict[str, Any]:
    parent = current_model(session, ModelKind.REWARD)
    epochs = run.params.get("epochs", FlywheelParams.reward_epochs)
    config = RewardConfig(backbone=get_settings().reward_model, epochs=epochs)
    return {
        "config": asdict(config),
        "pairs": [asdict(pair) for pair in build_pairs(session)],
        "parent_id": parent.id if parent else None,
    }


def _policy_inputs(session: Session, run: TrainingRun) -> dict[str, Any]:
    from pipelines.policy import PolicyConfig

    iteration = session.get(Iteration, run.iteration_id)
    params = FlywheelParams.from_dict(iteration.params)  # what the iteration generated with
    problems = session.scalars(
        select(Problem).where(Problem.id.in_(iteration.params["problem_ids"])).order_by(Problem.id)
    ).all()
    config = PolicyConfig(
        steps=run.params.get("steps", params.policy_steps),
        max_new_tokens=run.params.get("max_new_tokens", params.max_new_tokens),
        prompt_style=run.params.get("prompt_style", params.prompt_style),
    )
    return {
        "config": asdict(config),
        "generator_id": iteration.generator_version_id,
        "reward_id": current_model(session, ModelKind.REWARD).id,
        "prompts": [asdict(PromptSpec.from_problem(p)) for p in problems],
        "tests": {str(p.id): p.tests for p in problems},
    }


def train_run(
    run_id: int,
    attempt: int,
    progress: Callable[[float], None],
    on_checkpoint: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train what the run's frozen inputs ask for, resuming from its newest complete
    checkpoint (`on_checkpoint` is told each one saved), and return the trained
    model's row. The row is kept in the run's folder, so an attempt whose
    registration failed leaves it for the next one to register. No transaction
    stays open while it trains."""
    with session_scope() as session:
        run = session.get(TrainingRun, run_id)
    folder = run_folder(run)
    if (folder / RESULT).is_file():
        log.info("training run %s: registering the model an earlier attempt trained", run_id)
        return json.loads((folder / RESULT).read_text())
    inputs = json.loads((folder / INPUTS).read_text())
    settings = get_settings()
    checkpoints = Checkpoints(
        folder / "checkpoints", settings.checkpoint_interval.total_seconds(), on_checkpoint
    )
    with session_scope() as session:
        if (latest := checkpoints.latest()) is not None:
            mark_resumed(session, run_id, attempt, step_of(latest))
        if run.kind == RunKind.POLICY:
            generator = session.get(ModelVersion, inputs["generator_id"])
            reward = session.get(ModelVersion, inputs["reward_id"])
    if run.kind == RunKind.REWARD:
        version = train_reward_version(
            [Pair(**pair) for pair in inputs["pairs"]],
            RewardConfig(**inputs["config"]),
            data_dir=settings.data_dir,
            name=f"reward-{folder.name}",
            parent_id=inputs["parent_id"],
            progress=progress,
            checkpoints=checkpoints,
        )
    else:
        from pipelines.policy import PolicyConfig

        version = train_policy_version(
            generator_version=generator,
            reward_version=reward,
            prompts=[PromptSpec(**prompt) for prompt in inputs["prompts"]],
            config=PolicyConfig(**inputs["config"]),
            data_dir=settings.data_dir,
            name=f"generator-{folder.name}",
            iteration_id=run.iteration_id,
            progress=progress,
            tests={int(k): v for k, v in inputs["tests"].items()},
            checkpoints=checkpoints,
        )
    result = {column: getattr(version, column) for column in RESULT_COLUMNS}
    write_then_rename(folder / RESULT, lambda staging: staging.write_text(json.dumps(result)))
    return result


RESULT_COLUMNS = ("kind", "name", "parent_id", "base_model", "path", "metrics")


def register_run(
    session: Session, run_id: int, attempt: int, result: dict[str, Any]
) -> TrainingRun:
    """Register the run's trained model as its result (flush only; idempotent)."""
    version = ModelVersion(**{**result, "kind": ModelKind(result["kind"])})
    return succeed_run(session, run_id, attempt, version)


def store_warm_start_candidates(session: Session, iteration_id: int) -> int:
    """Warm start: with no reward model to rank anything yet, the first one learns
    reference solutions (chosen) against executed mutants of them (rejected when
    they fail). Mutants belong to no iteration. All sandbox runs happen before the
    first write, so no lock is held while they run. Returns executions written."""

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
    mutants = generator_for("mutation", get_settings().generator_model, 0, 1).generate(
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


def version_dataset_once(session: Session, iteration_id: int) -> None:
    """Export and DVC-tag the iteration's data, once."""
    from pipelines.datasets import version_iteration

    if dataset_version(session, iteration_id) is None:
        version_iteration(session, iteration_id, data_dir=get_settings().data_dir)


# --- train in staging, rename, register ----------------------------------------------


def train_and_register_reward_model(
    session: Session,
    *,
    config: RewardConfig,
    data_dir: str | Path,
    parent_id: int | None = None,
    iteration_id: int | None = None,
    progress: Callable[[float], None] | None = None,
) -> ModelVersion:
    """Train on every pair in the store and register the result (flush only).
    Training always starts from `config.backbone`; `parent_id` records lineage
    (the version whose hard negatives fed this one)."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    iteration = f"it{iteration_id}-" if iteration_id is not None else ""
    version = train_reward_version(
        build_pairs(session),
        config,
        data_dir=data_dir,
        name=f"reward-{iteration}{stamp}-{uuid.uuid4().hex[:8]}",
        parent_id=parent_id,
        progress=progress,
    )
    return register_model_version(session, version)


def train_reward_version(
    pairs: Sequence[Pair],
    config: RewardConfig,
    *,
    data_dir: str | Path,
    name: str,
    parent_id: int | None,
    progress: Callable[[float], None] | None = None,
    checkpoints: Checkpoints | None = None,
) -> ModelVersion:
    """Train a reward model into the models folder and return its row, unsaved.
    The weights are written to a temporary folder and renamed into place, so a
    crash at any point leaves no half-model where a finished one is expected."""
    folder = Path(data_dir).resolve() / "models" / "reward" / name
    metrics = write_then_rename(
        folder,
        lambda staging: train_reward_model(
            pairs, config, staging, progress=progress, checkpoints=checkpoints
        ),
    )
    return ModelVersion(
        kind=ModelKind.REWARD,
        name=name,
        parent_id=parent_id,
        base_model=config.backbone,
        path=str(folder),
        metrics=metrics,  # the config is in the folder's reward_config.json
    )


def train_and_register_policy(
    session: Session,
    *,
    generator_version: ModelVersion,
    reward_version: ModelVersion,
    prompts: Sequence[PromptSpec],
    config: "PolicyConfig",
    data_dir: Path,
    iteration_id: int | None = None,
    progress: Callable[[float], None] | None = None,
    tests: Mapping[int, str] | None = None,
) -> ModelVersion:
    """Update `generator_version` against `reward_version` and register the result as a
    new generator version (flush only: the caller commits). A failure registers nothing
    and leaves no folder behind."""
    version = train_policy_version(
        generator_version=generator_version,
        reward_version=reward_version,
        prompts=prompts,
        config=config,
        data_dir=data_dir,
        name=f"generator-{config.algo}-{uuid.uuid4().hex[:12]}",
        iteration_id=iteration_id,
        progress=progress,
        tests=tests,
    )
    return register_model_version(session, version)


def train_policy_version(
    *,
    generator_version: ModelVersion,
    reward_version: ModelVersion,
    prompts: Sequence[PromptSpec],
    config: "PolicyConfig",
    data_dir: Path,
    name: str,
    iteration_id: int | None = None,
    progress: Callable[[float], None] | None = None,
    tests: Mapping[int, str] | None = None,
    checkpoints: Checkpoints | None = None,
) -> ModelVersion:
    """Update `generator_version` against `reward_version` into the models folder
    and return the new generator's row, unsaved."""
    from pipelines.policy import update_policy

    if generator_version.kind != ModelKind.GENERATOR:
        raise ValueError(
            f"model version {generator_version.id} is a {generator_version.kind} model, "
            "not a generator"
        )
    if reward_version.kind != ModelKind.REWARD:
        raise ValueError(
            f"model version {reward_version.id} is a {reward_version.kind} model, "
            "not a reward model"
        )
    folder = (Path(data_dir) / "models" / "generators" / name).resolve()
    metrics = write_then_rename(
        folder,
        lambda staging: update_policy(
            # a version without a path is its base model as is
            generator=generator_version.path or generator_version.base_model,
            reward_model=reward_version.path or reward_version.base_model,
            prompts=prompts,
            config=config,
            output_dir=staging,
            progress=progress,
            tests=tests,
            checkpoints=checkpoints,
        ),
    )
    return ModelVersion(
        kind=ModelKind.GENERATOR,
        name=name,
        parent_id=generator_version.id,
        base_model=generator_version.base_model,
        path=str(folder),
        metrics={
            **metrics,
            "reward_version_id": reward_version.id,
            "iteration_id": iteration_id,
            "config": asdict(config),
        },
    )


def carry_out_run(run_id: int) -> None:
    """Claim, train, register, each step in its own short transaction; a retry of a
    lost attempt resumes from the run's checkpoint or registers its saved result."""
    with session_scope() as session:
        attempt = claim_run(session, run_id)
        folder = run_folder(session.get(TrainingRun, run_id))
    if attempt is None:
        return  # another delivery took it, or it already ended
    try:
        with session_scope() as session:
            prepare_run(session, run_id)
        with session_scope() as session:
            freeze_inputs(session, run_id)
        with Heartbeat(run_id, attempt) as beat:
            result = train_run(run_id, attempt, beat, beat.checkpointed)
            # Minutes or hours of training: a cut connection must not discard them.
            run = write_with_retry(lambda session: register_run(session, run_id, attempt, result))
    except RunLost:
        log.warning("training run %s attempt %s was reclaimed meanwhile", run_id, attempt)
        return
    except Exception as error:
        if is_connection_error(error):
            # Not the training's fault: another attempt resumes from the checkpoint
            # or registers the saved result, once the store is back.
            log.exception("training run %s: store unreachable", run_id)
            with suppress(Exception), session_scope() as session:
                reclaim_run(session, run_id, attempt, f"store unreachable: {error}")
            return
        log.exception("training run %s failed", run_id)
        with session_scope() as session:
            fail_run(session, run_id, traceback.format_exc(), attempt)
        shutil.rmtree(folder, ignore_errors=True)  # a new run starts afresh
        return
    shutil.rmtree(folder, ignore_errors=True)  # its checkpoints served
    if run.iteration_id is not None:
        write_with_retry(lambda session: advance_iteration(session, run.iteration_id))


@celery.task(name=RUN_TRAINING, acks_late=False, time_limit=TRAINING_TIME_LIMIT_S, **RETRY)
def run_training(run_id: int) -> None:
    """Acknowledged on receipt: the run row, not the message, carries a long
    training; a lost worker leaves its run for a reclaim."""
    carry_out_run(run_id)


@celery.task(name=VERSION_DATASET, **RETRY)
def version_dataset(iteration_id: int) -> None:
    with session_scope() as session:
        version_dataset_once(session, iteration_id)
    with session_scope() as session:
        advance_iteration(session, iteration_id)
