"""Single-use, expiring tokens (first-admin setup, MFA login step, mail links).

Only the SHA-256 of a token is stored. Consuming is one conditional UPDATE, so of many
parallel uses of one token exactly one succeeds.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, insert, select, update

from echo_auth.audit.events import uuid7
from echo_auth.db.identity_schema import one_time_tokens
from echo_auth.identity.tokens import new_token, token_hash

MAX_TOKEN_LENGTH = 256


def issue_token(
    conn: Connection, purpose: str, user_id: str | None, ttl: timedelta, *, replace: bool = False
) -> str:
    """A new token for ``purpose``; ``replace`` expires the user's earlier unused ones."""
    now = datetime.now(UTC)
    if replace:
        conn.execute(
            update(one_time_tokens)
            .where(
                one_time_tokens.c.purpose == purpose,
                one_time_tokens.c.user_id == user_id
                if user_id is not None
                else one_time_tokens.c.user_id.is_(None),
                one_time_tokens.c.used_at.is_(None),
                one_time_tokens.c.expires_at > now,
            )
            .values(expires_at=now)
        )
    token = new_token()
    conn.execute(
        insert(one_time_tokens).values(
            id=str(uuid7()),
            purpose=purpose,
            token_hash=token_hash(token),
            user_id=user_id,
            created_at=now,
            expires_at=now + ttl,
        )
    )
    return token


def peek_token(conn: Connection, purpose: str, token: str) -> str | None:
    """The user id of a live token, without using it up."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    row = conn.execute(
        select(one_time_tokens.c.user_id).where(
            one_time_tokens.c.token_hash == token_hash(token),
            one_time_tokens.c.purpose == purpose,
            one_time_tokens.c.used_at.is_(None),
            one_time_tokens.c.expires_at > datetime.now(UTC),
        )
    ).first()
    return None if row is None else row.user_id


def consume_token(conn: Connection, purpose: str, token: str) -> bool:
    """Mark a token used; True only for the one caller that used it first."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return False
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
