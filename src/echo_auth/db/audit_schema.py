"""Tables of the audit database (``echo_audit``). Only the relay writes here.

``audit_events`` is append-only and hash-chained: ``hash = SHA-256(prev_hash || event_json)``
where ``prev_hash`` is the previous row's hash as 64 lowercase hex characters (64 zeros for
``seq`` 1) and ``event_json`` is the event's canonical JSON in UTF-8. The other columns are
a searchable projection of ``event_json``; verification checks that they agree.
"""

from __future__ import annotations

from sqlalchemy import CHAR, BigInteger, Column, Index, Integer, MetaData, String, Table, Text

from echo_auth.db.identity_schema import NAMING_CONVENTION
from echo_auth.db.types import UTCDateTime

metadata = MetaData(naming_convention=NAMING_CONVENTION)


audit_events = Table(
    "audit_events",
    metadata,
    Column("seq", BigInteger(), primary_key=True, autoincrement=False),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("occurred_at", UTCDateTime(), nullable=False),
    Column("recorded_at", UTCDateTime(), nullable=False),
    Column("actor_type", String(16), nullable=False),
    Column("actor_id", String(64), nullable=True),
    Column("actor_label", String(320), nullable=True),
    Column("action", String(64), nullable=False),
    Column("target_type", String(32), nullable=True),
    Column("target_id", String(64), nullable=True),
    Column("outcome", String(16), nullable=False),
    Column("reason", String(64), nullable=True),
    Column("ip", String(45), nullable=True),
    Column("user_agent", String(512), nullable=True),
    Column("request_id", String(64), nullable=True),
    Column("event_json", Text(), nullable=False),
    Column("prev_hash", CHAR(64), nullable=False),
    Column("hash", CHAR(64), nullable=False),
    Index(None, "action", "seq"),
    Index(None, "actor_id", "seq"),
    Index(None, "target_id", "seq"),
    Index(None, "ip", "seq"),
    Index(None, "occurred_at"),
)

# Signed statements of the chain head. Each is also written outside the database (see
# echo_auth.audit.checkpoints); verification compares the two copies with the chain.
checkpoints = Table(
    "checkpoints",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("seq", BigInteger(), nullable=False),
    Column("hash", CHAR(64), nullable=False),
    Column("signed_at", UTCDateTime(), nullable=False),
    Column("key_id", String(32), nullable=False),
    # The exact signed bytes (canonical JSON) and the Ed25519 signature, base64.
    Column("statement", Text(), nullable=False),
    Column("signature", String(128), nullable=False),
    Index(None, "seq"),
)

# Tables that no one may UPDATE or DELETE, enforced by triggers (migration 0002).
APPEND_ONLY_TABLES = ("audit_events", "checkpoints")

# One row (id = 1): the chain's head. Appends lock it, one lock per batch.
# ``moved_to``/``moved_at`` are set when the log was copied to another server
# (``echo-auth audit migrate``): from then on no relay appends here (see audit/chain.py).
chain_head = Table(
    "chain_head",
    metadata,
    Column("id", Integer(), primary_key=True, autoincrement=False),
    Column("seq", BigInteger(), nullable=False),
    Column("hash", CHAR(64), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("moved_to", String(255), nullable=True),
    Column("moved_at", UTCDateTime(), nullable=True),
)
