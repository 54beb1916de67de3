from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, BigId, CreatedAt, str_enum
from models.enums import EvaluationStatus


class Evaluation(CreatedAt, Base):
    """A generator and a reward model measured on the held-out (`eval`) problems.

    `number` 0 is the baseline (the base generator with the warm-start reward
    model); number N measures the models that iteration N left behind.
    """

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(primary_key=True)
    number: Mapped[int] = mapped_column(Integer, unique=True)
    iteration_id: Mapped[int] = mapped_column(ForeignKey("iterations.id"), index=True)
    generator_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    reward_model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    status: Mapped[EvaluationStatus] = mapped_column(
        str_enum(EvaluationStatus), default=EvaluationStatus.RUNNING
    )
    # samples per problem, generation settings, problem_ids, and `generated`
    # (the problems whose samples are stored): what a resume needs.
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    finished_at: Mapped[datetime | None]


class EvaluationSample(Base):
    """Sample `sample_index` of a held-out problem in one evaluation.

    Programs are stored once per problem (a candidate with origin `evaluation`,
    executed once, scored once per reward model), so two evaluations, or two
    samples of one, that draw the same program share its candidate; this row
    keeps every draw, which pass@k's estimator needs.
    """

    __tablename__ = "evaluation_samples"
    __table_args__ = (
        UniqueConstraint("evaluation_id", "problem_id", "sample_index"),
        Index("ix_evaluation_samples_candidate_id", "candidate_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"))
    problem_id: Mapped[int] = mapped_column(ForeignKey("problems.id", ondelete="CASCADE"))
    sample_index: Mapped[int] = mapped_column(Integer)
    candidate_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("candidates.id", ondelete="CASCADE")
    )
