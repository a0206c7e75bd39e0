"""unreachable: a recipient with no contact for a channel is counted on its own, not as suppressed

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 13:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("campaign_runs", sa.Column("unreachable", sa.Integer(), server_default="0", nullable=False))
    # Campaign sends recorded before this counted a missing contact as suppressed.
    op.execute(
        """
        WITH moved AS (
            UPDATE campaign_deliveries SET status = 'unreachable'
            WHERE status = 'suppressed' AND error LIKE 'no % contact'
            RETURNING run_id
        ), counts AS (SELECT run_id, count(*) AS n FROM moved GROUP BY run_id)
        UPDATE campaign_runs r SET unreachable = r.unreachable + c.n, suppressed = r.suppressed - c.n
        FROM counts c WHERE r.id = c.run_id
        """
    )


def downgrade() -> None:
    op.execute(
        """
        UPDATE campaign_deliveries SET status = 'suppressed' WHERE status = 'unreachable';
        UPDATE campaign_runs SET suppressed = suppressed + unreachable;
        """
    )
    op.drop_column("campaign_runs", "unreachable")
