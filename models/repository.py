"""Bulk write paths of the candidate store. They flush, never commit: the caller
owns the transaction. Both are idempotent, so a rerun of a batch is harmless."""

import hashlib
from collections.abc import Sequence
from enum import Enum
from typing import Any

from sqlalchemy import Insert, Row, Table, select, text, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from models.candidate import Candidate, Execution

# SQLite allows 32766 bound parameters per statement; a candidate binds 7.
_SQLITE_CHUNK = 2000
_PG_CHUNK = 10_000


def content_hash(code: str) -> str:
    """Identity of a program for deduplication: whitespace at the ends does not count."""
    return hashlib.sha256(code.strip().encode()).hexdigest()


def dialect_insert(session: Session, model: type) -> Insert:
    """A Core INSERT on the model's table with the dialect's ON CONFLICT support."""
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(model.__table__)


def _complete(table: Table, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill in every column the rows leave out with its default, as INSERT would."""
    defaults: dict[str, Any] = {}
    for column in table.columns:
        if column.primary_key:
            continue
        default = column.default
        if default is None:
            defaults[column.name] = None
        elif default.is_callable:
            defaults[column.name] = default.arg(None)  # type: ignore[union-attr]
        else:
            defaults[column.name] = default.arg  # type: ignore[union-attr]
    return [{**defaults, **row} for row in rows]


def _insert_ignoring_conflicts(
    session: Session, model: type, rows: list[dict[str, Any]], conflict: list[str], returning: list
) -> list[Row]:
    """INSERT ... ON CONFLICT DO NOTHING RETURNING, in chunks.

    On Postgres the rows travel as one array per column through `unnest`: one
    short statement per chunk instead of a VALUES list with thousands of bound
    parameters, which the server parses several times slower."""
    if not rows:
        return []
    table: Table = model.__table__
    rows = _complete(table, rows)
    out: list[Row] = []
    if session.get_bind().dialect.name != "postgresql":
        statement = (
            dialect_insert(session, model)
            .on_conflict_do_nothing(index_elements=conflict)
            .returning(*returning)
        )
        for start in range(0, len(rows), _SQLITE_CHUNK):
            out.extend(session.execute(statement, rows[start : start + _SQLITE_CHUNK]))
        return out
    names = list(rows[0])
    arrays = ", ".join(
        f"CAST(:{name} AS {table.c[name].type.compile(dialect=postgresql.dialect())}[])"
        for name in names
    )
    returned = ", ".join(column.name for column in returning)
    statement = text(
        f"INSERT INTO {table.name} ({', '.join(names)}) SELECT * FROM unnest({arrays}) "
        f"ON CONFLICT ({', '.join(conflict)}) DO NOTHING RETURNING {returned}"
    )
    for start in range(0, len(rows), _PG_CHUNK):
        chunk = rows[start : start + _PG_CHUNK]
        params = {name: [_plain(row[name]) for row in chunk] for name in names}
        out.extend(session.execute(statement, params))
    return out


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def insert_candidates(session: Session, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Insert candidates, skipping programs already stored for their problem.

    Each row needs `problem_id`, `code` and `origin`; `content_hash` is filled in.
    Returns the id of every row, in order, whether it was new or already there.
    """
    rows = [{**row, "content_hash": content_hash(row["code"])} for row in rows]
    inserted = _insert_ignoring_conflicts(
        session,
        Candidate,
        rows,
        ["problem_id", "content_hash"],
        [Candidate.id, Candidate.problem_id, Candidate.content_hash],
    )
    ids = {(p, h): i for i, p, h in inserted}
    # Rows that were already stored (a rerun) returned nothing: look them up.
    missing = list({(row["problem_id"], row["content_hash"]) for row in rows} - ids.keys())
    for start in range(0, len(missing), _SQLITE_CHUNK):
        found = session.execute(
            select(Candidate.problem_id, Candidate.content_hash, Candidate.id).where(
                tuple_(Candidate.problem_id, Candidate.content_hash).in_(
                    missing[start : start + _SQLITE_CHUNK]
                )
            )
        )
        ids.update({(p, h): i for p, h, i in found})
    return [ids[(row["problem_id"], row["content_hash"])] for row in rows]


def insert_executions(session: Session, rows: Sequence[dict[str, Any]]) -> int:
    """Record verdicts; a candidate that already has one keeps it. Returns rows written.

    Each row needs `candidate_id` and `verdict`; `iteration_id` is copied from
    the candidate."""
    candidate_ids = [row["candidate_id"] for row in rows]
    iteration_of: dict[int, int | None] = {}
    for start in range(0, len(candidate_ids), _SQLITE_CHUNK):
        found = session.execute(
            select(Candidate.id, Candidate.iteration_id).where(
                Candidate.id.in_(candidate_ids[start : start + _SQLITE_CHUNK])
            )
        )
        iteration_of.update({candidate_id: iteration_id for candidate_id, iteration_id in found})
    rows = [{**row, "iteration_id": iteration_of.get(row["candidate_id"])} for row in rows]
    inserted = _insert_ignoring_conflicts(
        session, Execution, rows, ["candidate_id"], [Execution.id]
    )
    return len(inserted)
