"""Exporting the audit log: JSON Lines, CSV and OCSF, streamed in constant memory.

:func:`export_events` turns the matching events (oldest first, read in batches by
:func:`echo_auth.audit.search.iter_events`) into lines of text, each with its line ending,
so a caller writes them as they come: a file, a terminal or an HTTP response. An export is
bounded by the chain head when it starts (:func:`plan_export`): events appended while it
runs are not part of it, so its count is known up front and the ``audit.exported`` event
can record it before the first byte goes out.

Formats (as ``events.md`` in the design notes names them):

``jsonl``
    One JSON object a line: the stored event (the event document plus ``seq``, ``hash``,
    ``prev_hash`` and ``recorded_at``), as ``GET /v1/audit/events/{id}`` returns it. With
    ``prev_hash`` a reader can recompute each ``hash`` from the canonical JSON of the rest.
``csv``
    RFC 4180 (``csv`` module, CRLF line endings, quoting where needed) with the header
    :data:`CSV_COLUMNS`. A text cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a
    carriage return gets a leading single quote, so a spreadsheet shows it as text instead
    of running it as a formula (OWASP "CSV injection").
``ocsf``
    One OCSF 1.5.0 event a line; see :func:`to_ocsf` for the mapping and its reasons.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import Connection

from echo_auth.audit.chain import PROJECTED_COLUMNS

# Re-exported: callers of the export ask it for the OCSF mapping too.
from echo_auth.audit.ocsf import OCSF_MAPPING as OCSF_MAPPING
from echo_auth.audit.ocsf import OCSF_VERSION as OCSF_VERSION
from echo_auth.audit.ocsf import to_ocsf
from echo_auth.audit.search import (
    EventFilter,
    InvalidQuery,
    count_matching,
    head_seq,
    iter_events,
)

FORMATS: Final = ("jsonl", "csv", "ocsf")
MEDIA_TYPES: Final[dict[str, str]] = {
    "jsonl": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8; header=present",
    "ocsf": "application/x-ndjson",
}
FILE_EXTENSIONS: Final[dict[str, str]] = {"jsonl": "jsonl", "csv": "csv", "ocsf": "ocsf.jsonl"}

CSV_COLUMNS: Final = ("seq", *PROJECTED_COLUMNS)
# Characters that make a spreadsheet treat a cell as a formula (or hide that it is one).
_FORMULA_STARTS: Final = ("=", "+", "-", "@", "\t", "\r")


def check_format(fmt: str | None) -> str:
    """The export format, or :class:`InvalidQuery` naming the ones there are."""
    if fmt not in FORMATS:
        raise InvalidQuery("format", f"must be one of {', '.join(FORMATS)}")
    return fmt


@dataclass(frozen=True)
class ExportPlan:
    """What an export will contain: the events matching ``filter`` up to ``through_seq``."""

    fmt: str
    filter: EventFilter
    through_seq: int
    count: int

    def describe(self) -> dict[str, Any]:
        """Metadata for the ``audit.exported`` event."""
        return {
            "format": self.fmt,
            "filters": self.filter.describe(),
            "events": self.count,
            "through_seq": self.through_seq,
        }

    def filename(self, now: datetime | None = None) -> str:
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        return f"echo-audit-{stamp}.{FILE_EXTENSIONS[self.fmt]}"


def plan_export(conn: Connection, f: EventFilter, fmt: str) -> ExportPlan:
    """Fix the export's upper bound (the chain head now) and count what it will contain."""
    check_format(fmt)
    through = head_seq(conn)
    return ExportPlan(fmt, f, through, count_matching(conn, f, through_seq=through))


def export_events(
    conn: Connection,
    f: EventFilter,
    fmt: str,
    *,
    through_seq: int | None = None,
    batch: int = 1000,
) -> Iterator[str]:
    """The matching events in ``fmt``, oldest first, one line (with its ending) at a time.

    The format is checked now, not at the first line. Memory stays constant: events are
    read ``batch`` at a time and each is turned into text on its own. ``through_seq``
    stops the export at that ``seq`` (see :func:`plan_export`).
    """
    render = _RENDERERS[check_format(fmt)]
    return _lines(conn, f, render, fmt == "csv", through_seq, batch)


def _lines(
    conn: Connection,
    f: EventFilter,
    render: Callable[[dict[str, Any]], str],
    header: bool,
    through_seq: int | None,
    batch: int,
) -> Iterator[str]:
    if header:
        yield _csv_line(CSV_COLUMNS)
    for event in iter_events(conn, f, batch=batch):
        if through_seq is not None and event["seq"] > through_seq:
            return
        yield render(event)


def chunked(lines: Iterator[str], size: int = 500) -> Iterator[str]:
    """Join lines into chunks of ``size``: fewer, larger writes (and thread hops in HTTP)."""
    buffer: list[str] = []
    for line in lines:
        buffer.append(line)
        if len(buffer) >= size:
            yield "".join(buffer)
            buffer.clear()
    if buffer:
        yield "".join(buffer)


# -- JSON Lines ---------------------------------------------------------------------------


def _jsonl(event: dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n"


# -- CSV ----------------------------------------------------------------------------------


def neutralize_cell(value: object) -> str:
    """A cell's text, with a leading ``'`` when a spreadsheet would run it as a formula."""
    if value is None:
        return ""
    text = str(value)
    if text.startswith(_FORMULA_STARTS):
        return "'" + text
    return text


def _csv_line(cells: tuple[object, ...] | list[object]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(cells)
    return buffer.getvalue()


def csv_row(event: dict[str, Any]) -> list[object]:
    actor = event.get("actor") or {}
    target = event.get("target") or {}
    source = event.get("source") or {}
    values: dict[str, object] = {
        "seq": event["seq"],
        "event_id": event.get("event_id"),
        "occurred_at": event.get("occurred_at"),
        "actor_type": actor.get("type"),
        "actor_id": actor.get("id"),
        "actor_label": actor.get("label"),
        "action": event.get("action"),
        "target_type": target.get("type"),
        "target_id": target.get("id"),
        "outcome": event.get("outcome"),
        "reason": event.get("reason"),
        "ip": source.get("ip"),
        "user_agent": source.get("user_agent"),
        "request_id": event.get("request_id"),
    }
    return [v if isinstance(v, int) else neutralize_cell(v) for v in values.values()]


def _csv(event: dict[str, Any]) -> str:
    return _csv_line(csv_row(event))


def _ocsf(event: dict[str, Any]) -> str:
    return json.dumps(to_ocsf(event), ensure_ascii=False, separators=(",", ":")) + "\n"


_RENDERERS: Final[dict[str, Callable[[dict[str, Any]], str]]] = {
    "jsonl": _jsonl,
    "csv": _csv,
    "ocsf": _ocsf,
}
