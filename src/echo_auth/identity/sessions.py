"""Sessions: opaque bearer tokens with idle and absolute expiry, looked up in one query."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from echo_auth.audit.events import uuid7
from echo_auth.db.async_reads import AsyncReader
from echo_auth.db.identity_schema import sessions, users
from echo_auth.identity.tokens import new_token, token_hash
from echo_auth.identity.users import USER_COLUMNS, User


@dataclass(frozen=True)
class SessionPolicy:
    idle_timeout: timedelta = timedelta(days=7)
    absolute_timeout: timedelta = timedelta(days=30)
    touch_interval: timedelta = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class CurrentSession:
    id: str
    user: User
    expires_at: datetime
    last_seen_at: datetime
    needs_touch: bool


@dataclass(frozen=True, slots=True)
class ExpiredSession:
    """A presented session that has run out (``reason``: ``idle`` or ``absolute``) and
    is not yet marked so; the caller ends it once (see :func:`end_expired_session`)."""

    id: str
    user: User
    reason: str


@dataclass(frozen=True, slots=True)
class NewSession:
    id: str
    token: str
    expires_at: datetime


def create_session(
    conn: Connection,
    user_id: str,
    policy: SessionPolicy,
    *,
    ip: str | None,
    user_agent: str | None,
) -> NewSession:
    now = datetime.now(UTC)
    token = new_token()
    session_id = str(uuid7())
    expires_at = now + policy.absolute_timeout
    conn.execute(
        insert(sessions).values(
            id=session_id,
            user_id=user_id,
            token_hash=token_hash(token),
            created_at=now,
            last_seen_at=now,
            expires_at=expires_at,
            ip=ip[:45] if ip else None,
            user_agent=user_agent[:512] if user_agent else None,
        )
    )
    return NewSession(session_id, token, expires_at)


# Compiled once; one indexed lookup (the token hash is unique) joined to the user.
_RESOLVE = (
    select(
        sessions.c.id.label("session_id"),
        sessions.c.expires_at,
        sessions.c.last_seen_at,
        sessions.c.revoked_at,
        *USER_COLUMNS,
    )
    .join(users, users.c.id == sessions.c.user_id)
    .where(sessions.c.token_hash == bindparam("token_hash"))
)


def resolve_session(
    conn: Connection, token: str, policy: SessionPolicy, *, now: datetime | None = None
) -> CurrentSession | ExpiredSession | None:
    """The live session for ``token`` and its user, or None. Writes nothing.

    A session is live when it is not revoked, not past its absolute expiry, not idle for
    longer than the idle timeout, and its user is not disabled. ``needs_touch`` says the
    last-seen time is older than the touch interval (see :func:`touch_session`). A
    session that ran out comes back as :class:`ExpiredSession` (it is not live either).
    """
    if not _plausible(token):
        return None
    row = conn.execute(_RESOLVE, {"token_hash": token_hash(token)}).first()
    return _live_session(row, policy, now)


async def resolve_session_async(
    reader: AsyncReader, token: str, policy: SessionPolicy
) -> CurrentSession | ExpiredSession | None:
    """:func:`resolve_session` on the event loop (MySQL/MariaDB): the same query and rules."""
    if not _plausible(token):
        return None
    row = await reader.first(_RESOLVE, {"token_hash": token_hash(token)})
    return _live_session(row, policy, None)


def _plausible(token: str) -> bool:
    return bool(token) and len(token) <= 256


def _live_session(
    row: Any, policy: SessionPolicy, now: datetime | None
) -> CurrentSession | ExpiredSession | None:
    if row is None or row.revoked_at is not None or row.disabled_at is not None:
        return None
    now = now or datetime.now(UTC)
    if now >= row.expires_at:
        return ExpiredSession(row.session_id, User.from_row(row), "absolute")
    if now >= row.last_seen_at + policy.idle_timeout:
        return ExpiredSession(row.session_id, User.from_row(row), "idle")
    return CurrentSession(
        id=row.session_id,
        user=User.from_row(row),
        expires_at=row.expires_at,
        last_seen_at=row.last_seen_at,
        needs_touch=now - row.last_seen_at >= policy.touch_interval,
    )


def touch_session(conn: Connection, session_id: str) -> None:
    """Record activity; callers do it at most once per touch interval, not per request."""
    conn.execute(
        update(sessions)
        .where(sessions.c.id == session_id, sessions.c.revoked_at.is_(None))
        .values(last_seen_at=datetime.now(UTC))
    )


def end_expired_session(conn: Connection, session_id: str) -> bool:
    """Mark a session that ran out as ended; True for the one caller that did it."""
    return revoke_session(conn, session_id, "expired")


def revoke_session(conn: Connection, session_id: str, reason: str) -> bool:
    """Revoke one session; True if it was live."""
    result = conn.execute(
        update(sessions)
        .where(sessions.c.id == session_id, sessions.c.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC), revoked_reason=reason)
    )
    return result.rowcount == 1


def revoke_user_sessions(
    conn: Connection, user_id: str, reason: str, *, keep: str | None = None
) -> list[str]:
    """Revoke every live session of a user (but ``keep``); returns the revoked ids."""
    live = select(sessions.c.id).where(
        sessions.c.user_id == user_id, sessions.c.revoked_at.is_(None)
    )
    if keep is not None:
        live = live.where(sessions.c.id != keep)
    ids = list(conn.execute(live).scalars().all())
    if ids:
        conn.execute(
            update(sessions)
            .where(sessions.c.id.in_(ids), sessions.c.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC), revoked_reason=reason)
        )
    return ids
