"""The durable queue in front of the audit log: a table in the identity database.

Guarantee: :func:`enqueue_event` writes into the caller's transaction, so the event exists
if and only if the caller's change commits. Nothing here commits.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, insert

from echo_auth.audit.events import AuditEvent
from echo_auth.db.identity_schema import audit_outbox

_INSERT = insert(audit_outbox)


def enqueue_event(conn: Connection, event: AuditEvent) -> None:
    """Queue one event in the caller's (identity database) transaction."""
    enqueue_events(conn, (event,))


def enqueue_events(conn: Connection, events: Iterable[AuditEvent]) -> None:
    rows = [
        {
            "event_id": e.event_id,
            "payload": e.canonical(),
            "created_at": e.occurred_at,
            "available_at": e.occurred_at,
        }
        for e in events
    ]
    if rows:
        conn.execute(_INSERT, rows)
