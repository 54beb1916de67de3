"""Reconcile: re-enqueue whatever the store shows as unfinished. The broker is never
trusted for completeness (a lost Redis, a killed worker, the embedded broker).

It runs on a schedule (`rewardranker beat`, or the driver every
RR_RECONCILE_INTERVAL), so it is cheap when nothing is lost: lost trainings are
found by their heartbeat, and a stage's work is sent again only once that stage
has written nothing for RR_STALL_AFTER."""

import logging
from collections import Counter
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

from celery.signals import worker_ready
from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from models import Candidate, Evaluation, Execution, Iteration, Score, TrainingRun
from models.base import as_utc, utcnow
from models.db import session_scope
from models.enums import EvaluationStatus, IterationStatus, RunStatus, Verdict
from models.settings import get_settings
from workers.celery_app import celery
from workers.evaluation import finish_evaluation, missing_work
from workers.iteration import (
    advance_iteration,
    after_drawing,
    after_drawn_execution,
    after_execution,
    after_generation,
    send_draws,
    send_generation,
)
from workers.names import RECONCILE
from workers.runs import owner, reclaim_lost_runs, send_run

log = logging.getLogger(__name__)

STAGE_ROWS = {"generation": Candidate, "execution": Execution, "labeling": Score}
"""The rows each short stage writes: a stage that wrote none for RR_STALL_AFTER while
it has work left has lost its messages."""


def reconcile(
    session: Session,
    *,
    stale_after: timedelta | None = None,
    stall_after: timedelta | None = None,
    host: str | None = None,
    stages: Collection[str] = (),
) -> dict[str, int]:
    """Reclaim trainings whose heartbeat is older than `stale_after`
    (RR_RUN_STALE_AFTER) or whose owner on `host` is gone, and re-enqueue the work
    of `stages` and of every stage that wrote nothing for `stall_after`
    (RR_STALL_AFTER). Enqueuing work that is merely in flight is harmless: every
    task re-checks the store."""
    settings = get_settings()
    stalled_before = utcnow() - (settings.stall_after if stall_after is None else stall_after)
    counts: Counter[str] = Counter()
    counts["runs_reclaimed"] = reclaim_lost_runs(session, stale_after=stale_after, host=host)
    for run in session.scalars(
        select(TrainingRun).where(TrainingRun.status == RunStatus.QUEUED)
    ).all():
        # Queued (or reclaimed, which stamps the heartbeat) before the stall limit
        # and still unclaimed: its message is lost.
        if as_utc(run.heartbeat_at or run.created_at) <= stalled_before:
            send_run(session, run.id)
            counts["runs_resent"] += 1
    session.flush()
    stalled = set(stages) | {
        stage
        for stage, table in STAGE_ROWS.items()
        if (last := _last_row_at(session, table)) is None or as_utc(last) <= stalled_before
    }
    open_ids = session.scalars(
        select(Iteration.id)
        .where(Iteration.status != IterationStatus.DONE)
        .order_by(Iteration.number)
    ).all()
    for iteration_id in open_ids:
        counts.update(_reconcile_iteration(session, iteration_id, stalled))
    return {key: value for key, value in counts.items() if value}


@celery.task(name=RECONCILE)
def reconcile_store() -> dict[str, int]:
    """The scheduled reconcile (`rewardranker beat`). Beat sends each copy with an
    expiry of one interval, so a worker that was busy runs no backlog of them."""
    with session_scope() as session:
        return reconcile(session)


@worker_ready.connect
def reconcile_on_worker_start(sender: Any, **_: Any) -> None:
    """A worker that starts most likely replaces one that died. It reclaims at once
    the trainings of dead workers on its host, instead of waiting for their
    heartbeats to go stale, and re-sends its own stages' unfinished work, which the
    dead worker may have held unacknowledged (Redis would redeliver it only after
    its visibility timeout)."""
    consumed = set(sender.app.amqp.queues.consume_from or ())
    try:
        with session_scope() as session:
            counts = reconcile(session, host=owner()[0], stages=consumed & STAGE_ROWS.keys())
    except Exception:  # the store is down: the scheduled reconcile will do it
        log.warning("could not reconcile at start", exc_info=True)
        return
    if counts:
        log.warning("reconciled at start: %s", counts)


def _last_row_at(session: Session, table: type) -> datetime | None:
    # By primary key, not created_at: newest first through the index, a row read.
    return session.scalar(select(table.created_at).order_by(table.id.desc()).limit(1))


def _reconcile_iteration(session: Session, iteration_id: int, stalled: set[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    iteration = session.get(Iteration, iteration_id)
    if iteration.status == IterationStatus.GENERATING and stalled:
        missing = [
            p for p in iteration.params["problem_ids"] if p not in iteration.params["generated"]
        ]
        if "generation" in stalled:
            counts["batches"] += send_generation(session, iteration, missing)
        in_iteration = Candidate.iteration_id == iteration_id
        unexecuted = session.scalars(
            select(Candidate.problem_id)
            .distinct()
            .outerjoin(Execution)
            .where(in_iteration, Execution.id.is_(None))
        ).all()
        if "execution" in stalled:
            after_generation(session, iteration_id, unexecuted)
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
        if "labeling" in stalled:
            for problem_id in set(unlabelled) - set(unexecuted):
                after_execution(session, iteration_id, problem_id)
                counts["labels"] += 1
    counts.update(_reconcile_evaluations(session, iteration_id, stalled))
    advance_iteration(session, iteration_id)
    return counts


def _reconcile_evaluations(session: Session, iteration_id: int, stalled: set[str]) -> Counter[str]:
    """Re-send what the iteration's running evaluations lack in stalled stages, then
    finish those that lack nothing."""
    counts: Counter[str] = Counter()
    for evaluation in session.scalars(
        select(Evaluation).where(
            Evaluation.iteration_id == iteration_id, Evaluation.status != EvaluationStatus.DONE
        )
    ).all():
        missing = missing_work(session, evaluation)
        if "generation" in stalled:
            counts["evaluation_batches"] += send_draws(session, evaluation, missing["generate"])
        if "execution" in stalled:
            after_drawing(session, evaluation.id, missing["execute"])
            counts["evaluation_executions"] += len(missing["execute"])
        if "labeling" in stalled:
            for problem_id in missing["score"]:
                after_drawn_execution(session, evaluation.id, problem_id)
            counts["evaluation_scores"] += len(missing["score"])
        finish_evaluation(session, evaluation.id)
    return counts
