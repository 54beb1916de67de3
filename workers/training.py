"""The `training` queue: reward-model and policy trainings, each a `TrainingRun`
row started by the short `training.run` task, and the iteration's dataset version.

The run's lifecycle (enqueue, claim, heartbeat, register, fail) is `workers.runs`;
what is trained and on what is here."""

import logging
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

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
from models.db import session_scope
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
from pipelines.generation import PromptSpec
from pipelines.loading import write_then_rename
from pipelines.pairs import build_pairs
from pipelines.reward_model import RewardConfig, train_reward_model
from workers.celery_app import RETRY, celery
from workers.execution import execution_row, run_with_retries
from workers.generation import generator_for
from workers.iteration import FlywheelParams, advance_iteration
from workers.names import RUN_TRAINING, VERSION_DATASET
from workers.runs import Heartbeat, claim_run, fail_run, keep_alive, succeed_run

if TYPE_CHECKING:  # torch and TRL load when a policy update runs, not with the worker
    from pipelines.policy import PolicyConfig

log = logging.getLogger(__name__)

# A training may run for hours: the short-task limit (RR_TASK_TIME_LIMIT) does not
# apply; the run row's heartbeat is what tells a live training from a lost one.
TRAINING_TIME_LIMIT_S = 48 * 3600


def prepare_run(session: Session, run_id: int) -> None:
    """What a run needs stored before it trains: a warm start's executed mutants.
    Committed on its own so that no write lock is held through the training."""
    run = session.get(TrainingRun, run_id)
    if run.kind == RunKind.REWARD and run.params.get("warm_start"):
        store_warm_start_candidates(session, run.iteration_id)


def train_run(session: Session, run_id: int, progress: Callable[[float], None]) -> TrainingRun:
    """Train what the run asks for and register it as the run's result."""
    run = session.get(TrainingRun, run_id)
    if run.kind == RunKind.REWARD:
        version = _train_reward(session, run, progress)
    else:
        version = _train_policy(session, run, progress)
    return succeed_run(session, run_id, version)


def _train_reward(
    session: Session, run: TrainingRun, progress: Callable[[float], None]
) -> ModelVersion:
    settings = get_settings()
    parent = current_model(session, ModelKind.REWARD)
    epochs = run.params.get("epochs", FlywheelParams.reward_epochs)
    return train_and_register_reward_model(
        session,
        config=RewardConfig(backbone=settings.reward_model, epochs=epochs),
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


def _train_policy(
    session: Session, run: TrainingRun, progress: Callable[[float], None]
) -> ModelVersion:
    from pipelines.policy import PolicyConfig

    iteration = session.get(Iteration, run.iteration_id)
    params = FlywheelParams.from_dict(iteration.params)  # what the iteration generated with
    problems = session.scalars(
        select(Problem).where(Problem.id.in_(iteration.params["problem_ids"])).order_by(Problem.id)
    ).all()
    return train_and_register_policy(
        session,
        generator_version=session.get(ModelVersion, iteration.generator_version_id),
        reward_version=current_model(session, ModelKind.REWARD),
        prompts=[PromptSpec.from_problem(p) for p in problems],
        config=PolicyConfig(
            steps=run.params.get("steps", params.policy_steps),
            max_new_tokens=run.params.get("max_new_tokens", params.max_new_tokens),
            prompt_style=run.params.get("prompt_style", params.prompt_style),
        ),
        data_dir=get_settings().data_dir,
        iteration_id=run.iteration_id,
        progress=progress,
        tests={p.id: p.tests for p in problems},
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

    The weights are written to a temporary folder and renamed into place before
    the row is added, so a crash at any point leaves no registered half-model.
    Training always starts from `config.backbone`; `parent_id` records lineage
    (the version whose hard negatives fed this one).
    """
    pairs = build_pairs(session)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    iteration = f"it{iteration_id}-" if iteration_id is not None else ""
    name = f"reward-{iteration}{stamp}-{uuid.uuid4().hex[:8]}"
    folder = Path(data_dir).resolve() / "models" / "reward" / name
    metrics = write_then_rename(
        folder, lambda staging: train_reward_model(pairs, config, staging, progress=progress)
    )
    version = ModelVersion(
        kind=ModelKind.REWARD,
        name=name,
        parent_id=parent_id,
        base_model=config.backbone,
        path=str(folder),
        metrics=metrics,  # the config is in the folder's reward_config.json
    )
    return register_model_version(session, version)


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
    name = f"generator-{config.algo}-{uuid.uuid4().hex[:12]}"
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
        ),
    )
    version = ModelVersion(
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
    return register_model_version(session, version)


@celery.task(name=RUN_TRAINING, acks_late=False, time_limit=TRAINING_TIME_LIMIT_S, **RETRY)
def run_training(run_id: int) -> None:
    """Claim, train, register. Acknowledged on receipt: the run row, not the message,
    carries a long training; a lost worker leaves a stale heartbeat for reconcile."""
    with session_scope() as session:
        if not claim_run(session, run_id):
            return  # another delivery took it, or it already ended
    try:
        with session_scope() as session:
            prepare_run(session, run_id)
        with keep_alive(run_id), session_scope() as session:
            iteration_id = train_run(session, run_id, Heartbeat(run_id)).iteration_id
    except Exception:
        # The failed transaction took the model row with it; record why.
        log.exception("training run %s failed", run_id)
        with session_scope() as session:
            fail_run(session, run_id, traceback.format_exc())
        return
    if iteration_id is not None:
        with session_scope() as session:
            advance_iteration(session, iteration_id)


@celery.task(name=VERSION_DATASET, **RETRY)
def version_dataset(iteration_id: int) -> None:
    with session_scope() as session:
        version_dataset_once(session, iteration_id)
    with session_scope() as session:
        advance_iteration(session, iteration_id)
