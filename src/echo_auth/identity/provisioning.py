"""Making accounts other than by sign-up: the first admin, and operators' ``user create``."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from echo_auth.audit.events import Actor, AuditEvent, Source, Target
from echo_auth.audit.outbox import enqueue_event
from echo_auth.db.engines import transaction
from echo_auth.identity.auth import AuthService, user_actor
from echo_auth.identity.errors import DomainError, InvalidToken
from echo_auth.identity.one_time import consume_token, issue_token
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
    # Only the newest bootstrap token works: earlier ones expire now.
    token = issue_token(conn, BOOTSTRAP, None, ttl, replace=True)
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


def redeem_bootstrap_token(
    auth: AuthService, token: str, raw_email: str, password: str, source: Source
) -> User:
    """Create the first admin (roles admin and auditor) with a one-time bootstrap token."""
    email = normalize_email(raw_email)
    auth.check_password(password, email)
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
    *,
    context: Mapping[str, Any] | None = None,
) -> User:
    """An operator (the CLI) creates an account; its address counts as verified.

    ``context``: extra metadata for the event, such as the CLI's command line."""
    email = normalize_email(raw_email)
    stored_roles = format_roles(roles)
    auth.check_password(password, email)
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
                metadata={"via": "cli", "roles": user.roles, **(context or {})},
            ),
        )
    return user
