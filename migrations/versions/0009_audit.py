"""audit: reason, client address and before/after changes on every audit row; the log is
append-only (a trigger refuses UPDATE, DELETE and TRUNCATE, whoever asks, owner included)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Raised for every row (UPDATE, DELETE) and every statement (TRUNCATE). A trigger binds the
# table's owner and superusers too, which revoked privileges would not; only a session with
# session_replication_role = replica (superuser only) skips it, which `marquee restore`
# does not need: pg_restore creates triggers after it has loaded the rows.
APPEND_ONLY = """
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'audit rows are never changed or removed';
END
$$
"""


def upgrade() -> None:
    op.add_column("audit_log", sa.Column("reason", sa.Text(), nullable=True))
    op.add_column("audit_log", sa.Column("client_address", sa.Text(), nullable=True))
    op.add_column("audit_log", sa.Column("changes", pg.JSONB(), server_default="{}", nullable=False))
    # The search filters by who, by what and by period, newest first (keyset on at, id).
    op.create_index("ix_audit_log_at", "audit_log", ["at", "id"])
    op.create_index("ix_audit_log_actor", "audit_log", ["actor", "at"])
    op.create_index("ix_audit_log_action", "audit_log", ["action", "at"])
    op.execute(APPEND_ONLY)
    op.execute(
        "CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
    )
    op.execute(
        "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER audit_log_no_truncate ON audit_log")
    op.execute("DROP TRIGGER audit_log_no_change ON audit_log")
    op.execute("DROP FUNCTION audit_log_append_only()")
    op.drop_index("ix_audit_log_action", table_name="audit_log")
    op.drop_index("ix_audit_log_actor", table_name="audit_log")
    op.drop_index("ix_audit_log_at", table_name="audit_log")
    op.drop_column("audit_log", "changes")
    op.drop_column("audit_log", "client_address")
    op.drop_column("audit_log", "reason")
