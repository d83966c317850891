"""A signed-in user's own account: their sessions, and changing their password."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update

from echo_auth.audit.events import AuditEvent, Source, Target
from echo_auth.audit.outbox import enqueue_event
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import sessions, users
from echo_auth.identity.auth import AuthService, user_actor
from echo_auth.identity.errors import InvalidCredentials, InvalidInput, NotFound
from echo_auth.identity.sessions import CurrentSession, revoke_session, revoke_user_sessions
from echo_auth.identity.throttle import Key
from echo_auth.identity.users import check_password_policy


@dataclass(frozen=True)
class SessionInfo:
    id: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    ip: str | None
    user_agent: str | None
    current: bool

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "device": _device_name(self.user_agent),
            "ip": self.ip,
            "user_agent": self.user_agent,
            "created_at": self.created_at,
            "last_seen_at": self.last_seen_at,
            "expires_at": self.expires_at,
            "current": self.current,
        }


def _device_name(user_agent: str | None) -> str:
    """A short, human label for a user agent (no parsing library for a label)."""
    if not user_agent:
        return "unknown device"
    ua = user_agent.lower()
    browser = next((name for key, name in _BROWSERS if key in ua), user_agent.split("/", 1)[0][:40])
    system = next((name for key, name in _SYSTEMS if key in ua), "")
    return f"{browser} on {system}" if system else browser


_BROWSERS = (
    ("edg/", "Edge"),
    ("firefox/", "Firefox"),
    ("chrome/", "Chrome"),
    ("safari/", "Safari"),
    ("curl/", "curl"),
    ("python-httpx", "httpx"),
    ("testclient", "test client"),
)
_SYSTEMS = (
    ("windows", "Windows"),
    ("android", "Android"),
    ("iphone", "iOS"),
    ("mac os", "macOS"),
    ("linux", "Linux"),
)


@dataclass
class AccountService:
    auth: AuthService

    def list_sessions(self, current: CurrentSession) -> list[SessionInfo]:
        """The user's live sessions, newest first."""
        now = datetime.now(UTC)
        with transaction(self.auth.identity, write=False) as conn:
            rows = conn.execute(
                select(sessions)
                .where(sessions.c.user_id == current.user.id, sessions.c.revoked_at.is_(None))
                .order_by(sessions.c.created_at.desc())
            ).all()
        policy = self.auth.sessions
        return [
            SessionInfo(
                r.id,
                r.created_at,
                r.last_seen_at,
                r.expires_at,
                r.ip,
                r.user_agent,
                r.id == current.id,
            )
            for r in rows
            if now < r.expires_at and now < r.last_seen_at + policy.idle_timeout
        ]

    def revoke(self, current: CurrentSession, session_id: str, source: Source) -> None:
        """Revoke one of the user's own sessions (another user's id is simply not found)."""
        with transaction(self.auth.identity) as conn:
            owner = conn.execute(
                select(sessions.c.user_id).where(sessions.c.id == session_id[:36])
            ).scalar_one_or_none()
            if owner != current.user.id or not revoke_session(conn, session_id, "user"):
                raise NotFound("no such live session")
            enqueue_event(
                conn,
                AuditEvent(
                    action="session.revoked",
                    outcome="success",
                    reason="user",
                    actor=user_actor(current.user),
                    target=Target("session", session_id),
                    source=source,
                    metadata={"current": session_id == current.id},
                ),
            )

    def revoke_others(self, current: CurrentSession, source: Source) -> int:
        with transaction(self.auth.identity) as conn:
            revoked = revoke_user_sessions(conn, current.user.id, "user", keep=current.id)
            enqueue_event(
                conn,
                AuditEvent(
                    action="session.revoked",
                    outcome="success",
                    reason="revoke_others",
                    actor=user_actor(current.user),
                    target=Target("user", current.user.id),
                    source=source,
                    metadata={"count": len(revoked)},
                ),
            )
        return len(revoked)

    def change_password(
        self, current: CurrentSession, current_password: str, new_password: str, source: Source
    ) -> int:
        """Set a new password after checking the current one; other sessions are revoked.

        Checking the current password is a guess like a login's, so it spends from the
        same brute-force budget (the account's throttle key): a stolen session cannot be
        used to try passwords without limit. Both argon2 runs happen before the write
        transaction opens.
        """
        auth = self.auth
        actor = user_actor(current.user)
        keys = [Key.email(current.user.email)]
        auth.reserve_attempt(keys, actor, current.user.id, source, "password.changed")
        with transaction(auth.identity, write=False) as conn:
            stored = conn.execute(
                select(users.c.password_hash).where(users.c.id == current.user.id)
            ).scalar_one()
        if not auth.hasher.verify(stored, current_password[: auth.password_max_length + 1]):
            with transaction(auth.identity) as conn:
                enqueue_event(
                    conn,
                    AuditEvent(
                        action="password.changed",
                        outcome="failure",
                        reason="bad_password",
                        actor=actor,
                        target=Target("user", current.user.id),
                        source=source,
                    ),
                )
                auth.record_locks(conn, keys, actor, current.user.id, source)
            raise InvalidCredentials("the current password is not right")
        with transaction(auth.identity) as conn:
            auth.throttle.succeeded(conn, keys)
        if new_password == current_password:
            raise InvalidInput("new_password", "must differ from the current password")
        check_password_policy(
            new_password,
            min_length=auth.password_min_length,
            max_length=auth.password_max_length,
            email=current.user.email,
        )
        new_hash = auth.hasher.hash(new_password)
        with transaction(auth.identity) as conn:
            now = datetime.now(UTC)
            conn.execute(
                update(users)
                .where(users.c.id == current.user.id)
                .values(password_hash=new_hash, password_changed_at=now, updated_at=now)
            )
            revoked = revoke_user_sessions(
                conn, current.user.id, "password_changed", keep=current.id
            )
            enqueue_event(
                conn,
                AuditEvent(
                    action="password.changed",
                    outcome="success",
                    actor=user_actor(current.user),
                    target=Target("user", current.user.id),
                    source=source,
                    metadata={"other_sessions_revoked": len(revoked)},
                ),
            )
        return len(revoked)
