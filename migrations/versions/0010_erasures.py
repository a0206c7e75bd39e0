"""erasures: the record of each GDPR erasure (no personal data: a keyed hash of the
user_id, who, when, counts per store); the audit log admits one kind of UPDATE, the
redaction an erasure makes of the rows that named the person

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-09 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The one change the append-only log allows: who, what action, on which kind of object,
# when, from where and why stay as they were (the reason may only become "[erased]"); the
# object's id becomes "erased:<subject hash>" and details and changes are emptied. It can
# hide the person an old row named, never rewrite what happened (services.gdpr).
REDACTION = """
    NEW.id = OLD.id AND NEW.at = OLD.at AND NEW.actor = OLD.actor AND NEW.role = OLD.role
    AND NEW.action = OLD.action AND NEW.entity = OLD.entity
    AND NEW.client_address IS NOT DISTINCT FROM OLD.client_address
    AND (NEW.reason IS NOT DISTINCT FROM OLD.reason OR NEW.reason = '[erased]')
    AND NEW.entity_id LIKE 'erased:%' AND NEW.details = '{}'::jsonb AND NEW.changes = '{}'::jsonb
"""


def upgrade() -> None:
    op.create_table(
        "erasures",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
        sa.Column("subject_hash", sa.Text(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("counts", pg.JSONB(), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_erasures_subject", "erasures", ["subject_hash"])
    # 0009's row trigger refused UPDATE and DELETE alike; DELETE stays refused, UPDATE unless
    # it is a redaction. The function raising is 0009's.
    op.execute("DROP TRIGGER audit_log_no_change ON audit_log")
    op.execute(
        "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
    )
    op.execute(
        f"CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log FOR EACH ROW "
        f"WHEN (NOT ({REDACTION})) EXECUTE FUNCTION audit_log_append_only()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER audit_log_no_update ON audit_log")
    op.execute("DROP TRIGGER audit_log_no_delete ON audit_log")
    op.execute(
        "CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
    )
    op.drop_index("ix_erasures_subject", table_name="erasures")
    op.drop_table("erasures")
