"""The audit event: one shape for every action, one catalog of action names.

An event's canonical JSON (UTF-8, sorted keys, no insignificant whitespace, timestamps as
``YYYY-MM-DDTHH:MM:SS.ffffffZ``) is computed once, when it is enqueued; the relay hashes
those exact bytes into the chain and verification recomputes the hash from them.
Secrets never enter an event: ``metadata`` refuses keys that name one.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

ActorType = Literal["user", "admin", "system", "anonymous"]
Outcome = Literal["success", "failure", "denied"]
ACTOR_TYPES: Final = ("user", "admin", "system", "anonymous")
OUTCOMES: Final = ("success", "failure", "denied")

CATALOG: Final[dict[str, str]] = {
    "user.signed_up": "an account is created (by sign-up or by an admin)",
    "user.email_verification.sent": "a verification mail was sent",
    "user.email_verified": "an address was confirmed",
    "auth.login.succeeded": "the password step succeeded",
    "auth.login.failed": "the password step failed; reason says why",
    "auth.mfa.challenged": "a second factor was asked for",
    "auth.mfa.succeeded": "the second factor succeeded",
    "auth.mfa.failed": "the second factor failed",
    "auth.throttled": "an attempt was refused by brute-force protection",
    "account.locked": "an account was locked by brute-force protection",
    "account.unlocked": "an account lock was lifted",
    "auth.logout": "a user logged out",
    "session.revoked": "a session was revoked",
    "session.expired": "an expired session was presented",
    "token.issued": "a JWT access token was minted",
    "password.changed": "a password was changed",
    "password.reset.requested": "a password reset was asked for",
    "password.reset.completed": "a password was reset with a mailed token",
    "mail.delivery.failed": "a mail (verification, reset, notice) could not be sent",
    "mfa.totp.enrolment_started": "a TOTP secret was issued, not yet confirmed",
    "mfa.totp.enrolled": "a TOTP factor was confirmed",
    "mfa.totp.removed": "a TOTP factor was removed",
    "mfa.recovery_code.used": "a recovery code was used",
    "access.denied": "a request was refused for a missing role",
    "admin.user.listed": "an admin listed users",
    "admin.user.viewed": "an admin read one user",
    "admin.user.disabled": "an admin disabled a user",
    "admin.user.enabled": "an admin enabled a user",
    "admin.user.roles_changed": "an admin changed a user's roles",
    "admin.user.sessions_revoked": "an admin revoked a user's sessions",
    "admin.bootstrap.token_issued": "a one-time token to create the first admin was issued",
    "audit.searched": "the audit log was searched",
    "audit.exported": "the audit log was exported",
    "audit.verified": "the audit chain was verified",
    "audit.pipeline.viewed": "the pipeline's health was read",
    "system.started": "the service started",
    "system.checkpoint.signed": "a checkpoint was signed",
    "system.backup.created": "a backup was made",
    "system.backup.restored": "a backup was restored",
    "system.backup.verified": "a backup was checked by a full restore into scratch databases",
    "system.backup.listed": "an operator listed the backup archives",
    "system.audit.migrated": "the audit database was moved",
    "system.grants.applied": "database users and grants were applied",
    "system.jwt_key.rotated": "a new JWT signing key was made; older ones stay published",
    "system.db.upgraded": "database migrations were run",
    "system.db.admin_access": (
        "a privileged database account connected or ran a statement (from the server's "
        "audit log, imported by `audit ingest-db-log`)"
    ),
    "system.db.admin_log.ingested": "an operator imported a database server's audit log",
    "admin.command.refused": "an echo-auth command was refused; reason says why",
    "system.dead_letter.created": "an event could not be delivered and was set aside",
    "system.dead_letter.retried": "a dead letter was put back on the queue",
}

# Metadata keys that could only hold a secret. A caller that tries is a bug, caught early.
_FORBIDDEN_KEY_WORDS: Final = frozenset(
    {
        "password",
        "passwd",
        "secret",
        "token",
        "tokens",
        "code",
        "codes",
        "private",
        "hash",
        "otp",
        "totp",
    }
)
MAX_METADATA_BYTES: Final = 4096
GENESIS_HASH: Final = "0" * 64


class InvalidEvent(ValueError):
    """An event that must not be recorded as given (unknown action, a secret, too big)."""


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 version 7): 48-bit Unix milliseconds, then random."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def format_timestamp(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise InvalidEvent("timestamps must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(text: str) -> datetime:
    """Parse the canonical form ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (and only that form)."""
    if len(text) != 27 or text[-1] != "Z" or text[10] != "T" or text[19] != ".":
        raise ValueError(f"not a canonical timestamp: {text!r}")
    # fromisoformat is C code, many times faster than strptime; verify parses every row.
    return datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC)


def canonical_json(document: dict[str, Any]) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Actor:
    type: ActorType
    id: str | None = None
    label: str | None = None

    @classmethod
    def anonymous(cls) -> Actor:
        return cls("anonymous")

    @classmethod
    def system(cls, label: str = "echo") -> Actor:
        return cls("system", None, label)


@dataclass(frozen=True, slots=True)
class Target:
    type: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Source:
    """Where a request came from, and under which request id."""

    ip: str | None = None
    user_agent: str | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    action: str
    outcome: Outcome
    actor: Actor
    target: Target | None = None
    reason: str | None = None
    source: Source = field(default_factory=Source)
    metadata: dict[str, Any] = field(default_factory=dict)
    event_id: str = field(default_factory=lambda: str(uuid7()))
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        if self.action not in CATALOG:
            raise InvalidEvent(f"unknown action {self.action!r}: add it to the catalog")
        if self.outcome not in OUTCOMES:
            raise InvalidEvent(f"unknown outcome {self.outcome!r}")
        if self.actor.type not in ACTOR_TYPES:
            raise InvalidEvent(f"unknown actor type {self.actor.type!r}")
        _check_metadata(self.metadata)
        # A private copy: the caller's dict changing later cannot change what was checked.
        object.__setattr__(self, "metadata", copy.deepcopy(self.metadata))

    def to_document(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "occurred_at": format_timestamp(self.occurred_at),
            "actor": {
                "type": self.actor.type,
                "id": _clip(self.actor.id, 64),
                "label": _clip(self.actor.label, 320),
            },
            "action": self.action,
            "target": None
            if self.target is None
            else {"type": _clip(self.target.type, 32), "id": _clip(self.target.id, 64)},
            "outcome": self.outcome,
            "reason": _clip(self.reason, 64),
            "source": {
                "ip": _clip(self.source.ip, 45),
                "user_agent": _clip(self.source.user_agent, 512),
            },
            "request_id": _clip(self.source.request_id, 64),
            "metadata": self.metadata,
        }

    def canonical(self) -> str:
        return canonical_json(self.to_document())


def _clip(value: str | None, limit: int) -> str | None:
    # Columns have fixed widths; clipping here keeps the stored JSON and its projection equal.
    return None if value is None else value[:limit]


def _check_metadata(metadata: dict[str, Any]) -> None:
    for key in _walk_keys(metadata):
        # camelCase and snake_case alike: "sessionToken" and "session_token" both name a token.
        spaced = re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])|(?<=[a-z0-9])(?=[A-Z])", "_", key)
        words = set(re.split(r"[^a-z0-9]+", spaced.lower()))
        if words & _FORBIDDEN_KEY_WORDS:
            raise InvalidEvent(f"metadata key {key!r} looks like a secret; events never hold one")
    if _has_float(metadata):
        # Floats have no single canonical text across languages (and NaN is not JSON).
        raise InvalidEvent("metadata may not hold floating-point numbers")
    try:
        encoded = canonical_json(metadata)
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(f"metadata is not plain JSON: {exc}") from None
    if len(encoded.encode()) > MAX_METADATA_BYTES:
        raise InvalidEvent(f"metadata over {MAX_METADATA_BYTES} bytes")


def _walk_keys(value: Any) -> list[str]:
    keys: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            keys.append(str(k))
            keys.extend(_walk_keys(v))
    elif isinstance(value, list):
        for item in value:
            keys.extend(_walk_keys(item))
    return keys


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return False
