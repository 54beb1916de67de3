"""scores in score order, whichever reward model gave them

Candidate listings show each candidate the score its own iteration's reward
model gave it, so sorting them by score walks every version's scores at once.

Revision ID: 7b4e2f9a1c53
Revises: 8b2f4c6d1e53
Create Date: 2026-12-01 18:40:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "7b4e2f9a1c53"
down_revision: str | None = "8b2f4c6d1e53"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("scores", schema=None) as batch_op:
        batch_op.create_index(
            "ix_scores_score_candidate_id", ["score", "candidate_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("scores", schema=None) as batch_op:
        batch_op.drop_index("ix_scores_score_candidate_id")
