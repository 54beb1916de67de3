"""The `training` queue: reward-model and policy trainings, each a `TrainingRun`
row started by the short `training.run` task, and the iteration's dataset version.

The run's lifecycle (enqueue, claim, heartbeat, register, fail) is `workers.runs`;
what is trained and on what is here."""

import logging
import traceback
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import (
    Candidate,
    DatasetVersion,
    Execution,
    Iteration,
    ModelVersion,
    Problem,
    TrainingRun,
)
from models.db import session_scope
from models.enums import ModelKind, Origin, RunKind
from models.repository import content_hash, current_model, insert_candidates, insert_executions
from models.settings import get_settings
from pipelines.generation import PromptSpec
from pipelines.reward_model import RewardConfig, train_and_register_reward_model
from workers import iteration as iterations
from workers.celery_app import RETRY, celery
from workers.execution import execution_row, run_with_retries
from workers.generation import generator_for
from workers.iteration import FlywheelParams
from workers.names import RUN_TRAINING, VERSION_DATASET
from workers.runs import Heartbeat, claim_run, fail_run, keep_alive, succeed_run

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
    from pipelines.policy import PolicyConfig, train_and_register_policy

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

    exists = session.scalar(
        select(DatasetVersion.id).where(DatasetVersion.iteration_id == iteration_id)
    )
    if exists is None:
        version_iteration(session, iteration_id, data_dir=get_settings().data_dir)


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
            iterations.advance_iteration(session, iteration_id)


@celery.task(name=VERSION_DATASET, **RETRY)
def version_dataset(iteration_id: int) -> None:
    with session_scope() as session:
        version_dataset_once(session, iteration_id)
    with session_scope() as session:
        iterations.advance_iteration(session, iteration_id)
