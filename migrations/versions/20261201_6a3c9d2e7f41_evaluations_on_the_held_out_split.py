"""evaluations on the held-out split: one row per measured (generator, reward model),
one per sample drawn

Revision ID: 6a3c9d2e7f41
Revises: 5e2f1b8d0c32
Create Date: 2026-12-01 15:05:14.673805
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "6a3c9d2e7f41"
down_revision: str | None = "5e2f1b8d0c32"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("iteration_id", sa.Integer(), nullable=False),
        sa.Column("generator_version_id", sa.Integer(), nullable=False),
        sa.Column("reward_model_version_id", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum("running", "done", name="evaluationstatus", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["generator_version_id"],
            ["model_versions.id"],
            name=op.f("fk_evaluations_generator_version_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["iteration_id"], ["iterations.id"], name=op.f("fk_evaluations_iteration_id_iterations")
        ),
        sa.ForeignKeyConstraint(
            ["reward_model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_evaluations_reward_model_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
        sa.UniqueConstraint("number", name=op.f("uq_evaluations_number")),
    )
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_evaluations_iteration_id"), ["iteration_id"], unique=False
        )

    op.create_table(
        "evaluation_samples",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("evaluation_id", sa.Integer(), nullable=False),
        sa.Column("problem_id", sa.Integer(), nullable=False),
        sa.Column("sample_index", sa.Integer(), nullable=False),
        sa.Column("candidate_id", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["candidate_id"],
            ["candidates.id"],
            name=op.f("fk_evaluation_samples_candidate_id_candidates"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["evaluation_id"],
            ["evaluations.id"],
            name=op.f("fk_evaluation_samples_evaluation_id_evaluations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["problem_id"],
            ["problems.id"],
            name=op.f("fk_evaluation_samples_problem_id_problems"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluation_samples")),
        sa.UniqueConstraint(
            "evaluation_id",
            "problem_id",
            "sample_index",
            name=op.f("uq_evaluation_samples_evaluation_id_problem_id_sample_index"),
        ),
    )
    with op.batch_alter_table("evaluation_samples", schema=None) as batch_op:
        batch_op.create_index("ix_evaluation_samples_candidate_id", ["candidate_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("evaluation_samples", schema=None) as batch_op:
        batch_op.drop_index("ix_evaluation_samples_candidate_id")

    op.drop_table("evaluation_samples")
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_evaluations_iteration_id"))

    op.drop_table("evaluations")
