"""Manual and automatic control of trainings: a run row first, then the queue.

A training is a `TrainingRun` row (queued -> running -> succeeded | failed)
started by the short `training.run` task. The broker message is acknowledged on
receipt; from then on the row, its heartbeat and its progress are the truth.
"""

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.db import session_scope
from app.flywheel import heartbeat
from models import TrainingRun
from models.enums import RunKind, RunStatus
from workers.after_commit import enqueue_after_commit
from workers.celery_app import celery

ACTIVE = (RunStatus.QUEUED, RunStatus.RUNNING)
log = logging.getLogger(__name__)


def active_run(session: Session, kind: RunKind) -> TrainingRun | None:
    return session.scalars(
        select(TrainingRun).where(TrainingRun.kind == kind, TrainingRun.status.in_(ACTIVE))
    ).first()


def enqueue_training(
    session: Session,
    kind: RunKind,
    *,
    params: dict[str, Any] | None = None,
    iteration_id: int | None = None,
) -> tuple[TrainingRun, bool]:
    """A queued run of `kind` and True, or the already active one and False.

    The training task is sent after the caller's commit. Two callers racing
    both insert; the unique partial index `uq_training_runs_active_kind` lets
    one win, and the loser returns the winner's run.
    """
    existing = active_run(session, kind)
    if existing is not None:
        return existing, False
    run = TrainingRun(kind=kind, params=params or {}, iteration_id=iteration_id)
    try:
        with session.begin_nested():
            session.add(run)
    except IntegrityError:
        winner = active_run(session, kind)
        if winner is None:  # the winner finished in between: nothing to add
            raise
        return winner, False
    enqueue_after_commit(session, celery.signature("training.run", args=(run.id,)))
    return run, True


class Heartbeat:
    """The progress callback handed to a training pipeline: writes progress and a
    heartbeat on the run row in its own short transaction, at most once a second."""

    def __init__(self, run_id: int, interval_s: float = 1.0):
        self.run_id = run_id
        self.interval_s = interval_s
        self._last = 0.0

    def __call__(self, fraction: float) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s and fraction < 1.0:
            return
        self._last = now
        with session_scope() as session:
            heartbeat(session, self.run_id, fraction)


KEEP_ALIVE_S = 30.0
"""How often a training worker marks its run alive, between progress reports too."""


@contextmanager
def keep_alive(run_id: int, every_s: float = KEEP_ALIVE_S) -> Iterator[None]:
    """Beat the run's heartbeat from a thread while the block runs. Progress comes
    per training step, and one step can outlast the stale-run limit on a loaded
    CPU (a PPO step of the bundled model took 13 minutes at load average 25);
    the heartbeat says the worker lives, not that a step ended."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                with session_scope() as session:
                    heartbeat(session, run_id)
            except Exception:  # a database blip: the next beat tries again
                log.warning("heartbeat of training run %s failed", run_id, exc_info=True)

    thread = threading.Thread(target=beat, name=f"keep-alive-run-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def follow_run(
    run_id: int, on_progress: Callable[[TrainingRun], None], *, poll_s: float = 1.0
) -> TrainingRun:
    """Poll the run row until it ends, reporting each reading; returns the final row."""
    while True:
        with session_scope() as session:
            run = session.get(TrainingRun, run_id)
            if run is None:
                raise LookupError(f"no training run {run_id}")
        on_progress(run)
        if run.status not in ACTIVE:
            return run
        time.sleep(poll_s)
