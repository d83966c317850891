"""Mailed links: confirming an address, resetting a forgotten password.

Both are single-use tokens in ``one_time_tokens`` (only their SHA-256 is stored), issued
together with their audit event in one transaction and mailed only after that commits:
a mail never goes out for a token that does not exist, and the log never misses a token
that does. Using one is one conditional UPDATE (``consume_token``), so of many parallel
uses exactly one succeeds.

Mail delivery is deliberately not part of the outcome. When the mailer fails after the
commit, the failure is logged (kind of error and user id, never the message, the link
or the address) and recorded as its own event, ``mail.delivery.failed`` (outcome
``failure``), which names the event of the token that was not delivered. The request
itself still succeeds: its token exists and its event is true, and the user can simply
ask again (resend, or a new reset), which replaces the undelivered token. Failing the
request instead would tell an anonymous caller whether the address has an account.

Answers never depend on whether an address has an account. Every path writes the
event of its action and the refusals record the truth (``unknown_user``,
``already_verified``, ``account_disabled``, ``too_many_mails``). The remaining
difference in work, the mail itself, is taken off the response by the HTTP routes,
which run these flows after the response has been sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Final, NoReturn
from urllib.parse import urlencode

from sqlalchemy import Connection, Engine, func, select, update

from echo_auth.audit.events import Actor, AuditEvent, Source, Target
from echo_auth.audit.outbox import enqueue_event
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import one_time_tokens, users
from echo_auth.identity.auth import AccountDisabled, AuthService, user_actor
from echo_auth.identity.errors import InvalidToken
from echo_auth.identity.mail import Mailer, compose_message, describe_duration, describe_send_error
from echo_auth.identity.one_time import consume_token, issue_token, peek_token
from echo_auth.identity.sessions import revoke_user_sessions
from echo_auth.identity.users import (
    User,
    check_password_policy,
    find_by_email,
    find_by_id,
    normalize_email,
)

VERIFY_EMAIL: Final = "verify_email"
PASSWORD_RESET: Final = "password_reset"  # noqa: S105 - a token purpose, not a password

log = logging.getLogger("echo_auth.mail")


@dataclass(frozen=True)
class _Outgoing:
    """A composed message waiting for its transaction to commit."""

    message: EmailMessage
    template: str
    user_id: str
    event_id: str | None
    source: Source


@dataclass
class EmailFlows:
    """Email verification, password reset and the sign-up notice.

    ``auth`` lends its password hasher and policy lengths; ``mails_per_hour`` caps the
    token mails (per user and purpose) that anonymous callers can trigger, so resend and
    reset cannot be used to flood someone's mailbox.
    """

    identity: Engine
    auth: AuthService
    mailer: Mailer
    base_url: str
    mail_from: str
    verify_ttl: timedelta = timedelta(hours=24)
    reset_ttl: timedelta = timedelta(hours=1)
    mails_per_hour: int = 5

    # -- email verification -----------------------------------------------------------

    def start_verification(
        self, user_id: str, email: str, source: Source, *, actor: Actor | None = None
    ) -> None:
        """Issue a verification token for the user's address and mail its link.

        Earlier unused verification tokens of the user stop working. The token and the
        ``user.email_verification.sent`` event commit together; the mail goes after.
        ``actor`` defaults to the user. Nothing happens when the user is gone or
        ``email`` is no longer their address; over ``mails_per_hour`` the event is
        recorded as denied (``too_many_mails``) and no mail goes out.
        """
        with transaction(self.identity) as conn:
            user = find_by_id(conn, user_id)
            outgoing = None
            if user is not None and user.email == normalize_email(email):
                outgoing = self._issue_verification(
                    conn, user, source, actor or user_actor(user), via="direct"
                )
        self._deliver(outgoing)

    def confirm_verification(self, token: str, source: Source) -> None:
        """Use a verification token: the address of its user counts as confirmed.

        Unknown, used, expired or forged tokens raise :class:`InvalidToken`; the refusal
        is recorded (``user.email_verified``, failure, ``invalid_token``).
        """
        with transaction(self.identity) as conn:
            user_id = peek_token(conn, VERIFY_EMAIL, token)
            user = find_by_id(conn, user_id) if user_id else None
            if user is None or not consume_token(conn, VERIFY_EMAIL, token):
                enqueue_event(
                    conn,
                    AuditEvent(
                        action="user.email_verified",
                        outcome="failure",
                        reason="invalid_token",
                        actor=Actor.anonymous(),
                        target=Target("user", None),
                        source=source,
                    ),
                )
                raise InvalidToken("the verification link is unknown, used or expired")
            newly = _mark_verified(conn, user.id)
            enqueue_event(
                conn,
                AuditEvent(
                    action="user.email_verified",
                    outcome="success",
                    actor=user_actor(user),
                    target=Target("user", user.id),
                    source=source,
                    metadata={"via": "link", "already_verified": not newly},
                ),
            )

    def resend_verification(self, raw_email: str, source: Source) -> None:
        """Mail a fresh verification link, if the address has an unverified account.

        The caller learns nothing: the same (no) answer for unknown, verified, disabled
        and unverified addresses. Each case is recorded as ``user.email_verification.sent``
        with its truth (``unknown_user``, ``already_verified``, ...).
        """
        email = normalize_email(raw_email)
        asker = Actor("anonymous", None, email)
        with transaction(self.identity) as conn:
            found = find_by_email(conn, email)
            user = found[0] if found else None
            refusal = _refusal(user, verified_is_refused=True)
            outgoing = None
            if refusal is None and user is not None:
                outgoing = self._issue_verification(conn, user, source, asker, via="resend")
            else:
                enqueue_event(
                    conn,
                    AuditEvent(
                        action="user.email_verification.sent",
                        outcome="failure",
                        reason=refusal,
                        actor=asker,
                        target=Target("user", user.id if user else None),
                        source=source,
                        metadata={"via": "resend"},
                    ),
                )
        self._deliver(outgoing)

    def after_signup(
        self, raw_email: str, source: Source, *, signed_up_id: str | None = None
    ) -> None:
        """What follows a sign-up, whose answer does not say if the address was taken.

        An unverified account gets a verification mail (a new one, or the same again
        for a repeated sign-up); an already verified account gets a notice that someone
        tried to sign up with its address. Both paths mail once. ``signed_up_id`` is what
        sign-up answered: it tells a new account (the actor is its user) from a repeat
        (the actor is anonymous).
        """
        email = normalize_email(raw_email)
        with transaction(self.identity) as conn:
            found = find_by_email(conn, email)
            user = found[0] if found else None
            outgoing = None
            if user is not None and not user.disabled:
                if user.email_verified:
                    outgoing = self._signup_notice(user, source)
                elif user.id == signed_up_id:
                    outgoing = self._issue_verification(
                        conn, user, source, user_actor(user), via="signup"
                    )
                else:
                    outgoing = self._issue_verification(
                        conn, user, source, Actor("anonymous", None, email), via="signup_repeat"
                    )
        self._deliver(outgoing)

    def notify_signup_attempt(self, raw_email: str) -> None:
        """Tell the owner of ``raw_email`` that someone tried to sign up with it.

        No event of its own: the sign-up already recorded ``user.signed_up`` (failure,
        ``email_taken``). A failed delivery is recorded as ``mail.delivery.failed``.
        """
        email = normalize_email(raw_email)
        with transaction(self.identity, write=False) as conn:
            found = find_by_email(conn, email)
        if found is not None:
            self._deliver(self._signup_notice(found[0], Source()))

    # -- password reset ---------------------------------------------------------------

    def request_reset(self, raw_email: str, source: Source) -> None:
        """Mail a single-use reset link if the address has an (enabled) account.

        The outward result is always the same (``None``); the event
        ``password.reset.requested`` records the truth: success with the user as target,
        or failure with reason ``unknown_user`` (actor anonymous, labelled with the
        address as typed), ``account_disabled`` or ``too_many_mails``. The actor is
        anonymous in every case: whoever asks is not signed in.
        """
        email = normalize_email(raw_email)
        asker = Actor("anonymous", None, email)
        with transaction(self.identity) as conn:
            found = find_by_email(conn, email)
            user = found[0] if found else None
            refusal = _refusal(user, verified_is_refused=False)
            if refusal is None and user is not None:
                refusal = self._over_mail_limit(conn, user.id, PASSWORD_RESET)
            outgoing = None
            if refusal is None and user is not None:
                token = issue_token(conn, PASSWORD_RESET, user.id, self.reset_ttl, replace=True)
                event = AuditEvent(
                    action="password.reset.requested",
                    outcome="success",
                    actor=asker,
                    target=Target("user", user.id),
                    source=source,
                    metadata={"expires_at": _stamp(datetime.now(UTC) + self.reset_ttl)},
                )
                outgoing = _Outgoing(
                    self._compose(
                        "reset_password",
                        user,
                        link=self._link("/reset-password", token),
                        token=token,
                        expires_in=describe_duration(self.reset_ttl),
                    ),
                    "reset_password",
                    user.id,
                    event.event_id,
                    source,
                )
            else:
                event = AuditEvent(
                    action="password.reset.requested",
                    outcome="failure" if refusal != "too_many_mails" else "denied",
                    reason=refusal,
                    actor=asker,
                    target=Target("user", user.id if user else None),
                    source=source,
                )
            enqueue_event(conn, event)
        self._deliver(outgoing)

    def complete_reset(self, token: str, new_password: str, source: Source) -> None:
        """Set a new password with a reset token; every session of the user is revoked.

        Order: find the token's user (read-only), check the policy (which needs the
        address), hash with no transaction open, then in one transaction use the token
        up, write the password, revoke the sessions and record it. A weak password
        raises :class:`WeakPassword` and leaves the token usable. A reset proves control
        of the mailbox, so an unverified address becomes verified (and that is recorded
        as ``user.email_verified``). Events: ``password.reset.completed`` with
        ``sessions_revoked``, plus ``session.revoked`` when there were any.
        """
        with transaction(self.identity, write=False) as conn:
            user_id = peek_token(conn, PASSWORD_RESET, token)
            user = find_by_id(conn, user_id) if user_id else None
        if user is None:
            self._refuse_reset(source)
        auth = self.auth
        check_password_policy(
            new_password,
            min_length=auth.password_min_length,
            max_length=auth.password_max_length,
            email=user.email,
        )
        new_hash = auth.hasher.hash(new_password)
        with transaction(self.identity) as conn:
            current = find_by_id(conn, user.id)
            if current is not None and current.disabled:
                enqueue_event(conn, _reset_failed(user_actor(current), "account_disabled", source))
                raise AccountDisabled()
            if current is None or not consume_token(conn, PASSWORD_RESET, token):
                enqueue_event(conn, _reset_failed(Actor.anonymous(), "invalid_token", source))
                raise InvalidToken("the reset link is unknown, used or expired")
            now = datetime.now(UTC)
            conn.execute(
                update(users)
                .where(users.c.id == current.id)
                .values(password_hash=new_hash, password_changed_at=now, updated_at=now)
            )
            # Other reset links mailed earlier stop working with this one.
            conn.execute(
                update(one_time_tokens)
                .where(
                    one_time_tokens.c.user_id == current.id,
                    one_time_tokens.c.purpose == PASSWORD_RESET,
                    one_time_tokens.c.used_at.is_(None),
                    one_time_tokens.c.expires_at > now,
                )
                .values(expires_at=now)
            )
            newly_verified = _mark_verified(conn, current.id)
            revoked = revoke_user_sessions(conn, current.id, "password_reset")
            actor = user_actor(current)
            target = Target("user", current.id)
            events = [
                AuditEvent(
                    action="password.reset.completed",
                    outcome="success",
                    actor=actor,
                    target=target,
                    source=source,
                    metadata={"sessions_revoked": len(revoked)},
                )
            ]
            if revoked:
                events.append(
                    AuditEvent(
                        action="session.revoked",
                        outcome="success",
                        reason="password_reset",
                        actor=actor,
                        target=target,
                        source=source,
                        metadata={"count": len(revoked)},
                    )
                )
            if newly_verified:
                events.append(
                    AuditEvent(
                        action="user.email_verified",
                        outcome="success",
                        actor=actor,
                        target=target,
                        source=source,
                        metadata={"via": "password_reset", "already_verified": False},
                    )
                )
            for event in events:
                enqueue_event(conn, event)

    # -- internals --------------------------------------------------------------------

    def _issue_verification(
        self, conn: Connection, user: User, source: Source, actor: Actor, *, via: str
    ) -> _Outgoing | None:
        refusal = self._over_mail_limit(conn, user.id, VERIFY_EMAIL)
        if refusal is not None:
            enqueue_event(
                conn,
                AuditEvent(
                    action="user.email_verification.sent",
                    outcome="denied",
                    reason=refusal,
                    actor=actor,
                    target=Target("user", user.id),
                    source=source,
                    metadata={"via": via},
                ),
            )
            return None
        token = issue_token(conn, VERIFY_EMAIL, user.id, self.verify_ttl, replace=True)
        event = AuditEvent(
            action="user.email_verification.sent",
            outcome="success",
            actor=actor,
            target=Target("user", user.id),
            source=source,
            metadata={"via": via, "expires_at": _stamp(datetime.now(UTC) + self.verify_ttl)},
        )
        enqueue_event(conn, event)
        message = self._compose(
            "verify_email",
            user,
            link=self._link("/verify-email", token),
            token=token,
            expires_in=describe_duration(self.verify_ttl),
        )
        return _Outgoing(message, "verify_email", user.id, event.event_id, source)

    def _signup_notice(self, user: User, source: Source) -> _Outgoing:
        message = self._compose(
            "signup_attempt", user, login_link=f"{self.base_url.rstrip('/')}/login"
        )
        return _Outgoing(message, "signup_attempt", user.id, None, source)

    def _over_mail_limit(self, conn: Connection, user_id: str, purpose: str) -> str | None:
        since = datetime.now(UTC) - timedelta(hours=1)
        recent = conn.execute(
            select(func.count())
            .select_from(one_time_tokens)
            .where(
                one_time_tokens.c.user_id == user_id,
                one_time_tokens.c.purpose == purpose,
                one_time_tokens.c.created_at > since,
            )
        ).scalar_one()
        return "too_many_mails" if recent >= self.mails_per_hour else None

    def _compose(self, template: str, user: User, **context: object) -> EmailMessage:
        return compose_message(
            template,
            to=user.email,
            sender=self.mail_from,
            context={"email": user.email, **context},
        )

    def _link(self, path: str, token: str) -> str:
        return f"{self.base_url.rstrip('/')}{path}?{urlencode({'token': token})}"

    def _refuse_reset(self, source: Source) -> NoReturn:
        with transaction(self.identity) as conn:
            enqueue_event(conn, _reset_failed(Actor.anonymous(), "invalid_token", source))
        raise InvalidToken("the reset link is unknown, used or expired")

    def _deliver(self, outgoing: _Outgoing | None) -> None:
        """Send after the commit; a failure is logged and recorded, never raised."""
        if outgoing is None:
            return
        try:
            self.mailer.send(outgoing.message)
        except OSError as exc:  # smtplib.SMTPException, ssl.SSLError and timeouts are OSErrors
            log.warning(
                "could not send the %s mail for user %s: %s",
                outgoing.template,
                outgoing.user_id,
                describe_send_error(exc),
            )
            metadata: dict[str, str] = {"template": outgoing.template}
            if outgoing.event_id is not None:
                metadata["for_event"] = outgoing.event_id
            with transaction(self.identity) as conn:
                enqueue_event(
                    conn,
                    AuditEvent(
                        action="mail.delivery.failed",
                        outcome="failure",
                        reason=type(exc).__name__[:64],
                        actor=Actor.system(),
                        target=Target("user", outgoing.user_id),
                        source=outgoing.source,
                        metadata=metadata,
                    ),
                )


def _refusal(user: User | None, *, verified_is_refused: bool) -> str | None:
    if user is None:
        return "unknown_user"
    if user.disabled:
        return "account_disabled"
    if verified_is_refused and user.email_verified:
        return "already_verified"
    return None


def _reset_failed(actor: Actor, reason: str, source: Source) -> AuditEvent:
    return AuditEvent(
        action="password.reset.completed",
        outcome="failure",
        reason=reason,
        actor=actor,
        target=Target("user", actor.id),
        source=source,
    )


def _mark_verified(conn: Connection, user_id: str) -> bool:
    """Set ``email_verified_at`` unless it is set; True when this call set it."""
    now = datetime.now(UTC)
    result = conn.execute(
        update(users)
        .where(users.c.id == user_id, users.c.email_verified_at.is_(None))
        .values(email_verified_at=now, updated_at=now)
    )
    return result.rowcount == 1


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
