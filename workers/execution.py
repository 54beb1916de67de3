"""The `execution` queue: run a problem's candidates of an iteration, or the programs
an evaluation drew, in the sandbox."""

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Candidate, Execution, Problem
from models.db import session_scope
from models.enums import Verdict
from models.repository import insert_executions

# Imported here, once, in the worker's parent process before it forks its pool.
from pipelines.sandbox import Job, run_batch
from workers.celery_app import RETRY, celery
from workers.evaluation import drawn
from workers.iteration import after_drawn_execution, after_execution
from workers.names import EXECUTE_DRAWN, EXECUTE_PROBLEM, NOOP

SANDBOX_ATTEMPTS = 3
"""Runs of a candidate that keeps ending in SANDBOX_ERROR before it is recorded as such."""


def execute_candidates(session: Session, iteration_id: int, problem_id: int) -> int:
    """Run the problem's unexecuted candidates of this iteration; returns executions written."""
    problem = session.get(Problem, problem_id)
    candidates = session.scalars(
        select(Candidate)
        .outerjoin(Execution, Execution.candidate_id == Candidate.id)
        .where(
            Candidate.iteration_id == iteration_id,
            Candidate.problem_id == problem_id,
            Execution.id.is_(None),
        )
        .order_by(Candidate.id)
    ).all()
    if not candidates:
        return 0
    results = run_with_retries([c.code for c in candidates], problem)
    return insert_executions(
        session,
        [
            execution_row(candidate.id, result, attempts)
            for candidate, (result, attempts) in zip(candidates, results, strict=True)
        ],
    )


def execution_row(candidate_id: int, result: Any, attempts: int) -> dict[str, Any]:
    """An `executions` row from a sandbox `ExecutionResult`."""
    return {
        "candidate_id": candidate_id,
        "verdict": result.verdict,
        "passed": result.passed,
        "total": result.total,
        "duration_ms": result.duration_ms,
        "peak_memory_kb": result.peak_memory_kb,
        "stdout_tail": result.stdout_tail,
        "stderr_tail": result.stderr_tail,
        "attempts": attempts,
        "tampered": result.tampered,
        "tamper_reason": result.tamper_reason,
    }


def run_with_retries(codes: list[str], problem: Problem) -> list[tuple[Any, int]]:
    """Sandbox results with the attempts each took: SANDBOX_ERROR (the sandbox failed,
    not the program) is retried up to SANDBOX_ATTEMPTS runs, then kept as it is."""

    def job(code: str) -> Job:
        return Job(
            language=str(problem.language),
            code=code,
            tests=problem.tests,
            io_cases=problem.io_cases,
        )

    outcome: list[tuple[Any, int]] = [(result, 1) for result in run_batch([job(c) for c in codes])]
    for attempt in range(2, SANDBOX_ATTEMPTS + 1):
        again = [
            i for i, (result, _) in enumerate(outcome) if result.verdict == Verdict.SANDBOX_ERROR
        ]
        if not again:
            break
        for i, result in zip(again, run_batch([job(codes[i]) for i in again]), strict=True):
            outcome[i] = (result, attempt)
    return outcome


def execute_drawn_programs(session: Session, evaluation_id: int, problem_id: int) -> int:
    """Judge the problem's programs an evaluation drew that have no verdict yet (a
    program drawn twice is run once); returns executions written."""
    candidates = session.scalars(
        select(Candidate)
        .outerjoin(Execution, Execution.candidate_id == Candidate.id)
        .where(Candidate.id.in_(drawn(evaluation_id, problem_id)), Execution.id.is_(None))
        .order_by(Candidate.id)
    ).all()
    if not candidates:
        return 0
    results = run_with_retries([c.code for c in candidates], session.get(Problem, problem_id))
    return insert_executions(
        session,
        [
            execution_row(candidate.id, result, attempts)
            for candidate, (result, attempts) in zip(candidates, results, strict=True)
        ],
    )


@celery.task(name=EXECUTE_DRAWN, **RETRY)
def execute_drawn(evaluation_id: int, problem_id: int) -> None:
    with session_scope() as session:
        execute_drawn_programs(session, evaluation_id, problem_id)
        after_drawn_execution(session, evaluation_id, problem_id)


@celery.task(name=EXECUTE_PROBLEM, **RETRY)
def execute_problem(iteration_id: int, problem_id: int) -> None:
    with session_scope() as session:
        execute_candidates(session, iteration_id, problem_id)
        after_execution(session, iteration_id, problem_id)


@celery.task(name=NOOP)
def noop() -> None:
    """Does nothing: measures the broker's per-task cost (bench) and checks a queue."""
