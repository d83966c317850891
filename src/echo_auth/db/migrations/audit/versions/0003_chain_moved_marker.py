"""mark a chain as moved to another server (``audit migrate --to``)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 19:00:00

``chain_head.moved_to`` (the new server's URL, password hidden) and ``moved_at`` are set
by ``echo-auth audit migrate`` under the chain head lock. A relay that finds them set
appends nothing: the events stay in the outbox until a relay points at the new server.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import echo_auth.db.types

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("chain_head", sa.Column("moved_to", sa.String(length=255), nullable=True))
    op.add_column(
        "chain_head", sa.Column("moved_at", echo_auth.db.types.UTCDateTime(), nullable=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("chain_head", schema=None) as batch_op:
        batch_op.drop_column("moved_at")
        batch_op.drop_column("moved_to")
