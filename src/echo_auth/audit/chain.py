"""The hash chain in the audit database.

Format (documented in docs/architecture.md so anyone can re-check it without Echo)::

    hash(seq) = SHA-256( prev_hash_hex || event_json )     both as UTF-8 bytes
    prev_hash(1) = "0" * 64

``seq`` starts at 1 and has no gaps. ``event_json`` is the canonical JSON made at enqueue.
Appends lock the single ``chain_head`` row for the whole batch, so concurrent relays
serialise per batch, never per event.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from echo_auth.audit.events import parse_timestamp
from echo_auth.db.audit_schema import audit_events, chain_head


class MalformedPayload(ValueError):
    """An outbox payload that is not an event document."""


class ChainMoved(Exception):
    """This audit log was copied to another server (``echo-auth audit migrate``).

    Nothing may be appended here any more: the events stay queued in the outbox until a
    relay that points at the new server delivers them.
    """

    def __init__(self, moved_to: str, moved_at: datetime | None) -> None:
        when = f" at {moved_at:%Y-%m-%dT%H:%M:%SZ}" if moved_at is not None else ""
        super().__init__(
            f"this audit database was moved to {moved_to}{when}; "
            "set ECHO_AUDIT_DB_URL to the new server and restart the relays"
        )
        self.moved_to = moved_to


@dataclass(frozen=True, slots=True)
class QueuedEvent:
    event_id: str
    payload: str


def link_hash(prev_hash: str, event_json: str) -> str:
    return hashlib.sha256((prev_hash + event_json).encode("utf-8")).hexdigest()


# The searchable columns of audit_events, in the order project_values() returns them.
PROJECTED_COLUMNS = (
    "event_id",
    "occurred_at",
    "actor_type",
    "actor_id",
    "actor_label",
    "action",
    "target_type",
    "target_id",
    "outcome",
    "reason",
    "ip",
    "user_agent",
    "request_id",
)


def project_values(event_json: str) -> tuple[Any, ...]:
    """The searchable column values a stored event's JSON implies (PROJECTED_COLUMNS order)."""
    try:
        doc = json.loads(event_json)
        actor = doc["actor"]
        target = doc.get("target") or {}
        source = doc.get("source") or {}
        return (
            doc["event_id"],
            parse_timestamp(doc["occurred_at"]),
            actor["type"],
            actor.get("id"),
            actor.get("label"),
            doc["action"],
            target.get("type"),
            target.get("id"),
            doc["outcome"],
            doc.get("reason"),
            source.get("ip"),
            source.get("user_agent"),
            doc.get("request_id"),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MalformedPayload(f"not an event document: {exc!r}") from None


def project(event_json: str) -> dict[str, Any]:
    """The searchable columns that a stored event's JSON implies, by name."""
    return dict(zip(PROJECTED_COLUMNS, project_values(event_json), strict=True))


_LOCK_HEAD = (
    select(chain_head.c.seq, chain_head.c.hash, chain_head.c.moved_to, chain_head.c.moved_at)
    .where(chain_head.c.id == 1)
    .with_for_update()
)
_INSERT = insert(audit_events)


def read_head(conn: Connection) -> tuple[int, str]:
    row = conn.execute(
        select(chain_head.c.seq, chain_head.c.hash).where(chain_head.c.id == 1)
    ).one()
    return int(row.seq), str(row.hash)


def append_to_chain(conn: Connection, events: Sequence[QueuedEvent]) -> list[str]:
    """Append events to the chain in the caller's audit transaction; returns new event ids.

    Idempotent on ``event_id``: an event already in the log (a relay that crashed after
    the audit commit but before deleting its outbox rows) is skipped, not appended twice.
    Raises :class:`MalformedPayload` before writing anything if a payload is not an event,
    and :class:`ChainMoved` if the log was moved to another server.
    """
    if not events:
        return []
    projected = [(e, project(e.payload)) for e in events]
    for event, columns in projected:
        if columns["event_id"] != event.event_id:
            raise MalformedPayload(f"payload of {event.event_id} names {columns['event_id']}")
    head_seq, head_hash, moved_to, moved_at = conn.execute(_LOCK_HEAD).one()
    if moved_to is not None:
        raise ChainMoved(moved_to, moved_at)
    ids = [e.event_id for e in events]
    present = set(
        conn.execute(select(audit_events.c.event_id).where(audit_events.c.event_id.in_(ids)))
        .scalars()
        .all()
    )
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    seq, prev = int(head_seq), str(head_hash)
    for event, columns in projected:
        if event.event_id in present:
            continue
        present.add(event.event_id)
        seq += 1
        digest = link_hash(prev, event.payload)
        columns.update(
            seq=seq, recorded_at=now, event_json=event.payload, prev_hash=prev, hash=digest
        )
        rows.append(columns)
        prev = digest
    if rows:
        conn.execute(_INSERT, rows)
        conn.execute(
            update(chain_head)
            .where(chain_head.c.id == 1)
            .values(seq=seq, hash=prev, updated_at=now)
        )
    return [r["event_id"] for r in rows]
