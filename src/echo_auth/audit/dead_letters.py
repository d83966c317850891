"""Events the relay gave up on: listing them and putting them back on the queue."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, delete, insert, select

from echo_auth.audit.events import Actor, AuditEvent, Target
from echo_auth.audit.outbox import enqueue_event
from echo_auth.db.identity_schema import audit_dead_letters, audit_outbox


@dataclass(frozen=True)
class DeadLetter:
    event_id: str
    attempts: int
    last_error: str
    queued_at: datetime
    dead_at: datetime


def list_dead_letters(conn: Connection, limit: int = 100) -> list[DeadLetter]:
    rows = conn.execute(
        select(audit_dead_letters).order_by(audit_dead_letters.c.id).limit(limit)
    ).all()
    return [DeadLetter(r.event_id, r.attempts, r.last_error, r.queued_at, r.dead_at) for r in rows]


def retry_dead_letters(conn: Connection, actor: Actor) -> int:
    """Move every dead letter back to the outbox with a fresh attempt count (one transaction)."""
    rows = conn.execute(select(audit_dead_letters)).all()
    now = datetime.now(UTC)
    for row in rows:
        conn.execute(
            insert(audit_outbox).values(
                event_id=row.event_id,
                payload=row.payload,
                created_at=row.queued_at,
                available_at=now,
                attempts=0,
            )
        )
        conn.execute(delete(audit_dead_letters).where(audit_dead_letters.c.id == row.id))
        enqueue_event(
            conn,
            AuditEvent(
                action="system.dead_letter.retried",
                outcome="success",
                actor=actor,
                target=Target("audit_event", row.event_id),
            ),
        )
    return len(rows)
