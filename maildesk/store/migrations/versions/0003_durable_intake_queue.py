"""durable intake: inbound mail waits as "received" for the runner; queue claims with leases

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

from maildesk.store.models import UTCDateTime

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('inboundmail', schema=None) as batch_op:
        batch_op.add_column(sa.Column('recipients', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column('oversize', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('claimed_by', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True))
        batch_op.add_column(sa.Column('lease_until', UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('next_attempt_at', UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('last_error', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claimed_by', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True))
        batch_op.add_column(sa.Column('lease_until', UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('deferrals', sa.Integer(), server_default='0', nullable=False))
    # Rows from before this revision were filed at once; a "pending" one was never finished.
    op.execute("UPDATE inboundmail SET outcome = 'received' WHERE outcome = 'pending'")
    # The outbox's "sending" rows held their lease in next_attempt_at; they are simply due now.
    op.execute("UPDATE outbox SET status = 'pending' WHERE status = 'sending'")


def downgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_column('deferrals')
        batch_op.drop_column('lease_until')
        batch_op.drop_column('claimed_by')
    with op.batch_alter_table('inboundmail', schema=None) as batch_op:
        batch_op.drop_column('last_error')
        batch_op.drop_column('next_attempt_at')
        batch_op.drop_column('lease_until')
        batch_op.drop_column('claimed_by')
        batch_op.drop_column('oversize')
        batch_op.drop_column('recipients')
