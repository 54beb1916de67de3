"""Thin tasks: ids in, one service call, commit, follow-ups after the commit.

Task names are "<queue>.<verb>"; `celery_app` routes them by that prefix.
Retries cover only named transient errors (a database or broker connection that
dropped, SQLite's busy lock), with exponential backoff and a cap; anything else
is a bug or bad data and fails loudly.
"""

import logging
import traceback

import kombu.exceptions
import sqlalchemy.exc

# The stages' heavy imports (torch, transformers, the sandbox) happen here, once,
# in the worker's parent process before it forks its pool, instead of inside the
# first task each pool process runs.
import pipelines.generation  # noqa: F401
import pipelines.mining  # noqa: F401
import pipelines.reward_model  # noqa: F401
import pipelines.sandbox  # noqa: F401
from app import flywheel
from models.db import session_scope
from workers.after_commit import enqueue_after_commit
from workers.celery_app import celery
from workers.control import Heartbeat, keep_alive

log = logging.getLogger(__name__)

TRANSIENT = (sqlalchemy.exc.OperationalError, kombu.exceptions.OperationalError)
RETRY = {
    "autoretry_for": TRANSIENT,
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": 8,
}


@celery.task(name="generation.generate_batch", **RETRY)
def generate_batch(iteration_id: int, problem_ids: list[int]) -> None:
    with session_scope() as session:
        for problem_id in flywheel.generate_batch(session, iteration_id, problem_ids):
            enqueue_after_commit(session, execute_problem.si(iteration_id, problem_id))


@celery.task(name="execution.execute_problem", **RETRY)
def execute_problem(iteration_id: int, problem_id: int) -> None:
    with session_scope() as session:
        flywheel.execute_problem(session, iteration_id, problem_id)
        enqueue_after_commit(session, label_problem.si(iteration_id, problem_id))


@celery.task(name="labeling.label_problem", **RETRY)
def label_problem(iteration_id: int, problem_id: int) -> None:
    with session_scope() as session:
        flywheel.label_problem(session, iteration_id, problem_id)
        flywheel.maybe_trigger_retraining(session, iteration_id)
    # A separate unit of work: the labels stay committed even if advancing waits
    # on the iteration lock and fails.
    with session_scope() as session:
        flywheel.advance_iteration(session, iteration_id)


# A training may run for hours: the short-task limit (RR_TASK_TIME_LIMIT) does not
# apply; the run row's heartbeat is what tells a live training from a lost one.
TRAINING_TIME_LIMIT_S = 48 * 3600


@celery.task(name="training.run", acks_late=False, time_limit=TRAINING_TIME_LIMIT_S, **RETRY)
def run_training(run_id: int) -> None:
    """Claim, train, register. Acknowledged on receipt: the run row, not the message,
    carries a long training; a lost worker leaves a stale heartbeat for reconcile."""
    with session_scope() as session:
        if not flywheel.claim_run(session, run_id):
            return  # another delivery took it, or it already ended
    try:
        with session_scope() as session:
            flywheel.prepare_run(session, run_id)
        with keep_alive(run_id), session_scope() as session:
            iteration_id = flywheel.train_run(session, run_id, Heartbeat(run_id)).iteration_id
    except Exception:
        # The failed transaction took the model row with it; record why.
        log.exception("training run %s failed", run_id)
        with session_scope() as session:
            flywheel.fail_run(session, run_id, traceback.format_exc())
        return
    if iteration_id is not None:
        with session_scope() as session:
            flywheel.advance_iteration(session, iteration_id)


@celery.task(name="training.version_dataset", **RETRY)
def version_dataset(iteration_id: int) -> None:
    with session_scope() as session:
        flywheel.version_dataset(session, iteration_id)
    with session_scope() as session:
        flywheel.advance_iteration(session, iteration_id)


@celery.task(name="execution.noop")
def noop() -> None:
    """Does nothing: measures the broker's per-task cost (bench) and checks a queue."""
