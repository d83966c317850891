"""TOTP second factor (RFC 6238) and single-use recovery codes, in the caller's transaction.

The functions take the caller's connection and never commit: the request (or
:mod:`echo_auth.identity.auth` for the login step) owns the transaction, and every change
is written together with its audit event through
:func:`echo_auth.audit.outbox.enqueue_event`. The one exception is
:func:`remove_after_verification`, which checks a password and so, like the login, must
keep the argon2 run outside any transaction.

Guarantees:

* A TOTP code is accepted for the current 30-second step and one step either side, and a
  step is accepted at most once per user: using it moves ``last_used_step`` forward with
  one conditional UPDATE, so a replayed code (or two requests racing with one code) gets
  through exactly once. Accepting step N also retires every earlier step (RFC 6238 §5.2).
* A recovery code is marked used with one conditional UPDATE (``used_at IS NULL``), so of
  any number of parallel uses exactly one succeeds.
* Only SHA-256 hashes of recovery codes are stored (over the user id and the normalised
  code); the codes are shown once, at confirmation. The TOTP secret itself is stored as
  is: the server must compute codes from it.
* No secret, code or recovery code ever enters an event.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

import pyotp
import segno
from sqlalchemy import Connection, Engine, delete, func, insert, select, update

from echo_auth.audit.events import Actor, AuditEvent, Source, Target, uuid7
from echo_auth.audit.outbox import enqueue_event
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import mfa_totp, recovery_codes, users
from echo_auth.identity.errors import DomainError, InvalidCredentials
from echo_auth.identity.passwords import PasswordHasherProtocol
from echo_auth.identity.throttle import Key, RateLimited, Throttle
from echo_auth.identity.users import User

TOTP_DIGITS: Final = 6
TOTP_INTERVAL_S: Final = 30
# Steps accepted either side of the current one (clock drift, slow typing).
TOTP_VALID_WINDOW: Final = 1
RECOVERY_CODE_COUNT: Final = 10
RECOVERY_CODE_LENGTH: Final = 10
# No 0/o, 1/l/i: codes are read off paper and typed by hand. 31 symbols, ~49.5 bits a code.
RECOVERY_ALPHABET: Final = "abcdefghjkmnpqrstuvwxyz23456789"
MAX_CODE_LENGTH: Final = 64

Method = Literal["totp", "recovery"]
_TOTP_SHAPE = re.compile(rf"[0-9]{{{TOTP_DIGITS}}}")
_SEPARATORS = re.compile(r"[\s\-]+")


class MfaAlreadyEnabled(DomainError):
    """A confirmed TOTP factor already exists; remove it before enrolling again."""

    code = "mfa_already_enabled"


class MfaNotEnabled(DomainError):
    """There is no TOTP factor (or no pending enrolment) to act on."""

    code = "mfa_not_enabled"


class InvalidMfaCode(DomainError):
    """The code is wrong, expired or already used."""

    code = "invalid_mfa_code"
    keep_work = True


@dataclass(frozen=True, slots=True)
class Enrolment:
    """What the user needs to set up an authenticator app; the secret is shown only now."""

    secret: str
    otpauth_uri: str
    qr_svg: str


def _actor(user: User) -> Actor:
    # Not identity.auth.user_actor: auth imports this module.
    return Actor("user", user.id, user.email)


def _lock_user(conn: Connection, user_id: str) -> None:
    """Serialise factor changes of one user (MySQL row lock; SQLite's write lock already does)."""
    conn.execute(select(users.c.id).where(users.c.id == user_id).with_for_update()).first()


def _qr_svg(data: str) -> str:
    buffer = io.BytesIO()
    segno.make(data, error="m").save(
        buffer, kind="svg", xmldecl=False, svgns=True, nl=False, scale=4, light="#fff"
    )
    return buffer.getvalue().decode("utf-8")


def begin_enrolment(conn: Connection, user: User, issuer: str, source: Source) -> Enrolment:
    """Start (or restart) TOTP enrolment: a new secret, stored unconfirmed.

    Replaces an earlier unconfirmed secret. Refuses with :class:`MfaAlreadyEnabled` when a
    confirmed factor exists. Nothing is enabled until :func:`confirm_enrolment`; the step
    is still recorded (``mfa.totp.enrolment_started``) so a reviewer sees who began one.
    """
    _lock_user(conn, user.id)
    row = conn.execute(select(mfa_totp.c.confirmed_at).where(mfa_totp.c.user_id == user.id)).first()
    if row is not None and row.confirmed_at is not None:
        raise MfaAlreadyEnabled()
    secret = pyotp.random_base32()
    now = datetime.now(UTC)
    if row is None:
        conn.execute(insert(mfa_totp).values(user_id=user.id, secret=secret, created_at=now))
    else:
        conn.execute(
            update(mfa_totp)
            .where(mfa_totp.c.user_id == user.id, mfa_totp.c.confirmed_at.is_(None))
            .values(secret=secret, created_at=now, last_used_step=None)
        )
    enqueue_event(
        conn,
        AuditEvent(
            action="mfa.totp.enrolment_started",
            outcome="success",
            actor=_actor(user),
            target=Target("user", user.id),
            source=source,
            metadata={"factor": "totp", "restarted": row is not None},
        ),
    )
    uri = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_INTERVAL_S).provisioning_uri(
        name=user.email, issuer_name=issuer
    )
    return Enrolment(secret=secret, otpauth_uri=uri, qr_svg=_qr_svg(uri))


def confirm_enrolment(conn: Connection, user: User, code: str, source: Source) -> list[str]:
    """Prove the enrolment with a first code; enables MFA and returns 10 recovery codes.

    The codes are returned once and stored only as hashes. A wrong code raises
    :class:`InvalidMfaCode` after writing ``auth.mfa.failed`` (committed: ``keep_work``).
    """
    _lock_user(conn, user.id)
    row = conn.execute(
        select(mfa_totp.c.secret, mfa_totp.c.confirmed_at).where(mfa_totp.c.user_id == user.id)
    ).first()
    if row is None:
        raise MfaNotEnabled("no TOTP enrolment is pending; start one first")
    if row.confirmed_at is not None:
        raise MfaAlreadyEnabled()
    step = _matching_step(row.secret, code, time.time())
    if step is None:
        enqueue_event(
            conn,
            AuditEvent(
                action="auth.mfa.failed",
                outcome="failure",
                reason="invalid_code",
                actor=_actor(user),
                target=Target("user", user.id),
                source=source,
                metadata={"factor": "totp", "stage": "enrolment"},
            ),
        )
        raise InvalidMfaCode()
    now = datetime.now(UTC)
    conn.execute(
        update(mfa_totp)
        .where(mfa_totp.c.user_id == user.id)
        # The confirming code counts as used: it cannot be replayed at login.
        .values(confirmed_at=now, last_used_step=step)
    )
    conn.execute(
        update(users).where(users.c.id == user.id).values(mfa_enabled=True, updated_at=now)
    )
    codes = _replace_recovery_codes(conn, user.id, now)
    enqueue_event(
        conn,
        AuditEvent(
            action="mfa.totp.enrolled",
            outcome="success",
            actor=_actor(user),
            target=Target("user", user.id),
            source=source,
            metadata={"factor": "totp", "recovery_count": len(codes)},
        ),
    )
    return codes


def remove(conn: Connection, user: User, source: Source, *, verified_by: str = "password") -> None:
    """Delete the TOTP factor (or a pending enrolment) and all recovery codes.

    The caller must have re-verified the user first (their password, or a code through
    :func:`check_code` in this same transaction) and says how in ``verified_by``.
    Raises :class:`MfaNotEnabled` when there is nothing to remove.
    """
    _lock_user(conn, user.id)
    row = conn.execute(select(mfa_totp.c.confirmed_at).where(mfa_totp.c.user_id == user.id)).first()
    if row is None:
        raise MfaNotEnabled()
    now = datetime.now(UTC)
    conn.execute(delete(mfa_totp).where(mfa_totp.c.user_id == user.id))
    conn.execute(delete(recovery_codes).where(recovery_codes.c.user_id == user.id))
    conn.execute(
        update(users).where(users.c.id == user.id).values(mfa_enabled=False, updated_at=now)
    )
    enqueue_event(
        conn,
        AuditEvent(
            action="mfa.totp.removed",
            outcome="success",
            actor=_actor(user),
            target=Target("user", user.id),
            source=source,
            metadata={
                "factor": "totp",
                "was_confirmed": row.confirmed_at is not None,
                "verified_by": verified_by,
            },
        ),
    )


def check_code(
    conn: Connection,
    user_id: str,
    code: str,
    *,
    source: Source | None = None,
    now: float | None = None,
) -> Method | None:
    """Check a second-factor code of a user with a confirmed factor, and use it up.

    Six digits are a TOTP code (current step ±1, each step once); anything else is tried
    as a recovery code (spaces, hyphens and case ignored). Returns which kind worked, or
    None. Race-safe: the use is one conditional UPDATE, so of parallel uses of one code
    exactly one returns non-None. A recovery code writes ``mfa.recovery_code.used``
    (pass ``source`` so the event says where from); a TOTP code writes nothing, the
    caller records the step it was part of. A failure writes nothing either: the caller
    knows the context (login, removal) and records ``auth.mfa.failed`` or its own event.
    """
    cleaned = _SEPARATORS.sub("", code)
    if not cleaned or len(cleaned) > MAX_CODE_LENGTH:
        return None
    if _TOTP_SHAPE.fullmatch(cleaned):
        return "totp" if _use_totp(conn, user_id, cleaned, now) else None
    return "recovery" if _use_recovery_code(conn, user_id, cleaned, source) else None


# -- TOTP -----------------------------------------------------------------------------------


def _matching_step(secret: str, code: str, now: float) -> int | None:
    """The time step (current ±1) whose code equals ``code``, compared in constant time."""
    cleaned = _SEPARATORS.sub("", code)
    if not _TOTP_SHAPE.fullmatch(cleaned):
        return None
    totp = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_INTERVAL_S)
    current = int(now) // TOTP_INTERVAL_S
    matched: int | None = None
    # Every candidate is computed and compared, so timing does not say which one matched.
    for step in range(current - TOTP_VALID_WINDOW, current + TOTP_VALID_WINDOW + 1):
        if hmac.compare_digest(str(totp.generate_otp(step)), cleaned) and matched is None:
            matched = step
    return matched


def _use_totp(conn: Connection, user_id: str, code: str, now: float | None) -> bool:
    row = conn.execute(
        select(mfa_totp.c.secret).where(
            mfa_totp.c.user_id == user_id, mfa_totp.c.confirmed_at.is_not(None)
        )
    ).first()
    if row is None:
        return False
    step = _matching_step(row.secret, code, time.time() if now is None else now)
    if step is None:
        return False
    c = mfa_totp.c
    used = conn.execute(
        update(mfa_totp)
        .where(
            c.user_id == user_id,
            c.confirmed_at.is_not(None),
            (c.last_used_step.is_(None)) | (c.last_used_step < step),
        )
        .values(last_used_step=step)
    ).rowcount
    return used == 1


# -- recovery codes -------------------------------------------------------------------------


def normalize_recovery_code(code: str) -> str:
    return _SEPARATORS.sub("", code).lower()


def recovery_code_hash(user_id: str, code: str) -> str:
    """SHA-256 over the user id and the normalised code (hex): what the database keeps.

    A code has ~49.5 bits from the CSPRNG, so a fast hash is enough; the user id keeps equal
    codes of two users apart and makes a table of precomputed hashes useless.
    """
    material = f"{user_id}:{normalize_recovery_code(code)}"
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()


def new_recovery_code() -> str:
    """Ten symbols from :data:`RECOVERY_ALPHABET`, shown as ``abcde-fghij``."""
    raw = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(RECOVERY_CODE_LENGTH))
    half = RECOVERY_CODE_LENGTH // 2
    return f"{raw[:half]}-{raw[half:]}"


def _replace_recovery_codes(conn: Connection, user_id: str, now: datetime) -> list[str]:
    conn.execute(delete(recovery_codes).where(recovery_codes.c.user_id == user_id))
    codes: list[str] = []
    while len(codes) < RECOVERY_CODE_COUNT:
        candidate = new_recovery_code()
        if candidate not in codes:
            codes.append(candidate)
    conn.execute(
        insert(recovery_codes),
        [
            {
                "id": str(uuid7()),
                "user_id": user_id,
                "code_hash": recovery_code_hash(user_id, code),
                "created_at": now,
            }
            for code in codes
        ],
    )
    return codes


def _use_recovery_code(conn: Connection, user_id: str, code: str, source: Source | None) -> bool:
    normalized = normalize_recovery_code(code)
    if len(normalized) != RECOVERY_CODE_LENGTH:
        return False
    now = datetime.now(UTC)
    rc = recovery_codes.c
    used = conn.execute(
        update(recovery_codes)
        .where(
            rc.code_hash == recovery_code_hash(user_id, normalized),
            rc.user_id == user_id,
            rc.used_at.is_(None),
        )
        .values(used_at=now)
    ).rowcount
    if used != 1:
        return False
    remaining = conn.execute(
        select(func.count())
        .select_from(recovery_codes)
        .where(rc.user_id == user_id, rc.used_at.is_(None))
    ).scalar_one()
    email = conn.execute(select(users.c.email).where(users.c.id == user_id)).scalar_one_or_none()
    enqueue_event(
        conn,
        AuditEvent(
            action="mfa.recovery_code.used",
            outcome="success",
            actor=Actor("user", user_id, email),
            target=Target("user", user_id),
            source=source or Source(),
            metadata={"remaining": int(remaining)},
        ),
    )
    return True


# -- removal with re-verification (owns its transactions) -----------------------------------


def remove_after_verification(
    identity: Engine,
    hasher: PasswordHasherProtocol,
    throttle: Throttle,
    user: User,
    source: Source,
    *,
    password: str | None = None,
    code: str | None = None,
) -> None:
    """Remove the factor once the user proved it is them: their password or a code.

    The one use case here that owns its transactions, for the reason
    :mod:`echo_auth.identity.auth` gives: argon2 never runs inside a transaction. Attempts
    count on the user's ``mfa`` throttle key (shared with the login's second step), so a
    stolen session cannot guess passwords or codes here without limit. A wrong password
    raises :class:`InvalidCredentials`, a wrong code :class:`InvalidMfaCode`; both leave a
    failed ``mfa.totp.removed`` event. A code is used up in the same transaction that
    removes the factor.
    """
    if (password is None) == (code is None):
        raise ValueError("give exactly one of password and code")
    keys = [Key("mfa", user.id)]
    try:
        throttle.reserve(keys)
    except RateLimited as exc:
        with transaction(identity) as conn:
            enqueue_event(
                conn,
                AuditEvent(
                    action="auth.throttled",
                    outcome="denied",
                    reason=f"{exc.scope}_limited",
                    actor=_actor(user),
                    target=Target("user", user.id),
                    source=source,
                    metadata={"retry_after_s": exc.retry_after, "step": "mfa.totp.removed"},
                ),
            )
        raise
    password_ok = False
    if password is not None:
        with transaction(identity, write=False) as conn:
            stored = conn.execute(
                select(users.c.password_hash).where(users.c.id == user.id)
            ).scalar_one_or_none()
        password_ok = stored is not None and hasher.verify(stored, password)
    with transaction(identity) as conn:
        method: str | None = "password" if password_ok else None
        if code is not None:
            method = check_code(conn, user.id, code, source=source)
        if method is None:
            reason = "bad_password" if password is not None else "invalid_code"
            enqueue_event(
                conn,
                AuditEvent(
                    action="mfa.totp.removed",
                    outcome="failure",
                    reason=reason,
                    actor=_actor(user),
                    target=Target("user", user.id),
                    source=source,
                    metadata={"factor": "totp"},
                ),
            )
            for lock in throttle.failed(conn, keys):
                enqueue_event(
                    conn,
                    AuditEvent(
                        action="account.locked",
                        outcome="denied",
                        reason=f"{lock.key.scope}_locked",
                        actor=_actor(user),
                        target=Target("user", user.id),
                        source=source,
                        metadata={"locked_until": lock.until.strftime("%Y-%m-%dT%H:%M:%SZ")},
                    ),
                )
            if password is not None:
                raise InvalidCredentials("the password is not right")
            raise InvalidMfaCode()
        throttle.succeeded(conn, keys)
        remove(conn, user, source, verified_by=method)
