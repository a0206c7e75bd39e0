"""provider currency: the currency of cost_per_message, for spend per currency in analytics

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("providers", sa.Column("currency", sa.Text(), server_default="USD", nullable=False))


def downgrade() -> None:
    op.drop_column("providers", "currency")
