"""Reconcile: re-enqueue whatever the store shows as unfinished. The broker is never
trusted for completeness (a lost Redis, a killed worker, the embedded broker)."""

from collections import Counter
from datetime import datetime, timedelta

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from models import Candidate, Evaluation, Execution, Iteration, Score, TrainingRun
from models.base import utcnow
from models.enums import EvaluationStatus, IterationStatus, RunStatus, Verdict
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
from workers.runs import fail_run, send_run


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
            send_run(session, run.id)
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
        counts["batches"] += send_generation(session, iteration, missing)
        in_iteration = Candidate.iteration_id == iteration_id
        unexecuted = session.scalars(
            select(Candidate.problem_id)
            .distinct()
            .outerjoin(Execution)
            .where(in_iteration, Execution.id.is_(None))
        ).all()
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
        for problem_id in set(unlabelled) - set(unexecuted):
            after_execution(session, iteration_id, problem_id)
            counts["labels"] += 1
    counts.update(_reconcile_evaluations(session, iteration_id))
    advance_iteration(session, iteration_id)
    return counts


def _reconcile_evaluations(session: Session, iteration_id: int) -> Counter[str]:
    """Re-send what the iteration's running evaluations lack, then finish those
    that lack nothing."""
    counts: Counter[str] = Counter()
    for evaluation in session.scalars(
        select(Evaluation).where(
            Evaluation.iteration_id == iteration_id, Evaluation.status != EvaluationStatus.DONE
        )
    ).all():
        missing = missing_work(session, evaluation)
        counts["evaluation_batches"] += send_draws(session, evaluation, missing["generate"])
        after_drawing(session, evaluation.id, missing["execute"])
        counts["evaluation_executions"] += len(missing["execute"])
        for problem_id in missing["score"]:
            after_drawn_execution(session, evaluation.id, problem_id)
        counts["evaluation_scores"] += len(missing["score"])
        finish_evaluation(session, evaluation.id)
    return counts
