"""outgoing mail is queued as a draft and composed by the sender

Revision ID: 0008
Revises: 0007

Rows queued from 0008 on hold what the mail says (Outbox.draft, JSON) and an empty `raw`; the
sender builds the MIME form as it sends. Rows already queued keep their `raw` and leave as they are.
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("draft", sa.Text(), nullable=True))


def downgrade() -> None:
    # Drafted rows still waiting could not leave without the column: refuse rather than lose them.
    pending = op.get_bind().execute(sa.text(
        "SELECT count(*) FROM outbox WHERE draft IS NOT NULL AND status IN ('pending', 'sending')"
    )).scalar()
    if pending:
        raise RuntimeError(f"{pending} outgoing mails are queued as drafts: send them first")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("draft")
