"""Searching the audit log: filters, newest first, cursor pagination."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Select, func, or_, select

from echo_auth.audit.events import OUTCOMES
from echo_auth.db.audit_schema import audit_events

MAX_LIMIT = 500
MAX_SEQ = 2**63 - 1  # BIGINT
DEFAULT_LIMIT = 50


class InvalidQuery(ValueError):
    """A search filter or cursor that cannot be used; the message says which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class EventFilter:
    actor: str | None = None
    action: str | None = None
    target: str | None = None
    outcome: str | None = None
    ip: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    q: str | None = None

    def __post_init__(self) -> None:
        if self.outcome is not None and self.outcome not in OUTCOMES:
            raise InvalidQuery("outcome", f"must be one of {', '.join(OUTCOMES)}")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise InvalidQuery(name, "needs a timezone (use Z for UTC)")
        for name in ("actor", "action", "target", "ip", "q"):
            value = getattr(self, name)
            if value is not None and (len(value) > 320 or "\x00" in value):
                raise InvalidQuery(name, "too long or contains a NUL character")

    def describe(self) -> dict[str, str]:
        """The filters in use, for the ``audit.searched`` event's metadata."""
        out: dict[str, str] = {}
        for name in ("actor", "action", "target", "outcome", "ip", "q"):
            value = getattr(self, name)
            if value:
                out[name] = value[:100]
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.astimezone(UTC).isoformat()
        return out


def filter_from_text(
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    outcome: str | None = None,
    ip: str | None = None,
    since: str | None = None,
    until: str | None = None,
    q: str | None = None,
) -> EventFilter:
    """A filter from what a person typed (query string, form or command line).

    Empty fields mean "any"; times are ISO 8601 (see :func:`parse_time`).
    """
    return EventFilter(
        actor=actor or None,
        action=action or None,
        target=target or None,
        outcome=outcome or None,
        ip=ip or None,
        since=parse_time("since", since),
        until=parse_time("until", until),
        q=q or None,
    )


def parse_time(field: str, text: str | None) -> datetime | None:
    if text is None or text == "":
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise InvalidQuery(field, "not an ISO 8601 time such as 2026-11-27T17:30:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    if cursor is None or cursor == "":
        return None
    try:
        if len(cursor) > 32:
            raise ValueError
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        if not raw.startswith("s") or not raw[1:].isdigit():
            raise ValueError
        if len(raw) > 20:
            raise ValueError
        seq = int(raw[1:])
        if not 1 <= seq <= MAX_SEQ:
            raise ValueError
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidQuery("cursor", "not a cursor this service gave out") from None
    return seq


def check_limit(limit: int | None) -> int:
    if limit is None:
        return DEFAULT_LIMIT
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidQuery("limit", f"must be between 1 and {MAX_LIMIT}")
    return limit


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _apply(stmt: Select[Any], f: EventFilter) -> Select[Any]:
    c = audit_events.c
    if f.actor:
        stmt = stmt.where(or_(c.actor_id == f.actor, c.actor_label == f.actor))
    if f.action:
        if f.action.endswith("*"):
            stmt = stmt.where(c.action.like(_escape_like(f.action[:-1]) + "%", escape="\\"))
        else:
            stmt = stmt.where(c.action == f.action)
    if f.target:
        stmt = stmt.where(c.target_id == f.target)
    if f.outcome:
        stmt = stmt.where(c.outcome == f.outcome)
    if f.ip:
        stmt = stmt.where(c.ip == f.ip)
    if f.since:
        stmt = stmt.where(c.occurred_at >= f.since)
    if f.until:
        stmt = stmt.where(c.occurred_at < f.until)
    if f.q:
        stmt = stmt.where(c.event_json.like("%" + _escape_like(f.q) + "%", escape="\\"))
    return stmt


_COLUMNS = (
    audit_events.c.seq,
    audit_events.c.event_json,
    audit_events.c.hash,
    audit_events.c.prev_hash,
    audit_events.c.recorded_at,
)


def stored_event(row: Any) -> dict[str, Any]:
    """An event as stored: its document plus ``seq``, ``hash``, ``prev_hash``, ``recorded_at``."""
    doc: dict[str, Any] = json.loads(row.event_json)
    doc["seq"] = int(row.seq)
    doc["hash"] = row.hash
    doc["prev_hash"] = row.prev_hash
    doc["recorded_at"] = row.recorded_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return doc


@dataclass
class Page:
    events: list[dict[str, Any]]
    next_cursor: str | None


def search_events(
    conn: Connection, f: EventFilter, *, cursor: str | None = None, limit: int | None = None
) -> Page:
    """Events matching ``f``, newest first; ``next_cursor`` is None on the last page."""
    size = check_limit(limit)
    before = decode_cursor(cursor)
    stmt = _apply(select(*_COLUMNS), f)
    if before is not None:
        stmt = stmt.where(audit_events.c.seq < before)
    rows = conn.execute(stmt.order_by(audit_events.c.seq.desc()).limit(size + 1)).all()
    events = [stored_event(r) for r in rows[:size]]
    next_cursor = encode_cursor(events[-1]["seq"]) if len(rows) > size else None
    return Page(events, next_cursor)


def get_event(conn: Connection, event_id: str) -> dict[str, Any] | None:
    row = conn.execute(select(*_COLUMNS).where(audit_events.c.event_id == event_id[:36])).first()
    return None if row is None else stored_event(row)


def get_event_at(conn: Connection, seq: int) -> dict[str, Any] | None:
    """The event at ``seq`` (its neighbours in the chain are ``seq - 1`` and ``seq + 1``)."""
    if not 1 <= seq <= MAX_SEQ:
        return None
    row = conn.execute(select(*_COLUMNS).where(audit_events.c.seq == seq)).first()
    return None if row is None else stored_event(row)


def iter_events(conn: Connection, f: EventFilter, batch: int = 1000) -> Iterator[dict[str, Any]]:
    """Every matching event, oldest first, in constant memory (for export)."""
    after = 0
    while True:
        stmt = _apply(select(*_COLUMNS), f).where(audit_events.c.seq > after)
        rows = conn.execute(stmt.order_by(audit_events.c.seq).limit(batch)).all()
        for row in rows:
            yield stored_event(row)
        if len(rows) < batch:
            return
        after = int(rows[-1].seq)


def count_matching(conn: Connection, f: EventFilter, *, through_seq: int | None = None) -> int:
    """How many events match ``f`` (up to ``through_seq``): for export's count and progress."""
    stmt = _apply(select(func.count()).select_from(audit_events), f)
    if through_seq is not None:
        stmt = stmt.where(audit_events.c.seq <= through_seq)
    return int(conn.execute(stmt).scalar_one())


def head_seq(conn: Connection) -> int:
    """The highest ``seq`` in the log (0 when empty): an export's fixed upper bound."""
    return int(conn.execute(select(func.coalesce(func.max(audit_events.c.seq), 0))).scalar_one())
