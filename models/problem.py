from typing import Any

from sqlalchemy import String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, CreatedAt, str_enum
from models.enums import Language


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

    @property
    def has_tests(self) -> bool:
        return bool(self.tests.strip()) or bool(self.io_cases)
