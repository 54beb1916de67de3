"""problem split: every problem is train or eval (held out)

Revision ID: 5e2f1b8d0c32
Revises: 3ca71c43b82e
Create Date: 2026-12-01 15:30:00.000000

Existing problems are assigned as an import would assign them, by a stable hash
of (source, task_id) at the default eval fraction of 0.5, except that a problem
the flywheel already sampled for training (it has generator or mutation
candidates) stays `train`: holding it out now would evaluate on seen data.
"""

import hashlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5e2f1b8d0c32"
down_revision: str | None = "3ca71c43b82e"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EVAL_FRACTION = 0.5  # frozen here: the default of RR_EVAL_FRACTION when this was written


def _held_out(source: str, task_id: str) -> bool:
    # The rule of models.problem.split_for as of this revision, copied so that the
    # migration keeps its meaning if that function changes.
    digest = hashlib.sha256(f"{source}\x00{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < EVAL_FRACTION


def upgrade() -> None:
    with op.batch_alter_table("problems") as batch:
        batch.add_column(
            sa.Column(
                "split",
                sa.Enum("train", "eval", name="split", native_enum=False, length=16),
                nullable=False,
                server_default="train",
            )
        )
        batch.create_index("ix_problems_split", ["split"])
    connection = op.get_bind()
    rows = connection.execute(
        sa.text(
            "SELECT id, source, task_id FROM problems p WHERE NOT EXISTS ("
            " SELECT 1 FROM candidates c WHERE c.problem_id = p.id"
            " AND c.origin IN ('generator', 'mutation'))"
        )
    ).all()
    held_out = [{"id": row.id} for row in rows if _held_out(row.source, row.task_id)]
    if held_out:
        connection.execute(sa.text("UPDATE problems SET split = 'eval' WHERE id = :id"), held_out)


def downgrade() -> None:
    with op.batch_alter_table("problems") as batch:
        batch.drop_index("ix_problems_split")
        batch.drop_column("split")
