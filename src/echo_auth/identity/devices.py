"""Known devices: browsers that completed a login before, recognised by a device cookie.

The cookie holds a random token; only its hash is stored. A login attempt that presents a
valid device token for the account being tried is throttled on that device's own
counter, so an attacker elsewhere cannot lock the owner out of their own device.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Connection, insert, select, update

from echo_auth.audit.events import uuid7
from echo_auth.db.identity_schema import known_devices
from echo_auth.identity.tokens import new_token, token_hash

DEVICE_COOKIE = "echo_device"


def find_device(conn: Connection, token: str | None, user_id: str) -> str | None:
    """The device id if ``token`` is a known device of ``user_id``."""
    if not token or len(token) > 256:
        return None
    row = conn.execute(
        select(known_devices.c.id, known_devices.c.user_id).where(
            known_devices.c.token_hash == token_hash(token)
        )
    ).first()
    return row.id if row is not None and row.user_id == user_id else None


def remember_device(conn: Connection, user_id: str) -> str:
    """Register a new device for ``user_id``; returns the token for the cookie."""
    now = datetime.now(UTC)
    token = new_token()
    conn.execute(
        insert(known_devices).values(
            id=str(uuid7()),
            user_id=user_id,
            token_hash=token_hash(token),
            created_at=now,
            last_used_at=now,
        )
    )
    return token


def touch_device(conn: Connection, device_id: str) -> None:
    conn.execute(
        update(known_devices)
        .where(known_devices.c.id == device_id)
        .values(last_used_at=datetime.now(UTC))
    )
