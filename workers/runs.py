"""The training-run lifecycle: enqueue, claim, heartbeat, register, fail.

A training is a `TrainingRun` row (queued -> running -> succeeded | failed)
started by the short `training.run` task (`workers.training`). The broker message
is acknowledged on receipt; from then on the row, its heartbeat and its progress
are the truth.
"""

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import ModelVersion, TrainingRun
from models.base import utcnow
from models.db import session_scope
from models.enums import RunKind, RunStatus
from workers.after_commit import enqueue_after_commit
from workers.celery_app import celery
from workers.names import RUN_TRAINING

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
    send_run(session, run.id)
    return run, True


def send_run(session: Session, run_id: int) -> None:
    """Send the run's training task once `session` commits."""
    enqueue_after_commit(session, celery.signature(RUN_TRAINING, args=(run_id,)))


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


class RunLost(RuntimeError):
    """A training finished after reconcile had given its run up (no heartbeat):
    its result is dropped, since a replacement run may already be training."""


def claim_run(session: Session, run_id: int) -> bool:
    """Mark a queued run running; False when another delivery already took it."""
    now = utcnow()
    claimed = session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status == RunStatus.QUEUED)
        .values(status=RunStatus.RUNNING, started_at=now, heartbeat_at=now, progress=0.0)
    )
    return claimed.rowcount == 1


def succeed_run(session: Session, run_id: int, version: ModelVersion) -> TrainingRun:
    """Register the run's model as its result, if the run is still ours; the model
    row and the run's success are flushed together, so the caller's commit
    publishes both or neither."""
    run = session.get(TrainingRun, run_id)
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
