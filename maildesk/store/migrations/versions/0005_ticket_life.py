"""ticket life: priority, assignee, status clock, merges and follow-ups on tickets; the rule and
internal notes on messages; watchers and followers

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

from maildesk.store.models import UTCDateTime

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The foreign keys are written inline (ADD COLUMN ... REFERENCES), which SQLite takes as it
    # is: a separate constraint would make batch mode rebuild the ticket table, and dropping the
    # old one fails, under foreign_keys=ON, as soon as any message or mail refers to a ticket.
    with op.batch_alter_table('ticket', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority', sqlmodel.sql.sqltypes.AutoString(length=10), server_default='normal', nullable=False))
        batch_op.add_column(sa.Column('assignee_id', sa.Integer(), sa.ForeignKey('agent.id'), nullable=True), inline_references=True)
        batch_op.add_column(sa.Column('status_changed_at', UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('merged_into_id', sa.Integer(), sa.ForeignKey('ticket.id'), nullable=True), inline_references=True)
        batch_op.add_column(sa.Column('follows_id', sa.Integer(), sa.ForeignKey('ticket.id'), nullable=True), inline_references=True)
        batch_op.create_index(batch_op.f('ix_ticket_assignee_id'), ['assignee_id'], unique=False)
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rule', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True))
        batch_op.add_column(sa.Column('internal', sa.Boolean(), server_default=sa.false(), nullable=False))
    # A ticket's clock counts from its last change of status; before this revision, its last
    # update is the best guess.
    op.execute("UPDATE ticket SET status_changed_at = updated_at")
    op.create_table('ticketwatcher',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('ticket_id', sa.Integer(), nullable=False),
    sa.Column('agent_id', sa.Integer(), nullable=False),
    sa.Column('created_at', UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['agent_id'], ['agent.id'], ),
    sa.ForeignKeyConstraint(['ticket_id'], ['ticket.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('ticket_id', 'agent_id', name='uq_ticketwatcher_ticket_agent')
    )
    with op.batch_alter_table('ticketwatcher', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ticketwatcher_agent_id'), ['agent_id'], unique=False)
    op.create_table('ticketfollower',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('ticket_id', sa.Integer(), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('created_at', UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['account.id'], ),
    sa.ForeignKeyConstraint(['ticket_id'], ['ticket.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('ticket_id', 'account_id', name='uq_ticketfollower_ticket_account')
    )
    with op.batch_alter_table('ticketfollower', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ticketfollower_account_id'), ['account_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('ticketfollower', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ticketfollower_account_id'))
    op.drop_table('ticketfollower')
    with op.batch_alter_table('ticketwatcher', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ticketwatcher_agent_id'))
    op.drop_table('ticketwatcher')
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_column('internal')
        batch_op.drop_column('rule')
    with op.batch_alter_table('ticket', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ticket_assignee_id'))
        batch_op.drop_column('follows_id')
        batch_op.drop_column('merged_into_id')
        batch_op.drop_column('status_changed_at')
        batch_op.drop_column('assignee_id')
        batch_op.drop_column('priority')
