"""reply epoch on tickets; automatic-mail accounting and VERP tokens on the outbox

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('ticket', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reply_epoch', sa.Integer(), server_default='0', nullable=False))
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('automatic', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('mailbox_key', sqlmodel.sql.sqltypes.AutoString(length=320), nullable=True))
        batch_op.add_column(sa.Column('verp', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_outbox_mailbox_key'), ['mailbox_key'], unique=False)
        batch_op.create_unique_constraint('uq_outbox_verp', ['verp'])


def downgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_constraint('uq_outbox_verp', type_='unique')
        batch_op.drop_index(batch_op.f('ix_outbox_mailbox_key'))
        batch_op.drop_column('verp')
        batch_op.drop_column('mailbox_key')
        batch_op.drop_column('automatic')
    with op.batch_alter_table('ticket', schema=None) as batch_op:
        batch_op.drop_column('reply_epoch')
