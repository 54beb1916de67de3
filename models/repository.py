"""Bulk write paths of the candidate store. They flush, never commit: the caller
owns the transaction. Both are idempotent, so a rerun of a batch is harmless."""

import hashlib
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Insert, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from models.candidate import Candidate, Execution

# SQLite allows 32766 bound parameters per statement; candidates bind 7 each.
_CHUNK = 2000


def content_hash(code: str) -> str:
    """Identity of a program for deduplication: whitespace at the ends does not count."""
    return hashlib.sha256(code.strip().encode()).hexdigest()


def dialect_insert(session: Session, model: type) -> Insert:
    """INSERT with the dialect's ON CONFLICT support (Postgres or SQLite)."""
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(model)


def insert_candidates(session: Session, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Insert candidates, skipping programs already stored for their problem.

    Each row needs `problem_id`, `code` and `origin`; `content_hash` is filled in.
    Returns the id of every row, in order, whether it was new or already there.
    """
    rows = [{**row, "content_hash": content_hash(row["code"])} for row in rows]
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start : start + _CHUNK]
        session.execute(
            dialect_insert(session, Candidate).on_conflict_do_nothing(
                index_elements=["problem_id", "content_hash"]
            ),
            chunk,
        )
    keys = list({(row["problem_id"], row["content_hash"]) for row in rows})
    ids: dict[tuple[int, str], int] = {}
    for start in range(0, len(keys), _CHUNK):
        found = session.execute(
            select(Candidate.problem_id, Candidate.content_hash, Candidate.id).where(
                tuple_(Candidate.problem_id, Candidate.content_hash).in_(keys[start : start + _CHUNK])
            )
        )
        ids.update({(p, h): i for p, h, i in found})
    return [ids[(row["problem_id"], row["content_hash"])] for row in rows]


def insert_executions(session: Session, rows: Sequence[dict[str, Any]]) -> int:
    """Record verdicts; a candidate that already has one keeps it. Returns rows written."""
    written = 0
    for start in range(0, len(rows), _CHUNK):
        result = session.execute(
            dialect_insert(session, Execution)
            .on_conflict_do_nothing(index_elements=["candidate_id"])
            .returning(Execution.id),
            list(rows[start : start + _CHUNK]),
        )
        written += len(result.all())
    return written
