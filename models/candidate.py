from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, BigId, CreatedAt, str_enum
from models.enums import Origin, Verdict
from models.problem import Problem


class Candidate(CreatedAt, Base):
    """One program proposed for a problem. `code` is the whole program the tests
    are appended to (prompt + completion for completion-style problems)."""

    __tablename__ = "candidates"
    __table_args__ = (
        # Re-running a generation batch must never store the same program twice.
        UniqueConstraint("problem_id", "content_hash"),
        Index("ix_candidates_iteration_id_problem_id", "iteration_id", "problem_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    problem_id: Mapped[int] = mapped_column(ForeignKey("problems.id", ondelete="CASCADE"))
    code: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    origin: Mapped[Origin] = mapped_column(str_enum(Origin))
    generator_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL"), index=True
    )
    iteration_id: Mapped[int | None] = mapped_column(
        ForeignKey("iterations.id", ondelete="SET NULL")
    )
    num_tokens: Mapped[int | None] = mapped_column(Integer)

    problem: Mapped[Problem] = relationship(lazy="raise")
    execution: Mapped["Execution | None"] = relationship(back_populates="candidate", lazy="raise")


class Execution(CreatedAt, Base):
    """The sandbox's verdict on one candidate. One row per candidate: re-running
    an execution task finds the row and does nothing."""

    __tablename__ = "executions"
    __table_args__ = (
        # Verdict histograms per iteration are index-only scans on this.
        Index("ix_executions_iteration_id_verdict", "iteration_id", "verdict"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    candidate_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("candidates.id", ondelete="CASCADE"), unique=True
    )
    # Copied from the candidate when the verdict is recorded, so the analysis
    # queries by iteration need no join over the two largest tables.
    iteration_id: Mapped[int | None] = mapped_column(
        ForeignKey("iterations.id", ondelete="SET NULL")
    )
    verdict: Mapped[Verdict] = mapped_column(str_enum(Verdict), index=True)
    passed: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[float] = mapped_column(Float, default=0.0)
    peak_memory_kb: Mapped[int | None] = mapped_column(Integer)
    stdout_tail: Mapped[str] = mapped_column(Text, default="")
    stderr_tail: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    # The judge saw the program forge or tamper with its test run (the verdict
    # is then WRONG_ANSWER): reward-hacking attempts, the hardest negatives.
    tampered: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    tamper_reason: Mapped[str | None] = mapped_column(Text)

    candidate: Mapped[Candidate] = relationship(back_populates="execution", lazy="raise")


class Score(CreatedAt, Base):
    """A reward model version's score for a candidate."""

    __tablename__ = "scores"
    __table_args__ = (
        UniqueConstraint("candidate_id", "reward_model_version_id"),
        # Score order under one chosen version.
        Index("ix_scores_reward_model_version_id_score", "reward_model_version_id", "score"),
        # Score order when each candidate shows its own iteration's score, a
        # different version per iteration (app.queries.shown_score).
        Index("ix_scores_score_candidate_id", "score", "candidate_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    candidate_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("candidates.id", ondelete="CASCADE")
    )
    reward_model_version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE")
    )
    score: Mapped[float] = mapped_column(Float)


class HardNegativeLabel(CreatedAt, Base):
    """A failing candidate that reward model `reward_model_version_id` ranked
    too high: it goes back into that model's successor's training pairs."""

    __tablename__ = "hard_negative_labels"
    __table_args__ = (
        UniqueConstraint("candidate_id", "reward_model_version_id"),
        Index("ix_hard_negative_labels_iteration_id", "iteration_id"),
        Index("ix_hard_negative_labels_reward_model_version_id", "reward_model_version_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    candidate_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("candidates.id", ondelete="CASCADE")
    )
    # NULL while no reward model exists yet (the warm-start iteration).
    reward_model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE")
    )
    iteration_id: Mapped[int | None] = mapped_column(
        ForeignKey("iterations.id", ondelete="SET NULL")
    )
    rule: Mapped[str] = mapped_column(String(64))
