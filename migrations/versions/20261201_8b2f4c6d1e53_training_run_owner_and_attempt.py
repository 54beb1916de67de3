"""training runs record their owner and attempt

A run records the host and pid that train it, so a worker starting on that host
reclaims the runs of a dead one at once; `attempt` counts claims and fences a
worker that lost its run; `resumed_from_step` is the checkpoint an attempt
resumed from, `checkpoint_step` the newest one saved, and `stalled_attempts` the
lost attempts in a row that saved none newer (what RR_RUN_MAX_ATTEMPTS caps).

Revision ID: 8b2f4c6d1e53
Revises: 4d1e0a7c9b21
Create Date: 2026-12-01 18:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8b2f4c6d1e53"
down_revision: str | None = "4d1e0a7c9b21"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner_host", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("owner_pid", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("attempt", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("resumed_from_step", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("checkpoint_step", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("stalled_attempts", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_column("stalled_attempts")
        batch_op.drop_column("checkpoint_step")
        batch_op.drop_column("resumed_from_step")
        batch_op.drop_column("attempt")
        batch_op.drop_column("owner_pid")
        batch_op.drop_column("owner_host")
