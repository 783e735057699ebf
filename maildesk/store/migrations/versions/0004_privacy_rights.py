"""privacy rights: restriction, objection, post-mortem directives and the notice on accounts;
rights requests received by mail

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

from maildesk.store.models import UTCDateTime

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('account', schema=None) as batch_op:
        batch_op.add_column(sa.Column('restricted_at', UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('objected_at', UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('directive', sqlmodel.sql.sqltypes.AutoString(length=10), nullable=True))
        batch_op.add_column(sa.Column('directive_address', sqlmodel.sql.sqltypes.AutoString(length=320), nullable=True))
        batch_op.add_column(sa.Column('deceased_at', UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('notice_sent_at', UTCDateTime(timezone=True), nullable=True))
    op.create_table('rightsrequest',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('ticket_id', sa.Integer(), nullable=True),
    sa.Column('account_id', sa.Integer(), nullable=True),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
    sa.Column('received_at', UTCDateTime(timezone=True), nullable=False),
    sa.Column('due_on', sa.Date(), nullable=False),
    sa.Column('closed_at', UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['account.id'], ),
    sa.ForeignKeyConstraint(['ticket_id'], ['ticket.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('rightsrequest', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rightsrequest_account_id'), ['account_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_rightsrequest_ticket_id'), ['ticket_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('rightsrequest', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rightsrequest_ticket_id'))
        batch_op.drop_index(batch_op.f('ix_rightsrequest_account_id'))
    op.drop_table('rightsrequest')
    with op.batch_alter_table('account', schema=None) as batch_op:
        batch_op.drop_column('notice_sent_at')
        batch_op.drop_column('deceased_at')
        batch_op.drop_column('directive_address')
        batch_op.drop_column('directive')
        batch_op.drop_column('objected_at')
        batch_op.drop_column('restricted_at')
