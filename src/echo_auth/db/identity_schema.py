"""Tables of the identity database (``echo_identity``).

The web app owns this database. It also holds the audit outbox: an event is written here
in the same transaction as the change it records, and the relay moves it on.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

from echo_auth.db.types import UTCDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# SQLite only auto-increments an INTEGER PRIMARY KEY; MySQL wants BIGINT for a queue.
AutoId = BigInteger().with_variant(Integer(), "sqlite")

users = Table(
    "users",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("email", String(320), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    # Space-separated, sorted role names: keeps the session lookup to one row.
    Column("roles", String(64), nullable=False, server_default="user"),
    Column("email_verified_at", UTCDateTime(), nullable=True),
    Column("disabled_at", UTCDateTime(), nullable=True),
    Column("mfa_enabled", Boolean(), nullable=False, server_default="0"),
    Column("password_changed_at", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    # SHA-256 of the opaque token, hex. The token itself is never stored.
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("last_seen_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("revoked_reason", String(32), nullable=True),
    Column("ip", String(45), nullable=True),
    Column("user_agent", String(512), nullable=True),
    Index(None, "user_id", "revoked_at"),
)

one_time_tokens = Table(
    "one_time_tokens",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("purpose", String(32), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("user_id", String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("used_at", UTCDateTime(), nullable=True),
)

# TOTP factor: one per user. ``confirmed_at`` is set once a first code proved the enrolment;
# ``last_used_step`` refuses a code (time step) that was already used.
mfa_totp = Table(
    "mfa_totp",
    metadata,
    Column("user_id", String(36), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("secret", String(64), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("confirmed_at", UTCDateTime(), nullable=True),
    Column("last_used_step", BigInteger(), nullable=True),
)

recovery_codes = Table(
    "recovery_codes",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("code_hash", String(64), nullable=False, unique=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("used_at", UTCDateTime(), nullable=True),
    Index(None, "user_id"),
)

# Brute-force counters, one row per key ("email:<hash>", "ip:<addr>", "device:<id>",
# "mfa:<user id>"). Attempts are reserved with one conditional UPDATE, so parallel guesses
# cannot exceed the limit. ``in_flight`` is unused (an earlier design); kept to avoid a
# migration that only drops it.
login_throttles = Table(
    "login_throttles",
    metadata,
    Column("key", String(128), primary_key=True),
    Column("failures", Integer(), nullable=False, server_default="0"),
    Column("in_flight", Integer(), nullable=False, server_default="0"),
    Column("locked_until", UTCDateTime(), nullable=True),
    Column("lockouts", Integer(), nullable=False, server_default="0"),
    Column("updated_at", UTCDateTime(), nullable=False),
)

# Devices that logged in successfully before (the OWASP device-cookie defence): their
# attempts are counted on their own, so failures from elsewhere cannot lock them out.
known_devices = Table(
    "known_devices",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("last_used_at", UTCDateTime(), nullable=False),
    Index(None, "user_id"),
)

audit_outbox = Table(
    "audit_outbox",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False, unique=True),
    # The event's canonical JSON, computed once at enqueue time; the relay hashes it as is.
    Column("payload", Text(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("attempts", Integer(), nullable=False, server_default="0"),
    Column("available_at", UTCDateTime(), nullable=False),
    Column("last_error", Text(), nullable=True),
    Index(None, "available_at", "id"),
)

audit_dead_letters = Table(
    "audit_dead_letters",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("payload", Text(), nullable=False),
    Column("attempts", Integer(), nullable=False),
    Column("last_error", Text(), nullable=False),
    Column("queued_at", UTCDateTime(), nullable=False),
    Column("dead_at", UTCDateTime(), nullable=False),
)
