"""initial schema of the audit database

Revision ID: 0001
Revises:
Create Date: 2026-11-27 17:58:07.373069
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

import echo_auth.db.types

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("occurred_at", echo_auth.db.types.UTCDateTime(), nullable=False),
        sa.Column("recorded_at", echo_auth.db.types.UTCDateTime(), nullable=False),
        sa.Column("actor_type", sa.String(length=16), nullable=False),
        sa.Column("actor_id", sa.String(length=64), nullable=True),
        sa.Column("actor_label", sa.String(length=320), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=32), nullable=True),
        sa.Column("target_id", sa.String(length=64), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=True),
        sa.Column("ip", sa.String(length=45), nullable=True),
        sa.Column("user_agent", sa.String(length=512), nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("event_json", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.CHAR(length=64), nullable=False),
        sa.Column("hash", sa.CHAR(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_audit_events_event_id")),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_audit_events_action_seq"), ["action", "seq"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_audit_events_actor_id_seq"), ["actor_id", "seq"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_audit_events_ip_seq"), ["ip", "seq"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_audit_events_occurred_at"), ["occurred_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_audit_events_target_id_seq"), ["target_id", "seq"], unique=False
        )

    op.create_table(
        "chain_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.CHAR(length=64), nullable=False),
        sa.Column("updated_at", echo_auth.db.types.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chain_head")),
    )
    # The chain starts empty: seq 0 and the genesis hash (64 zeros).
    op.execute(
        sa.text(
            "INSERT INTO chain_head (id, seq, hash, updated_at) VALUES (1, 0, :genesis, :now)"
        ).bindparams(genesis="0" * 64, now=datetime.now(UTC).replace(tzinfo=None))
    )


def downgrade() -> None:
    op.drop_table("chain_head")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_events_target_id_seq"))
        batch_op.drop_index(batch_op.f("ix_audit_events_occurred_at"))
        batch_op.drop_index(batch_op.f("ix_audit_events_ip_seq"))
        batch_op.drop_index(batch_op.f("ix_audit_events_actor_id_seq"))
        batch_op.drop_index(batch_op.f("ix_audit_events_action_seq"))

    op.drop_table("audit_events")
