"""indexes for the admin's notification and recipient screens: keyset pages by status,
campaign sends by run and by recipient, recipients by email and phone

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-09 12:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (name, table, columns). Each serves a page newest first without sorting what it found:
# notifications of one status (a rare one, "failed", would otherwise walk the whole
# created_at index), a campaign's sends (by run, then id) and a person's campaign sends,
# and a recipient found by the address someone reads out.
INDEXES = (
    ("ix_notifications_status_created", "notifications", ["status", "created_at", "id"]),
    ("ix_campaign_deliveries_run", "campaign_deliveries", ["run_id", "id"]),
    ("ix_campaign_deliveries_recipient", "campaign_deliveries", ["recipient_id", "id"]),
    ("ix_recipients_email", "recipients", ["email"]),
    ("ix_recipients_phone", "recipients", ["phone"]),
)


def upgrade() -> None:
    # CONCURRENTLY: a table of millions keeps taking writes while its index is built
    # (outside the migration's transaction, as PostgreSQL requires).
    with op.get_context().autocommit_block():
        for name, table, columns in INDEXES:
            op.create_index(name, table, columns, postgresql_concurrently=True, if_not_exists=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table, _ in reversed(INDEXES):
            op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
