"""Managing other users: list, read, disable, enable, roles, sessions, unlock.

Every operation, reads included, records an event with the admin as actor, in the same
transaction as the change (or, for reads, committed before the answer). The CLI uses the
same functions with an ``admin`` actor built from the OS user and host.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update

from echo_auth.audit.events import Actor, AuditEvent, Source, Target
from echo_auth.audit.outbox import enqueue_event
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import sessions, users
from echo_auth.identity.errors import DomainError, InvalidInput, NotFound
from echo_auth.identity.sessions import revoke_user_sessions
from echo_auth.identity.throttle import Key, Throttle
from echo_auth.identity.users import USER_COLUMNS, User, format_roles, normalize_email

MAX_PAGE = 200


class LastAdmin(DomainError):
    """This would leave no enabled admin."""

    code = "last_admin"


@dataclass(frozen=True)
class UserPage:
    users: list[User]
    next_cursor: str | None


def _encode_cursor(user_id: str) -> str:
    return base64.urlsafe_b64encode(f"u{user_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> str | None:
    if not cursor:
        return None
    try:
        if len(cursor) > 64:
            raise ValueError
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        if not raw.startswith("u") or len(raw) != 37:
            raise ValueError
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput("cursor", "not a cursor this service gave out") from None
    return raw[1:]


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _has_admin(stored_roles: str) -> bool:
    return "admin" in stored_roles.split()


@dataclass
class AdminService:
    identity: Engine
    throttle: Throttle

    def _event(
        self,
        conn: Connection,
        action: str,
        actor: Actor,
        source: Source,
        target: Target | None = None,
        metadata: dict[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        enqueue_event(
            conn,
            AuditEvent(
                action=action,
                outcome="success",
                actor=actor,
                target=target,
                source=source,
                metadata={**(metadata or {}), **(context or {})},
            ),
        )

    def list_users(
        self,
        actor: Actor,
        source: Source,
        *,
        q: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> UserPage:
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput("limit", f"must be between 1 and {MAX_PAGE}")
        if q is not None and (len(q) > 320 or "\x00" in q):
            raise InvalidInput("q", "too long or contains a NUL character")
        after = _decode_cursor(cursor)
        stmt = select(*USER_COLUMNS).order_by(users.c.id)
        if q:
            pattern = "%" + _escape_like(q.strip().lower()) + "%"
            stmt = stmt.where(users.c.email.like(pattern, escape="\\"))
        if after:
            stmt = stmt.where(users.c.id > after)
        with transaction(self.identity) as conn:
            rows = conn.execute(stmt.limit(limit + 1)).all()
            found = [User.from_row(r) for r in rows[:limit]]
            self._event(
                conn,
                "admin.user.listed",
                actor,
                source,
                metadata={"q": (q or "")[:100], "returned": len(found)},
            )
        next_cursor = _encode_cursor(found[-1].id) if len(rows) > limit else None
        return UserPage(found, next_cursor)

    def view_user(self, actor: Actor, source: Source, user_id: str) -> tuple[User, int]:
        """A user and their number of live sessions."""
        with transaction(self.identity) as conn:
            user = self._get(conn, user_id)
            live = conn.execute(
                select(func.count())
                .select_from(sessions)
                .where(
                    sessions.c.user_id == user.id,
                    sessions.c.revoked_at.is_(None),
                    sessions.c.expires_at > datetime.now(UTC),
                )
            ).scalar_one()
            self._event(conn, "admin.user.viewed", actor, source, Target("user", user.id))
        return user, int(live)

    def _get(self, conn: Connection, user_id: str) -> User:
        row = conn.execute(select(*USER_COLUMNS).where(users.c.id == user_id[:36])).first()
        if row is None:
            raise NotFound("no such user")
        return User.from_row(row)

    def find_by_email(self, raw_email: str) -> str:
        email = normalize_email(raw_email)
        with transaction(self.identity, write=False) as conn:
            user_id = conn.execute(select(users.c.id).where(users.c.email == email)).scalar()
        if user_id is None:
            raise NotFound(f"no user with email {email}")
        return str(user_id)

    def _would_remove_last_admin(self, conn: Connection, user_id: str) -> bool:
        others = conn.execute(
            select(func.count())
            .select_from(users)
            .where(
                users.c.id != user_id,
                users.c.disabled_at.is_(None),
                users.c.roles.like("%admin%"),
            )
            .with_for_update()
        ).scalar_one()
        return int(others) == 0

    def disable(
        self,
        actor: Actor,
        source: Source,
        user_id: str,
        *,
        context: Mapping[str, Any] | None = None,
    ) -> int:
        """Disable a user: login refused, every session revoked. Returns sessions revoked.

        ``context`` (here and below): extra metadata from the caller for the event, such
        as the CLI's command line."""
        with transaction(self.identity) as conn:
            user = self._get_for_update(conn, user_id)
            if "admin" in user.roles and self._would_remove_last_admin(conn, user.id):
                raise LastAdmin("cannot disable the last enabled admin")
            now = datetime.now(UTC)
            conn.execute(
                update(users)
                .where(users.c.id == user.id)
                .values(disabled_at=users.c.disabled_at if user.disabled else now, updated_at=now)
            )
            revoked = revoke_user_sessions(conn, user.id, "user_disabled")
            self._event(
                conn,
                "admin.user.disabled",
                actor,
                source,
                Target("user", user.id),
                {"sessions_revoked": len(revoked), "already_disabled": user.disabled},
                context,
            )
        return len(revoked)

    def enable(
        self,
        actor: Actor,
        source: Source,
        user_id: str,
        *,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        with transaction(self.identity) as conn:
            user = self._get_for_update(conn, user_id)
            conn.execute(
                update(users)
                .where(users.c.id == user.id)
                .values(disabled_at=None, updated_at=datetime.now(UTC))
            )
            self._event(
                conn,
                "admin.user.enabled",
                actor,
                source,
                Target("user", user.id),
                {"was_disabled": user.disabled},
                context,
            )

    def set_roles(
        self,
        actor: Actor,
        source: Source,
        user_id: str,
        roles: list[str],
        *,
        context: Mapping[str, Any] | None = None,
    ) -> User:
        stored = format_roles(roles)
        with transaction(self.identity) as conn:
            user = self._get_for_update(conn, user_id)
            if (
                "admin" in user.roles
                and not _has_admin(stored)
                and self._would_remove_last_admin(conn, user.id)
            ):
                raise LastAdmin("cannot remove the admin role from the last enabled admin")
            conn.execute(
                update(users)
                .where(users.c.id == user.id)
                .values(roles=stored, updated_at=datetime.now(UTC))
            )
            self._event(
                conn,
                "admin.user.roles_changed",
                actor,
                source,
                Target("user", user.id),
                {"before": user.roles, "after": stored.split()},
                context,
            )
            return self._get(conn, user.id)

    def revoke_sessions(self, actor: Actor, source: Source, user_id: str) -> int:
        with transaction(self.identity) as conn:
            user = self._get_for_update(conn, user_id)
            revoked = revoke_user_sessions(conn, user.id, "admin")
            self._event(
                conn,
                "admin.user.sessions_revoked",
                actor,
                source,
                Target("user", user.id),
                {"count": len(revoked)},
            )
        return len(revoked)

    def unlock(
        self,
        actor: Actor,
        source: Source,
        user_id: str,
        *,
        context: Mapping[str, Any] | None = None,
    ) -> bool:
        """Lift a brute-force lock on the user's address."""
        with transaction(self.identity) as conn:
            user = self._get_for_update(conn, user_id)
            lifted = self.throttle.unlock(conn, [Key.email(user.email)]) > 0
            enqueue_event(
                conn,
                AuditEvent(
                    action="account.unlocked",
                    outcome="success",
                    reason="admin",
                    actor=actor,
                    target=Target("user", user.id),
                    source=source,
                    metadata={"was_locked": lifted, **(context or {})},
                ),
            )
        return lifted

    def _get_for_update(self, conn: Connection, user_id: str) -> User:
        row = conn.execute(
            select(*USER_COLUMNS).where(users.c.id == user_id[:36]).with_for_update()
        ).first()
        if row is None:
            raise NotFound("no such user")
        return User.from_row(row)
