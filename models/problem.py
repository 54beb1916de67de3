import hashlib
from typing import Any

from sqlalchemy import String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, CreatedAt, str_enum
from models.enums import Language, Split


def split_for(source: str, task_id: str, eval_fraction: float) -> Split:
    """The held-out side of a problem, from a stable hash of `(source, task_id)`.

    The same problem lands on the same side in every store and every run, and a
    larger `eval_fraction` only moves problems from train to eval, never back.
    The language is left out so that a task translated into several languages
    (MultiPL-E) is held out in all of them or in none.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    digest = hashlib.sha256(f"{source}\x00{task_id}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return Split.EVAL if position < eval_fraction else Split.TRAIN


class Problem(CreatedAt, Base):
    """A programming task with the tests that decide whether a candidate is correct."""

    __tablename__ = "problems"
    __table_args__ = (UniqueConstraint("source", "language", "task_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    source: Mapped[str] = mapped_column(String(64))  # e.g. "humaneval", "multipl-e", a file stem
    task_id: Mapped[str] = mapped_column(String(200))
    language: Mapped[Language] = mapped_column(str_enum(Language))
    prompt: Mapped[str] = mapped_column(Text)
    # Test program appended after the candidate (MultiPL-E convention); may be
    # empty when the problem is judged by stdin/stdout cases only.
    tests: Mapped[str] = mapped_column(Text, default="")
    entry_point: Mapped[str | None] = mapped_column(String(200))
    reference_solution: Mapped[str | None] = mapped_column(Text)
    io_cases: Mapped[list[Any] | None]  # [{"input": ..., "output": ...}]
    # Held-out problems (`eval`) are only ever sampled to evaluate an iteration.
    split: Mapped[Split] = mapped_column(
        str_enum(Split), default=Split.TRAIN, server_default=Split.TRAIN.value, index=True
    )

    @property
    def has_tests(self) -> bool:
        return bool(self.tests.strip()) or bool(self.io_cases)
