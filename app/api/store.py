"""Read endpoints over the store (problems, candidates, iterations, models) and problem import."""

from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Path, Query
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app import queries
from app.api.deps import DbSession, StreamSession
from app.api.export import csv_stream, parquet_stream
from app.api.schemas import (
    CandidatePageOut,
    IterationOut,
    ModelOut,
    ProblemDetail,
    ProblemImportOut,
    ProblemOut,
    Text,
)
from app.problem_import import ProblemFormatError, parse_problem_line, upsert_problems
from models import Problem
from models.enums import Language, ModelKind, Split
from models.settings import get_settings

router = APIRouter()

INT32 = queries.INT32
INT64 = 2**63 - 1
MAX_PROBLEMS_PER_POST = 1000


class CandidateFormat(StrEnum):
    JSON = "json"
    CSV = "csv"
    PARQUET = "parquet"


@router.get("/problems", response_model=list[ProblemOut], tags=["problems"])
def get_problems(
    session: DbSession,
    language: Language | None = None,
    source: Annotated[Text | None, Query(max_length=64)] = None,
    split: Split | None = None,
    after_id: Annotated[
        int | None, Query(ge=0, le=INT32, description="Last id of the previous page.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """Problems in id order."""
    return queries.list_problems(
        session, language=language, source=source, split=split, after_id=after_id, limit=limit
    )


@router.get("/problems/{problem_id}", response_model=ProblemDetail, tags=["problems"])
def get_problem(
    session: DbSession, problem_id: Annotated[int, Path(ge=1, le=INT32)]
) -> dict[str, Any]:
    problem = session.get(Problem, problem_id)
    if problem is None:
        raise HTTPException(404, f"no problem {problem_id}")
    return queries.problem_dict(problem, full=True)


def _fits_the_store(record: dict[str, Any], row: dict[str, Any], line: int) -> None:
    """Reject what PostgreSQL would refuse (too long for the column, NUL characters)
    as a 422 here rather than a database error later."""
    for name, value in row.items():
        length = getattr(Problem.__table__.c[name].type, "length", None)
        if isinstance(value, str) and length is not None and len(value) > length:
            raise ProblemFormatError(line, name, f"longer than {length} characters")
    if _has_nul(record):
        raise ProblemFormatError(line, "<object>", "strings must not contain NUL characters")


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False


@router.post("/problems", response_model=ProblemImportOut, status_code=201, tags=["problems"])
def post_problems(
    session: DbSession,
    problems: Annotated[
        list[dict[str, Any]],
        Body(
            min_length=1,
            max_length=MAX_PROBLEMS_PER_POST,
            description="Problems in the native or MultiPL-E JSONL format (README, Problems), "
            "one object per problem. All are checked before any is stored.",
        ),
    ],
    source: Annotated[Text, Query(min_length=1, max_length=64)] = "api",
) -> dict[str, int]:
    """Add problems; continuous mode picks them up. Re-posting one is harmless."""
    rows, errors = [], []
    for number, record in enumerate(problems, start=1):
        try:
            row = parse_problem_line(record, number, default_source=source)
            _fits_the_store(record, row, number)
            rows.append(row)
        except ProblemFormatError as error:
            errors.append({"index": number, "field": error.field, "msg": str(error)})
    if errors:
        raise HTTPException(422, errors)
    report = upsert_problems(session, rows, eval_fraction=get_settings().eval_fraction)
    return {"imported": report.imported, "unchanged": report.unchanged}


@router.get(
    "/candidates",
    response_model=CandidatePageOut,
    tags=["candidates"],
    responses={200: {"content": {"text/csv": {}, "application/vnd.apache.parquet": {}}}},
)
async def get_candidates(
    session: StreamSession,
    flt: Annotated[queries.CandidateFilter, Query()],
    cursor: Annotated[
        str | None, Query(max_length=200, description="next_cursor of the previous page.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    format: Annotated[
        CandidateFormat,
        Query(
            description="json: one page; csv and parquet: every matching row "
            "(after `cursor`), streamed."
        ),
    ] = CandidateFormat.JSON,
) -> Any:
    """Candidates with filters, sorting and keyset pagination, or their export."""
    # Async, with the queries in one worker thread: a sync endpoint with a sync
    # session dependency hands each request to a worker thread three times
    # before it answers, and on a busy machine each hand-over waits for a CPU.
    if format is CandidateFormat.JSON:
        page = await run_in_threadpool(
            queries.list_candidates, session, flt, limit=limit, cursor=cursor
        )
        return {
            "items": page.items,
            "next_cursor": page.next_cursor,
            "reward_model_version_id": page.reward_model_version_id,
        }
    if cursor:
        queries.decode_cursor(cursor, flt.sort)  # a bad cursor is a 400 before streaming starts
    chunks = queries.iter_candidates(session, flt, cursor=cursor)
    if format is CandidateFormat.CSV:
        return StreamingResponse(
            csv_stream(chunks),
            media_type="text/csv",
            headers={"content-disposition": 'attachment; filename="candidates.csv"'},
        )
    return StreamingResponse(
        parquet_stream(chunks),
        media_type="application/vnd.apache.parquet",
        headers={"content-disposition": 'attachment; filename="candidates.parquet"'},
    )


@router.get("/candidates/{candidate_id}", tags=["candidates"])
def get_candidate(
    session: DbSession, candidate_id: Annotated[int, Path(ge=1, le=INT64)]
) -> dict[str, Any]:
    """Code, execution, scores, hard-negative labels and lineage of one candidate."""
    detail = queries.candidate_detail(session, candidate_id)
    if detail is None:
        raise HTTPException(404, f"no candidate {candidate_id}")
    return detail


@router.get("/iterations", response_model=list[IterationOut], tags=["iterations"])
def get_iterations(session: DbSession) -> list[dict[str, Any]]:
    """Every iteration with its metrics, candidate and hard-negative counts and verdict mix."""
    return queries.iteration_summaries(session)


@router.get("/iterations/{number}", tags=["iterations"])
def get_iteration(
    session: DbSession, number: Annotated[int, Path(ge=0, le=INT32)]
) -> dict[str, Any]:
    """One iteration, its dataset version and its training runs."""
    detail = queries.iteration_detail(session, number)
    if detail is None:
        raise HTTPException(404, f"no iteration {number}")
    return detail


@router.get("/evaluations", tags=["evaluations"])
def get_evaluations(session: DbSession) -> dict[str, Any]:
    """The paper's table: pass@1 on held-out problems per evaluation, generator alone
    and reranked, per language and over all, with 95% bootstrap intervals."""
    return queries.held_out_table(session)


@router.get("/models", response_model=list[ModelOut], tags=["models"])
def get_models(session: DbSession, kind: ModelKind | None = None) -> list[dict[str, Any]]:
    """Registered generator and reward model versions, oldest first."""
    return queries.list_models(session, kind)
