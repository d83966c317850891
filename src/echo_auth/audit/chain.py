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
import re
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


def doc_columns(doc: Any, occurred: Any) -> tuple[Any, ...]:
    """The searchable column values of a parsed event document (PROJECTED_COLUMNS order),
    with ``occurred`` standing for its ``occurred_at`` in whatever form the caller needs."""
    actor = doc["actor"]
    target = doc.get("target") or {}
    source = doc.get("source") or {}
    return (
        doc["event_id"],
        occurred,
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


def project_values(event_json: str) -> tuple[Any, ...]:
    """The searchable column values a stored event's JSON implies (PROJECTED_COLUMNS order)."""
    return _project(event_json)[0]


def _project(event_json: str) -> tuple[tuple[Any, ...], str]:
    """project_values(), and the ``occurred_at`` text it parsed."""
    try:
        doc = json.loads(event_json)
        occurred_at = doc["occurred_at"]
        return doc_columns(doc, parse_timestamp(occurred_at)), occurred_at
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

# The order of the values in a row that append_to_chain writes.
_ROW_COLUMNS: tuple[str, ...] = (
    *("seq", "event_id", "occurred_at", "recorded_at"),
    *PROJECTED_COLUMNS[2:],
    *("event_json", "prev_hash", "hash"),
)
assert sorted(_ROW_COLUMNS) == sorted(c.name for c in audit_events.columns)
_INSERT_SQL: dict[tuple[str, str], str] = {}


def _insert_sql(conn: Connection) -> str | None:
    """One-row INSERT in the driver's own dialect, for ``executemany`` (None: use Core).

    The relay writes 500 rows per batch; going straight to the driver skips SQLAlchemy's
    per-row parameter dictionaries and type processing (the values are already in their
    stored form, see :func:`_db_time`). PyMySQL turns ``executemany`` of an INSERT into
    multi-row ``INSERT ... VALUES (...), (...)`` statements; sqlite3 loops in C.
    """
    dialect = conn.dialect
    key = (dialect.name, dialect.paramstyle)
    if key not in _INSERT_SQL:
        # PyMySQL's paramstyle is "pyformat", which also takes positional %s with a tuple.
        mark = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(dialect.paramstyle)
        if mark is None:
            return None
        quote = dialect.identifier_preparer.quote
        # Only the fixed table and column names go into the text; values are parameters.
        _INSERT_SQL[key] = (
            f"INSERT INTO {dialect.identifier_preparer.format_table(audit_events)} "  # noqa: S608
            f"({', '.join(quote(c) for c in _ROW_COLUMNS)}) "
            f"VALUES ({', '.join(mark for _ in _ROW_COLUMNS)})"
        )
    return _INSERT_SQL[key]


def _db_time(moment: datetime) -> str:
    """A UTC datetime as the text UTCDateTime stores (naive UTC, microseconds always).

    Byte for byte what SQLAlchemy's SQLite DATETIME writes; MySQL/MariaDB parse it into
    the same DATETIME(6) value as the datetime itself.
    """
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


_CANONICAL_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", re.ASCII)


def _stored_time(text: str, moment: datetime) -> str:
    """_db_time(moment) for the event time ``moment`` parsed from ``text``, cheaply.

    In the canonical form (which parse_timestamp accepted, so the fields are in range) the
    stored text is the canonical one with a space for the "T" and without the "Z".
    """
    if _CANONICAL_TIME.fullmatch(text):
        return text[:10] + " " + text[11:26]
    return _db_time(moment)


def read_head(conn: Connection) -> tuple[int, str]:
    row = conn.execute(
        select(chain_head.c.seq, chain_head.c.hash).where(chain_head.c.id == 1)
    ).one()
    return int(row.seq), str(row.hash)


def append_to_chain(
    conn: Connection, events: Sequence[QueuedEvent], *, check_present: bool = True
) -> list[str]:
    """Append events to the chain in the caller's audit transaction; returns new event ids.

    Idempotent on ``event_id``: an event already in the log (a relay that crashed after
    the audit commit but before deleting its outbox rows) is skipped, not appended twice.
    Raises :class:`MalformedPayload` before writing anything if a payload is not an event,
    and :class:`ChainMoved` if the log was moved to another server.

    ``check_present=False`` skips the query for events already in the log: an event that
    is there makes the INSERT fail on the unique ``event_id`` (an ``IntegrityError``), and
    the caller must then roll back and append again with the check (the relay does).
    Events repeated within ``events`` are appended once either way.
    """
    if not events:
        return []
    projected = []
    for event in events:
        values, occurred_text = _project(event.payload)
        if values[0] != event.event_id:
            raise MalformedPayload(f"payload of {event.event_id} names {values[0]}")
        projected.append((event, values, occurred_text))
    head_seq, head_hash, moved_to, moved_at = conn.execute(_LOCK_HEAD).one()
    if moved_to is not None:
        raise ChainMoved(moved_to, moved_at)
    present: set[str] = set()
    if check_present:
        ids = [e.event_id for e in events]
        present.update(
            conn.execute(select(audit_events.c.event_id).where(audit_events.c.event_id.in_(ids)))
            .scalars()
            .all()
        )
    now = datetime.now(UTC)
    # The driver gets times as the text UTCDateTime would store; Core gets datetimes.
    sql = _insert_sql(conn)
    recorded_at: Any = _db_time(now) if sql is not None else now
    rows: list[tuple[Any, ...]] = []
    appended: list[str] = []
    seq, prev = int(head_seq), str(head_hash)
    for event, values, occurred_text in projected:
        if event.event_id in present:
            continue
        present.add(event.event_id)
        seq += 1
        digest = link_hash(prev, event.payload)
        occurred = values[1] if sql is None else _stored_time(occurred_text, values[1])
        rows.append(
            (seq, values[0], occurred, recorded_at, *values[2:], event.payload, prev, digest)
        )
        appended.append(event.event_id)
        prev = digest
    if rows:
        if sql is not None:
            conn.exec_driver_sql(sql, rows)
        else:
            conn.execute(_INSERT, [dict(zip(_ROW_COLUMNS, row, strict=True)) for row in rows])
        conn.execute(
            update(chain_head)
            .where(chain_head.c.id == 1)
            .values(seq=seq, hash=prev, updated_at=now)
        )
    return appended
