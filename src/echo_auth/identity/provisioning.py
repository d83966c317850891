"""Making accounts other than by sign-up: the first admin, and operators' ``user create``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, insert, update

from echo_auth.audit.events import Actor, AuditEvent, Source, Target, uuid7
from echo_auth.audit.outbox import enqueue_event
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import one_time_tokens
from echo_auth.identity.auth import AuthService, user_actor
from echo_auth.identity.errors import DomainError, InvalidToken
from echo_auth.identity.tokens import new_token, token_hash
from echo_auth.identity.users import (
    User,
    count_users,
    email_exists,
    format_roles,
    insert_user,
    normalize_email,
)

BOOTSTRAP = "bootstrap_admin"
BOOTSTRAP_ROLES = ("admin", "auditor")


class EmailTaken(DomainError):
    """An account with this email already exists."""

    code = "email_taken"


def issue_bootstrap_token(conn: Connection, ttl: timedelta) -> str | None:
    """A one-time token to create the first admin, or None when any user exists."""
    if count_users(conn) > 0:
        return None
    now = datetime.now(UTC)
    token = new_token()
    # Only the newest bootstrap token works: earlier ones expire now.
    conn.execute(
        update(one_time_tokens)
        .where(one_time_tokens.c.purpose == BOOTSTRAP, one_time_tokens.c.used_at.is_(None))
        .values(expires_at=now)
    )
    conn.execute(
        insert(one_time_tokens).values(
            id=str(uuid7()),
            purpose=BOOTSTRAP,
            token_hash=token_hash(token),
            created_at=now,
            expires_at=now + ttl,
        )
    )
    enqueue_event(
        conn,
        AuditEvent(
            action="admin.bootstrap.token_issued",
            outcome="success",
            actor=Actor.system(),
            metadata={"expires_at": (now + ttl).strftime("%Y-%m-%dT%H:%M:%SZ")},
        ),
    )
    return token


def consume_token(conn: Connection, purpose: str, token: str) -> bool:
    """Mark a one-time token used; True only for the one caller that used it first."""
    now = datetime.now(UTC)
    result = conn.execute(
        update(one_time_tokens)
        .where(
            one_time_tokens.c.token_hash == token_hash(token),
            one_time_tokens.c.purpose == purpose,
            one_time_tokens.c.used_at.is_(None),
            one_time_tokens.c.expires_at > now,
        )
        .values(used_at=now)
    )
    return result.rowcount == 1


def redeem_bootstrap_token(
    auth: AuthService, token: str, raw_email: str, password: str, source: Source
) -> User:
    """Create the first admin (roles admin and auditor) with a one-time bootstrap token."""
    email = normalize_email(raw_email)
    auth.check_password(password)
    password_hash = auth.hasher.hash(password)
    with transaction(auth.identity) as conn:
        if len(token) > 256 or not consume_token(conn, BOOTSTRAP, token) or count_users(conn):
            raise InvalidToken("the setup token is unknown, used or expired")
        user = insert_user(
            conn,
            email=email,
            password_hash=password_hash,
            roles=format_roles(BOOTSTRAP_ROLES),
            verified=True,
        )
        enqueue_event(
            conn,
            AuditEvent(
                action="user.signed_up",
                outcome="success",
                actor=user_actor(user),
                target=Target("user", user.id),
                source=source,
                metadata={"via": "bootstrap", "roles": user.roles},
            ),
        )
    return user


def create_user_by_operator(
    auth: AuthService,
    raw_email: str,
    password: str,
    roles: list[str],
    operator: Actor,
    source: Source,
) -> User:
    """An operator (the CLI) creates an account; its address counts as verified."""
    email = normalize_email(raw_email)
    stored_roles = format_roles(roles)
    auth.check_password(password)
    password_hash = auth.hasher.hash(password)
    with transaction(auth.identity) as conn:
        if email_exists(conn, email):
            raise EmailTaken()
        user = insert_user(
            conn, email=email, password_hash=password_hash, roles=stored_roles, verified=True
        )
        enqueue_event(
            conn,
            AuditEvent(
                action="user.signed_up",
                outcome="success",
                actor=operator,
                target=Target("user", user.id),
                source=source,
                metadata={"via": "cli", "roles": user.roles},
            ),
        )
    return user
