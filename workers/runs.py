"""The training-run lifecycle: enqueue, claim, heartbeat, reclaim, register, fail.

A training is a `TrainingRun` row (queued -> running -> succeeded | failed)
started by the short `training.run` task (`workers.training`). The broker message
is acknowledged on receipt; from then on the row, its heartbeat and its progress
are the truth.

A run whose worker is lost (a stale heartbeat, or an owner process that a worker
starting on its host finds dead) is reclaimed: queued again for its next attempt,
which resumes from the run's newest checkpoint. Each claim's `attempt` number
fences the worker that held it before: its heartbeats, success and failure no
longer count.
"""

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import ModelVersion, TrainingRun
from models.base import as_utc, utcnow
from models.db import session_scope
from models.enums import RunKind, RunStatus
from models.repository import register_model_version
from models.settings import get_settings
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
    """A training attempt's pulse. As a context manager it beats the run's heartbeat
    from a thread every third of RR_RUN_STALE_AFTER, between progress reports too:
    one step can outlast the limit on a loaded CPU (a PPO step of the bundled
    model took 13 minutes at load average 25), and the heartbeat says the worker
    lives, not that a step ended. Called, it is the progress callback handed to
    the training pipeline (written at most once a second). Either way, once the
    run is no longer this attempt's (reclaimed or failed), the next call raises
    `RunLost`, so a training that lost its run stops instead of finishing twice."""

    def __init__(self, run_id: int, attempt: int, *, every_s: float | None = None):
        self.run_id = run_id
        self.attempt = attempt
        self.every_s = every_s or get_settings().run_stale_after.total_seconds() / 3
        self.lost = threading.Event()
        self.checkpoint_step: int | None = None
        self._stop = threading.Event()
        self._last = 0.0

    def __call__(self, fraction: float) -> None:
        now = time.monotonic()
        if not self.lost.is_set() and (now - self._last >= 1.0 or fraction >= 1.0):
            self._last = now
            self._beat(fraction)
        if self.lost.is_set():
            raise RunLost(f"training run {self.run_id} attempt {self.attempt} was reclaimed")

    def checkpointed(self, step: int) -> None:
        """Record on the run that the attempt saved step `step` whole, now and with
        every later beat (so a failed write is made good by the next one)."""
        self.checkpoint_step = step
        self._beat(None)

    def __enter__(self) -> "Heartbeat":
        self._thread = threading.Thread(
            target=self._keep_alive, name=f"heartbeat-run-{self.run_id}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.every_s):
            self._beat(None)

    def _beat(self, fraction: float | None) -> None:
        try:
            with session_scope() as session:
                step = self.checkpoint_step
                if not heartbeat(session, self.run_id, self.attempt, fraction, step):
                    self.lost.set()
        except Exception:  # a database blip: the next beat tries again
            log.warning("heartbeat of training run %s failed", self.run_id, exc_info=True)


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
    """A training finished after its run was reclaimed or failed (no heartbeat): its
    result is not registered, since another attempt holds the run now."""


def owner() -> tuple[str, int]:
    """This process as a run's owner: host name and pid."""
    return socket.gethostname(), os.getpid()


def claim_run(session: Session, run_id: int) -> int | None:
    """Mark a queued run running, owned by this process; returns the claim's
    attempt number, or None when another delivery already took it."""
    now = utcnow()
    host, pid = owner()
    return session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status == RunStatus.QUEUED)
        .values(
            status=RunStatus.RUNNING,
            attempt=TrainingRun.attempt + 1,
            owner_host=host,
            owner_pid=pid,
            started_at=now,
            heartbeat_at=now,
            resumed_from_step=None,
        )
        .returning(TrainingRun.attempt)
    ).scalar()


def _held(run_id: int, attempt: int) -> tuple:
    """WHERE clauses: the run is running, under this attempt."""
    return (
        TrainingRun.id == run_id,
        TrainingRun.status == RunStatus.RUNNING,
        TrainingRun.attempt == attempt,
    )


def mark_resumed(session: Session, run_id: int, attempt: int, step: int) -> None:
    """Say in the run's progress that this attempt resumed from a checkpoint."""
    session.execute(
        update(TrainingRun).where(*_held(run_id, attempt)).values(resumed_from_step=step)
    )


def succeed_run(session: Session, run_id: int, attempt: int, version: ModelVersion) -> TrainingRun:
    """Register `version` as the run's result, if the run is still this attempt's;
    the model row and the run's success are flushed together, so the caller's
    commit publishes both or neither. Idempotent: when this attempt's success
    already committed (a commit whose acknowledgement a cut connection lost),
    the registered run is returned and nothing is added."""
    run = session.get(TrainingRun, run_id)
    # Still ours? A run whose heartbeat went stale was reclaimed, and another
    # attempt may be training it: registering this one too would train it twice.
    session.refresh(run, with_for_update=True)
    if run.status == RunStatus.SUCCEEDED and run.attempt == attempt:
        return run
    if run.status != RunStatus.RUNNING or run.attempt != attempt:
        if run.status not in ACTIVE:  # no attempt will use the weights
            shutil.rmtree(version.path, ignore_errors=True)
        raise RunLost(
            f"training run {run_id} attempt {attempt} was given up ({run.status.value}, "
            f"attempt {run.attempt}) before it finished"
        )
    register_model_version(session, version)
    run.status = RunStatus.SUCCEEDED
    run.progress = 1.0
    run.finished_at = utcnow()
    run.result_model_version_id = version.id
    run.metrics = {k: v for k, v in version.metrics.items() if isinstance(v, int | float)}
    return run


def fail_run(session: Session, run_id: int, error: str, attempt: int | None = None) -> None:
    """Fail an active run; with `attempt`, only while that attempt holds it."""
    held = (
        _held(run_id, attempt)
        if attempt is not None
        else (TrainingRun.id == run_id, TrainingRun.status.in_(ACTIVE))
    )
    session.execute(
        update(TrainingRun)
        .where(*held)
        .values(status=RunStatus.FAILED, error=error[-4000:], finished_at=utcnow())
    )


def heartbeat(
    session: Session,
    run_id: int,
    attempt: int,
    fraction: float | None = None,
    checkpoint_step: int | None = None,
) -> bool:
    """Mark a running run alive, and record its progress and its newest checkpoint
    when given; False when the run is no longer this attempt's."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if fraction is not None:
        values["progress"] = max(0.0, min(1.0, float(fraction)))
    if checkpoint_step is not None:
        values["checkpoint_step"] = checkpoint_step
    beaten = session.execute(update(TrainingRun).where(*_held(run_id, attempt)).values(**values))
    return beaten.rowcount == 1


# --- reclaiming the runs of lost workers -----------------------------------------------


def reclaim_run(session: Session, run_id: int, attempt: int, reason: str) -> bool:
    """Queue a run whose worker was lost for its next attempt, and send it after
    commit. An attempt that saved no newer checkpoint than it resumed from
    stalled; after RR_RUN_MAX_ATTEMPTS stalled attempts in a row the run fails
    instead, while one that keeps saving keeps going. Only the attempt that was
    lost is reclaimed, so two reclaimers racing make one retry: the database
    decides. Returns whether this call reclaimed it."""
    held = session.execute(
        select(TrainingRun.checkpoint_step, TrainingRun.resumed_from_step,
               TrainingRun.stalled_attempts)
        .where(*_held(run_id, attempt))
        .with_for_update()
    ).one_or_none()  # fmt: skip
    if held is None:
        return False
    saved, resumed_from, stalled = held
    stalled = 0 if (saved or 0) > (resumed_from or 0) else stalled + 1
    now = utcnow()
    exhausted = stalled >= get_settings().run_max_attempts
    values: dict[str, Any] = (
        {"status": RunStatus.FAILED, "finished_at": now, "stalled_attempts": stalled,
         "error": f"{reason}; lost its worker {stalled} times in a row with no new checkpoint"}
        if exhausted
        else {"status": RunStatus.QUEUED, "owner_host": None, "owner_pid": None,
              "heartbeat_at": now, "error": reason, "stalled_attempts": stalled}
    )  # fmt: skip
    reclaimed = session.execute(update(TrainingRun).where(*_held(run_id, attempt)).values(**values))
    if reclaimed.rowcount != 1:
        return False
    log.warning("training run %s attempt %s reclaimed: %s", run_id, attempt, reason)
    if not exhausted:
        send_run(session, run_id)
    return True


def reclaim_lost_runs(
    session: Session, *, stale_after: timedelta | None = None, host: str | None = None
) -> int:
    """Reclaim every running run whose heartbeat is older than `stale_after`
    (RR_RUN_STALE_AFTER), and, on `host`, every run whose owner process is gone.
    Returns how many were reclaimed."""
    stale_before = utcnow() - (
        stale_after if stale_after is not None else get_settings().run_stale_after
    )
    lost = TrainingRun.heartbeat_at < stale_before
    if host is not None:
        lost = or_(lost, TrainingRun.owner_host == host)
    reclaimed = 0
    for run in session.scalars(
        select(TrainingRun).where(TrainingRun.status == RunStatus.RUNNING, lost)
    ).all():
        if host is not None and run.owner_host == host and not _alive(run.owner_pid):
            reason = f"worker lost: its process {host}/{run.owner_pid} is gone"
        elif as_utc(run.heartbeat_at) < stale_before:
            reason = f"worker lost: no heartbeat since {run.heartbeat_at.isoformat()}"
        else:
            continue
        reclaimed += reclaim_run(session, run.id, run.attempt, reason)
    return reclaimed


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    # A zombie (killed, not yet reaped) is not training.
    with suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return True
