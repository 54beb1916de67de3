"""candidate store

Revision ID: 3ca71c43b82e
Revises:
Create Date: 2026-11-25 21:55:08.407072
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3ca71c43b82e"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum("generator", "reward", name="modelkind", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("base_model", sa.String(length=500), nullable=False),
        sa.Column("path", sa.String(length=1000), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column(
            "status",
            sa.Enum("ready", "retired", name="modelstatus", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["model_versions.id"],
            name=op.f("fk_model_versions_parent_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
    )
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_model_versions_kind_created_at", ["kind", "created_at"], unique=False
        )

    op.create_table(
        "problems",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("task_id", sa.String(length=200), nullable=False),
        sa.Column(
            "language",
            sa.Enum(
                "python",
                "cpp",
                "java",
                "javascript",
                "typescript",
                "php",
                "csharp",
                "bash",
                name="language",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("tests", sa.Text(), nullable=False),
        sa.Column("entry_point", sa.String(length=200), nullable=True),
        sa.Column("reference_solution", sa.Text(), nullable=True),
        sa.Column("io_cases", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_problems")),
        sa.UniqueConstraint(
            "source", "language", "task_id", name=op.f("uq_problems_source_language_task_id")
        ),
    )
    op.create_table(
        "iterations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "open",
                "generating",
                "training",
                "done",
                name="iterationstatus",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("generator_version_id", sa.Integer(), nullable=True),
        sa.Column("reward_model_version_id", sa.Integer(), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["generator_version_id"],
            ["model_versions.id"],
            name=op.f("fk_iterations_generator_version_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["reward_model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_iterations_reward_model_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_iterations")),
        sa.UniqueConstraint("number", name=op.f("uq_iterations_number")),
    )
    op.create_table(
        "candidates",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("problem_id", sa.Integer(), nullable=False),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column(
            "origin",
            sa.Enum(
                "generator",
                "mutation",
                "reference",
                "request",
                name="origin",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("generator_version_id", sa.Integer(), nullable=True),
        sa.Column("iteration_id", sa.Integer(), nullable=True),
        sa.Column("num_tokens", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["generator_version_id"],
            ["model_versions.id"],
            name=op.f("fk_candidates_generator_version_id_model_versions"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["iteration_id"],
            ["iterations.id"],
            name=op.f("fk_candidates_iteration_id_iterations"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["problem_id"],
            ["problems.id"],
            name=op.f("fk_candidates_problem_id_problems"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_candidates")),
        sa.UniqueConstraint(
            "problem_id", "content_hash", name=op.f("uq_candidates_problem_id_content_hash")
        ),
    )
    with op.batch_alter_table("candidates", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_candidates_generator_version_id"), ["generator_version_id"], unique=False
        )
        batch_op.create_index(
            "ix_candidates_iteration_id_problem_id", ["iteration_id", "problem_id"], unique=False
        )

    op.create_table(
        "dataset_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("iteration_id", sa.Integer(), nullable=False),
        sa.Column("dvc_tag", sa.String(length=100), nullable=True),
        sa.Column("git_rev", sa.String(length=64), nullable=True),
        sa.Column("md5", sa.String(length=64), nullable=True),
        sa.Column("path", sa.String(length=1000), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["iteration_id"],
            ["iterations.id"],
            name=op.f("fk_dataset_versions_iteration_id_iterations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset_versions")),
        sa.UniqueConstraint("iteration_id", name=op.f("uq_dataset_versions_iteration_id")),
    )
    op.create_table(
        "training_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum("reward", "policy", name="runkind", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column(
            "status",
            sa.Enum(
                "queued",
                "running",
                "succeeded",
                "failed",
                name="runstatus",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("iteration_id", sa.Integer(), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result_model_version_id", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["iteration_id"],
            ["iterations.id"],
            name=op.f("fk_training_runs_iteration_id_iterations"),
        ),
        sa.ForeignKeyConstraint(
            ["result_model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_training_runs_result_model_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_runs")),
    )
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.create_index("ix_training_runs_status", ["status"], unique=False)
        batch_op.create_index(
            "uq_training_runs_active_kind",
            ["kind"],
            unique=True,
            postgresql_where=sa.text("status IN ('queued', 'running')"),
            sqlite_where=sa.text("status IN ('queued', 'running')"),
        )

    op.create_table(
        "executions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("candidate_id", sa.BigInteger(), nullable=False),
        sa.Column("iteration_id", sa.Integer(), nullable=True),
        sa.Column(
            "verdict",
            sa.Enum(
                "OK",
                "WRONG_ANSWER",
                "RUNTIME_ERROR",
                "TIME_LIMIT",
                "MEMORY_LIMIT",
                "OUTPUT_LIMIT",
                "COMPILE_ERROR",
                "SANDBOX_ERROR",
                name="verdict",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("passed", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("peak_memory_kb", sa.Integer(), nullable=True),
        sa.Column("stdout_tail", sa.Text(), nullable=False),
        sa.Column("stderr_tail", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["candidate_id"],
            ["candidates.id"],
            name=op.f("fk_executions_candidate_id_candidates"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["iteration_id"],
            ["iterations.id"],
            name=op.f("fk_executions_iteration_id_iterations"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_executions")),
        sa.UniqueConstraint("candidate_id", name=op.f("uq_executions_candidate_id")),
    )
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_executions_verdict"), ["verdict"], unique=False)
        batch_op.create_index(
            "ix_executions_iteration_id_verdict", ["iteration_id", "verdict"], unique=False
        )

    op.create_table(
        "hard_negative_labels",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("candidate_id", sa.BigInteger(), nullable=False),
        sa.Column("reward_model_version_id", sa.Integer(), nullable=True),
        sa.Column("iteration_id", sa.Integer(), nullable=True),
        sa.Column("rule", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["candidate_id"],
            ["candidates.id"],
            name=op.f("fk_hard_negative_labels_candidate_id_candidates"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["iteration_id"],
            ["iterations.id"],
            name=op.f("fk_hard_negative_labels_iteration_id_iterations"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["reward_model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_hard_negative_labels_reward_model_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hard_negative_labels")),
        sa.UniqueConstraint(
            "candidate_id",
            "reward_model_version_id",
            name=op.f("uq_hard_negative_labels_candidate_id_reward_model_version_id"),
        ),
    )
    with op.batch_alter_table("hard_negative_labels", schema=None) as batch_op:
        batch_op.create_index(
            "ix_hard_negative_labels_iteration_id", ["iteration_id"], unique=False
        )
        batch_op.create_index(
            "ix_hard_negative_labels_reward_model_version_id",
            ["reward_model_version_id"],
            unique=False,
        )

    op.create_table(
        "scores",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("candidate_id", sa.BigInteger(), nullable=False),
        sa.Column("reward_model_version_id", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["candidate_id"],
            ["candidates.id"],
            name=op.f("fk_scores_candidate_id_candidates"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["reward_model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_scores_reward_model_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scores")),
        sa.UniqueConstraint(
            "candidate_id",
            "reward_model_version_id",
            name=op.f("uq_scores_candidate_id_reward_model_version_id"),
        ),
    )
    with op.batch_alter_table("scores", schema=None) as batch_op:
        batch_op.create_index(
            "ix_scores_reward_model_version_id_score",
            ["reward_model_version_id", "score"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("scores", schema=None) as batch_op:
        batch_op.drop_index("ix_scores_reward_model_version_id_score")

    op.drop_table("scores")
    with op.batch_alter_table("hard_negative_labels", schema=None) as batch_op:
        batch_op.drop_index("ix_hard_negative_labels_reward_model_version_id")
        batch_op.drop_index("ix_hard_negative_labels_iteration_id")

    op.drop_table("hard_negative_labels")
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_index("ix_executions_iteration_id_verdict")
        batch_op.drop_index(batch_op.f("ix_executions_verdict"))

    op.drop_table("executions")
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_training_runs_active_kind",
            postgresql_where=sa.text("status IN ('queued', 'running')"),
            sqlite_where=sa.text("status IN ('queued', 'running')"),
        )
        batch_op.drop_index("ix_training_runs_status")

    op.drop_table("training_runs")
    op.drop_table("dataset_versions")
    with op.batch_alter_table("candidates", schema=None) as batch_op:
        batch_op.drop_index("ix_candidates_iteration_id_problem_id")
        batch_op.drop_index(batch_op.f("ix_candidates_generator_version_id"))

    op.drop_table("candidates")
    op.drop_table("iterations")
    op.drop_table("problems")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_index("ix_model_versions_kind_created_at")

    op.drop_table("model_versions")
