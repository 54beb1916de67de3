"""executions record tampered runs

The sandbox's judge now reports runs in which the program forged or tampered
with its tests (reward hacking): `tampered` with the reason it saw.

Revision ID: 4d1e0a7c9b21
Revises: 6a3c9d2e7f41
Create Date: 2026-12-01 15:15:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "4d1e0a7c9b21"
down_revision: str | None = "6a3c9d2e7f41"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("tampered", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(sa.Column("tamper_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_column("tamper_reason")
        batch_op.drop_column("tampered")
