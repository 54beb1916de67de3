from datetime import datetime
from typing import Any

from sqlalchemy import Float, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, CreatedAt, str_enum
from models.enums import IterationStatus, ModelKind, ModelStatus, RunKind, RunStatus


class ModelVersion(CreatedAt, Base):
    """A registered generator or reward model. Rows are written only after the
    weights are complete on disk, so every row points at a usable model."""

    __tablename__ = "model_versions"
    __table_args__ = (Index("ix_model_versions_kind_created_at", "kind", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[ModelKind] = mapped_column(str_enum(ModelKind))
    name: Mapped[str] = mapped_column(String(200))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    base_model: Mapped[str] = mapped_column(String(500))  # what the weights started from
    path: Mapped[str | None] = mapped_column(String(1000))  # None: the base model as is
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[ModelStatus] = mapped_column(str_enum(ModelStatus), default=ModelStatus.READY)


class Iteration(CreatedAt, Base):
    """One turn of the flywheel: generate, execute, label, retrain."""

    __tablename__ = "iterations"

    id: Mapped[int] = mapped_column(primary_key=True)
    number: Mapped[int] = mapped_column(Integer, unique=True)
    status: Mapped[IterationStatus] = mapped_column(
        str_enum(IterationStatus), default=IterationStatus.OPEN
    )
    generator_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    reward_model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    finished_at: Mapped[datetime | None]


class DatasetVersion(CreatedAt, Base):
    """The exported, DVC-tracked training data of one iteration."""

    __tablename__ = "dataset_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    iteration_id: Mapped[int] = mapped_column(ForeignKey("iterations.id"), unique=True)
    dvc_tag: Mapped[str | None] = mapped_column(String(100))
    git_rev: Mapped[str | None] = mapped_column(String(64))
    md5: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1000))
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)


class TrainingRun(CreatedAt, Base):
    """A reward-model or policy training, started by a short task and tracked here
    so that no long job hides inside one unacknowledged broker message."""

    __tablename__ = "training_runs"
    __table_args__ = (
        # At most one queued-or-running run per kind: the database, not luck,
        # stops two labelers from triggering the same retraining.
        Index(
            "uq_training_runs_active_kind",
            "kind",
            unique=True,
            postgresql_where=text("status IN ('queued', 'running')"),
            sqlite_where=text("status IN ('queued', 'running')"),
        ),
        Index("ix_training_runs_status", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[RunKind] = mapped_column(str_enum(RunKind))
    status: Mapped[RunStatus] = mapped_column(str_enum(RunStatus), default=RunStatus.QUEUED)
    iteration_id: Mapped[int | None] = mapped_column(ForeignKey("iterations.id"))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text)
    result_model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    # Who trains it now: the host and pid of the process that claimed it, so that a
    # worker starting on that host can tell at once that the owner died.
    owner_host: Mapped[str | None] = mapped_column(String(255))
    owner_pid: Mapped[int | None] = mapped_column(Integer)
    # Claims so far. A claim's number fences its worker: heartbeats, success and
    # failure count only for the attempt that holds the run now.
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    resumed_from_step: Mapped[int | None] = mapped_column(Integer)  # this attempt's checkpoint
    checkpoint_step: Mapped[int | None] = mapped_column(Integer)  # the newest one, any attempt's
    # Lost attempts in a row that saved no newer checkpoint than they resumed
    # from: RR_RUN_MAX_ATTEMPTS caps these, so a run that keeps moving keeps going.
    stalled_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
