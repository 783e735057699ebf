"""an agent's answer leaves a ticket's status alone: "answered" tickets are open

Revision ID: 0007
Revises: 0006

Before 0007, storing an agent's answer set a ticket's status to "answered", a status outside the
four that ticket life knows (open, pending, solved, closed): such tickets fell out of
`tickets list --status open` and no command could move them on. They are open tickets.
"""

from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("UPDATE ticket SET status = 'open' WHERE status = 'answered'")


def downgrade() -> None:
    # Which open tickets were "answered" is not kept; they stay open.
    pass
