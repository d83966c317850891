"""Sign-up, login, logout and session checks: the use cases behind the HTTP routes.

These functions own their transactions, and for one reason: an argon2 run takes tens of
milliseconds and must never happen inside a database transaction (it would hold a
connection, and on SQLite the writer lock, for all that time). So a login reads in one
short transaction, checks the password with no transaction open, then writes the session
and its event in a second one. Every event is written in the transaction of the change
it records; refusals commit their event before the error propagates.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, update
from sqlalchemy.exc import IntegrityError

from echo_auth.audit.events import Actor, AuditEvent, Source, Target, uuid7
from echo_auth.audit.outbox import enqueue_event, enqueue_events
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import users
from echo_auth.identity.errors import DomainError, InvalidCredentials
from echo_auth.identity.passwords import PasswordHasherProtocol
from echo_auth.identity.sessions import (
    CurrentSession,
    NewSession,
    SessionPolicy,
    create_session,
    resolve_session,
    revoke_session,
    touch_session,
)
from echo_auth.identity.users import (
    User,
    check_password_policy,
    email_exists,
    find_by_email,
    format_roles,
    insert_user,
    normalize_email,
)


class AccountDisabled(DomainError):
    """This account is disabled."""

    code = "account_disabled"
    keep_work = True


@dataclass(frozen=True)
class LoginResult:
    session: NewSession
    user: User


def user_actor(user: User) -> Actor:
    return Actor("user", user.id, user.email)


@dataclass
class AuthService:
    identity: Engine
    hasher: PasswordHasherProtocol
    sessions: SessionPolicy
    password_min_length: int = 12
    password_max_length: int = 1024

    def check_password(self, password: str) -> None:
        check_password_policy(
            password, min_length=self.password_min_length, max_length=self.password_max_length
        )

    # -- sign-up ------------------------------------------------------------------------

    def signup(self, raw_email: str, password: str, source: Source) -> str:
        """Create an account; returns its id.

        An address that is already registered gets the same answer (a fresh, unused id)
        after the same work (one argon2 run), so sign-up cannot be used to discover who
        has an account. The event records the truth: ``user.signed_up`` failed with
        reason ``email_taken``.
        """
        email = normalize_email(raw_email)
        self.check_password(password)
        password_hash = self.hasher.hash(password)
        try:
            with transaction(self.identity) as conn:
                if not email_exists(conn, email):
                    user = insert_user(
                        conn, email=email, password_hash=password_hash, roles=format_roles(["user"])
                    )
                    enqueue_event(
                        conn,
                        AuditEvent(
                            action="user.signed_up",
                            outcome="success",
                            actor=user_actor(user),
                            target=Target("user", user.id),
                            source=source,
                            metadata={"via": "signup"},
                        ),
                    )
                    return user.id
        except IntegrityError:
            pass  # a concurrent sign-up with the same address won the insert
        with transaction(self.identity) as conn:
            enqueue_event(
                conn,
                AuditEvent(
                    action="user.signed_up",
                    outcome="failure",
                    reason="email_taken",
                    actor=Actor("anonymous", None, email),
                    target=Target("user", None),
                    source=source,
                    metadata={"via": "signup"},
                ),
            )
        return str(uuid7())

    # -- login --------------------------------------------------------------------------

    def login(self, raw_email: str, password: str, source: Source) -> LoginResult:
        """Check a password and open a session.

        Unknown address and wrong password raise the same :class:`InvalidCredentials`
        after the same work (a verify against a dummy hash); the event says which.
        """
        email = normalize_email(raw_email)
        if len(password) > self.password_max_length:
            password = password[: self.password_max_length + 1]  # bounded work, still wrong
        with transaction(self.identity, write=False) as conn:
            found = find_by_email(conn, email)
        if found is None:
            self.hasher.verify_dummy(password)
            self._refuse(Actor("anonymous", None, email), None, "unknown_user", source)
        assert found is not None
        user, stored_hash = found
        if not self.hasher.verify(stored_hash, password):
            self._refuse(user_actor(user), user.id, "bad_password", source)
        new_hash = self.hasher.hash(password) if self.hasher.needs_rehash(stored_hash) else None
        with transaction(self.identity) as conn:
            if user.disabled:
                enqueue_event(
                    conn, self._failed(user_actor(user), user.id, "account_disabled", source)
                )
                raise AccountDisabled()
            if new_hash is not None:
                conn.execute(
                    update(users)
                    .where(users.c.id == user.id)
                    .values(password_hash=new_hash, updated_at=datetime.now(UTC))
                )
            session = create_session(
                conn, user.id, self.sessions, ip=source.ip, user_agent=source.user_agent
            )
            enqueue_event(
                conn,
                AuditEvent(
                    action="auth.login.succeeded",
                    outcome="success",
                    actor=user_actor(user),
                    target=Target("user", user.id),
                    source=source,
                    metadata={
                        "session_id": session.id,
                        "mfa": False,
                        "rehashed": new_hash is not None,
                    },
                ),
            )
        return LoginResult(session, user)

    def _failed(self, actor: Actor, user_id: str | None, reason: str, source: Source) -> AuditEvent:
        return AuditEvent(
            action="auth.login.failed",
            outcome="failure",
            reason=reason,
            actor=actor,
            target=Target("user", user_id),
            source=source,
        )

    def _refuse(self, actor: Actor, user_id: str | None, reason: str, source: Source) -> None:
        with transaction(self.identity) as conn:
            enqueue_event(conn, self._failed(actor, user_id, reason, source))
        raise InvalidCredentials()

    # -- sessions -----------------------------------------------------------------------

    def authenticate(self, token: str) -> CurrentSession | None:
        """The live session for a token; touches last-seen at most once per interval."""
        with transaction(self.identity, write=False) as conn:
            current = resolve_session(conn, token, self.sessions)
        if current is not None and current.needs_touch:
            with transaction(self.identity) as conn:
                touch_session(conn, current.id)
        return current

    def logout(self, current: CurrentSession, source: Source) -> None:
        with transaction(self.identity) as conn:
            revoke_session(conn, current.id, "logout")
            enqueue_events(
                conn,
                [
                    AuditEvent(
                        action="auth.logout",
                        outcome="success",
                        actor=user_actor(current.user),
                        target=Target("session", current.id),
                        source=source,
                    )
                ],
            )
