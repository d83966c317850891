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
from datetime import UTC, datetime, timedelta

import anyio.to_thread
from sqlalchemy import Connection, Engine, update
from sqlalchemy.exc import IntegrityError

from echo_auth.audit.events import Actor, AuditEvent, Source, Target, uuid7
from echo_auth.audit.outbox import enqueue_event, enqueue_events
from echo_auth.db.async_reads import AsyncReader
from echo_auth.db.engines import single_read, transaction
from echo_auth.db.identity_schema import users
from echo_auth.identity.devices import find_device, remember_device, touch_device
from echo_auth.identity.errors import DomainError, InvalidCredentials, InvalidToken
from echo_auth.identity.mfa import InvalidMfaCode, check_code
from echo_auth.identity.one_time import consume_token, issue_token, peek_token
from echo_auth.identity.passwords import PasswordHasherProtocol
from echo_auth.identity.sessions import (
    CurrentSession,
    ExpiredSession,
    NewSession,
    SessionPolicy,
    create_session,
    end_expired_session,
    resolve_session,
    resolve_session_async,
    revoke_session,
    touch_session,
)
from echo_auth.identity.throttle import Key, RateLimited, Throttle
from echo_auth.identity.users import (
    User,
    check_password_policy,
    email_exists,
    find_by_email,
    find_by_id,
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
    # A new device cookie to set, when this browser was not a known device of the user.
    device_token: str | None = None


@dataclass(frozen=True)
class MfaChallenge:
    mfa_token: str


MFA_LOGIN = "mfa_login"


def user_actor(user: User) -> Actor:
    return Actor("user", user.id, user.email)


@dataclass
class AuthService:
    identity: Engine
    # Autocommitted single reads for the hot path (see db.engines.make_engine).
    reads: Engine
    hasher: PasswordHasherProtocol
    sessions: SessionPolicy
    throttle: Throttle
    password_min_length: int = 12
    password_max_length: int = 1024
    mfa_token_ttl: timedelta = timedelta(minutes=5)
    # The same reads on the event loop, where the database has an async driver (MySQL).
    async_reads: AsyncReader | None = None

    def check_password(self, password: str, email: str | None = None) -> None:
        check_password_policy(
            password,
            min_length=self.password_min_length,
            max_length=self.password_max_length,
            email=email,
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
        self.check_password(password, email)
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

    # -- login ------------------------------------------------------------------------

    def login(
        self, raw_email: str, password: str, source: Source, device_token: str | None = None
    ) -> LoginResult | MfaChallenge:
        """Check a password; open a session, or ask for the second factor.

        Unknown address and wrong password raise the same :class:`InvalidCredentials`
        after the same work (a verify against a dummy hash); the event says which. Every
        attempt first reserves a slot with the brute-force throttle (see throttle.py).
        """
        email = normalize_email(raw_email)
        if len(password) > self.password_max_length:
            password = password[: self.password_max_length + 1]  # bounded work, still wrong
        with transaction(self.identity, write=False) as conn:
            found = find_by_email(conn, email)
            device_id = find_device(conn, device_token, found[0].id) if found else None
        actor = user_actor(found[0]) if found else Actor("anonymous", None, email)
        user_id = found[0].id if found else None
        keys = [Key("device", device_id) if device_id else Key.email(email)]
        if source.ip:
            keys.append(Key("ip", source.ip))
        self.reserve_attempt(keys, actor, user_id, source, "auth.login.failed")
        if found is None:
            self.hasher.verify_dummy(password)
            self._refuse(keys, actor, None, "unknown_user", source)
        assert found is not None
        user, stored_hash = found
        if not self.hasher.verify(stored_hash, password):
            self._refuse(keys, actor, user.id, "bad_password", source)
        new_hash = self.hasher.hash(password) if self.hasher.needs_rehash(stored_hash) else None
        with transaction(self.identity) as conn:
            if user.disabled:
                enqueue_event(conn, self._failed(actor, user.id, "account_disabled", source))
                raise AccountDisabled()
            self.throttle.succeeded(conn, keys)
            if new_hash is not None:
                conn.execute(
                    update(users)
                    .where(users.c.id == user.id)
                    .values(password_hash=new_hash, updated_at=datetime.now(UTC))
                )
            if user.mfa_enabled:
                mfa_token = issue_token(conn, MFA_LOGIN, user.id, self.mfa_token_ttl)
                enqueue_event(
                    conn,
                    AuditEvent(
                        action="auth.mfa.challenged",
                        outcome="success",
                        actor=actor,
                        target=Target("user", user.id),
                        source=source,
                        metadata={"factor": "totp", "rehashed": new_hash is not None},
                    ),
                )
                return MfaChallenge(mfa_token)
            return self._open_session(conn, user, source, device_id, mfa=False)

    def complete_mfa(
        self, mfa_token: str, code: str, source: Source, device_token: str | None = None
    ) -> LoginResult:
        """Second step: a TOTP or recovery code for the challenge from :meth:`login`."""
        with transaction(self.identity, write=False) as conn:
            user_id = peek_token(conn, MFA_LOGIN, mfa_token)
            user = find_by_id(conn, user_id) if user_id else None
            device_id = find_device(conn, device_token, user.id) if user else None
        if user is None:
            with transaction(self.identity) as conn:
                enqueue_event(
                    conn,
                    AuditEvent(
                        action="auth.mfa.failed",
                        outcome="failure",
                        reason="invalid_mfa_token",
                        actor=Actor.anonymous(),
                        source=source,
                    ),
                )
            raise InvalidToken("the MFA token is unknown, used or expired; log in again")
        actor = user_actor(user)
        keys = [Key("mfa", user.id)]
        if source.ip:
            keys.append(Key("ip", source.ip))
        self.reserve_attempt(keys, actor, user.id, source, "auth.mfa.failed")
        with transaction(self.identity) as conn:
            method = check_code(conn, user.id, code, source=source) if len(code) <= 64 else None
            if method is not None and consume_token(conn, MFA_LOGIN, mfa_token):
                self.throttle.succeeded(conn, keys)
                enqueue_event(
                    conn,
                    AuditEvent(
                        action="auth.mfa.succeeded",
                        outcome="success",
                        actor=actor,
                        target=Target("user", user.id),
                        source=source,
                        metadata={"method": method},
                    ),
                )
                if user.disabled:
                    raise AccountDisabled()
                return self._open_session(conn, user, source, device_id, mfa=True)
            conn.rollback()  # a code that matched is not used up by a login that failed
        with transaction(self.identity) as conn:
            enqueue_event(
                conn,
                AuditEvent(
                    action="auth.mfa.failed",
                    outcome="failure",
                    reason="invalid_code" if method is None else "invalid_mfa_token",
                    actor=actor,
                    target=Target("user", user.id),
                    source=source,
                ),
            )
            self.record_locks(conn, keys, actor, user.id, source)
        raise InvalidMfaCode()

    def _open_session(
        self, conn: Connection, user: User, source: Source, device_id: str | None, *, mfa: bool
    ) -> LoginResult:
        session = create_session(
            conn, user.id, self.sessions, ip=source.ip, user_agent=source.user_agent
        )
        new_device = None
        if device_id is None:
            new_device = remember_device(conn, user.id)
        else:
            touch_device(conn, device_id)
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
                    "mfa": mfa,
                    "new_device": new_device is not None,
                },
            ),
        )
        return LoginResult(session, user, new_device)

    def reserve_attempt(
        self, keys: list[Key], actor: Actor, user_id: str | None, source: Source, action: str
    ) -> None:
        try:
            self.throttle.reserve(keys)
        except RateLimited as exc:
            with transaction(self.identity) as conn:
                enqueue_event(
                    conn,
                    AuditEvent(
                        action="auth.throttled",
                        outcome="denied",
                        reason=f"{exc.scope}_limited",
                        actor=actor,
                        target=Target("user", user_id),
                        source=source,
                        metadata={"retry_after_s": exc.retry_after, "step": action},
                    ),
                )
            raise

    def record_locks(
        self, conn: Connection, keys: list[Key], actor: Actor, user_id: str | None, source: Source
    ) -> None:
        for lock in self.throttle.failed(conn, keys):
            on_account = lock.key.scope != "ip"
            enqueue_event(
                conn,
                AuditEvent(
                    action="account.locked" if on_account else "auth.throttled",
                    outcome="denied",
                    reason=f"{lock.key.scope}_locked",
                    actor=actor,
                    target=Target("user", user_id) if on_account else Target("ip", source.ip),
                    source=source,
                    metadata={"locked_until": lock.until.strftime("%Y-%m-%dT%H:%M:%SZ")},
                ),
            )

    def _failed(self, actor: Actor, user_id: str | None, reason: str, source: Source) -> AuditEvent:
        return AuditEvent(
            action="auth.login.failed",
            outcome="failure",
            reason=reason,
            actor=actor,
            target=Target("user", user_id),
            source=source,
        )

    def _refuse(
        self, keys: list[Key], actor: Actor, user_id: str | None, reason: str, source: Source
    ) -> None:
        with transaction(self.identity) as conn:
            enqueue_event(conn, self._failed(actor, user_id, reason, source))
            self.record_locks(conn, keys, actor, user_id, source)
        raise InvalidCredentials()

    # -- sessions -----------------------------------------------------------------------

    def authenticate(self, token: str) -> CurrentSession | None:
        """The live session for a token; touches last-seen at most once per interval.

        A session found run out is ended here, once, with a ``session.expired`` event.
        """
        with single_read(self.reads) as conn:
            found = resolve_session(conn, token, self.sessions)
        if isinstance(found, ExpiredSession):
            self._end_expired(found)
            return None
        if found is not None and found.needs_touch:
            self._touch(found.id)
        return found

    async def authenticate_async(self, token: str) -> CurrentSession | None:
        """:meth:`authenticate` for the event loop: no thread hop unless it must write."""
        if self.async_reads is None or self.async_reads.bound_elsewhere():
            return await anyio.to_thread.run_sync(self.authenticate, token)
        found = await resolve_session_async(self.async_reads, token, self.sessions)
        if isinstance(found, ExpiredSession):
            await anyio.to_thread.run_sync(self._end_expired, found)
            return None
        if found is not None and found.needs_touch:
            await anyio.to_thread.run_sync(self._touch, found.id)
        return found

    def _touch(self, session_id: str) -> None:
        with transaction(self.identity) as conn:
            touch_session(conn, session_id)

    def _end_expired(self, expired: ExpiredSession) -> None:
        with transaction(self.identity) as conn:
            if end_expired_session(conn, expired.id):
                enqueue_event(
                    conn,
                    AuditEvent(
                        action="session.expired",
                        outcome="success",
                        reason=f"{expired.reason}_timeout",
                        actor=Actor.system(),
                        target=Target("session", expired.id),
                        metadata={"user_id": expired.user.id},
                    ),
                )

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
