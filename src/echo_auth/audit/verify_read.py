"""Reading the audit table fast, for :func:`echo_auth.audit.verify.verify_chain`.

Rows come through the driver's own cursor, a batch at a time in ``seq`` order, with only
what judging needs; see the comment below for the two fast paths and why neither can
change a verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from json import JSONDecoder
from typing import Any

from sqlalchemy import Connection, bindparam, select

from echo_auth.audit.chain import (
    PROJECTED_COLUMNS,
    MalformedPayload,
    doc_columns,
    project_values,
)
from echo_auth.db.audit_schema import audit_events

_PROJECTED = PROJECTED_COLUMNS

# -- reading the table fast ----------------------------------------------------------------
#
# verify_chain reads the rows through the driver's own cursor (no SQLAlchemy Row objects),
# a batch at a time in seq order, and keeps, per row, only what judging needs. Two fast
# paths keep the per-row work small without changing a single verdict:
#
# * The searchable columns are first compared by a fast test that can only say "they
#   agree" when the exact test (``exact_columns_agree``: SQLAlchemy's values against
#   ``project_values``) would say so too. A row the fast test does not clear is read again
#   through SQLAlchemy and judged by the exact test, so only tampered rows pay for it.
#   On MySQL/MariaDB the thirteen columns come back as one string, each value as
#   ``<CHAR_LENGTH>:<value>`` or ``-`` for NULL (pymysql decodes every column in Python,
#   so fewer columns is most of the speed); on SQLite they come back as they are.
# * ``_judge`` runs only for rows that are "dirty": a wrong hash, disagreeing columns, or a
#   broken link to the previous or the next row. For any other row ``_judge`` provably
#   reports nothing and marks nothing (its predecessor links to it and its successor
#   links to it), so skipping it changes nothing. A dirty row is judged once the WINDOW
#   rows after it have been read, with exactly the window ``_judge`` always saw: the rows
#   from WINDOW + 1 before it to WINDOW after it.

_fromisoformat = datetime.fromisoformat
# json.loads(s) is JSONDecoder().decode(s): this default decoder's scanner, at 0, to the end.
_scan_json: Callable[[str, int], tuple[Any, int]]
_scan_json = JSONDecoder().scan_once  # type: ignore[attr-defined]
# Built from the schema's own names only (S608): no value is ever formatted into them.
_SQLITE_SELECT = (
    f"SELECT seq, prev_hash, hash, event_json, {', '.join(_PROJECTED)} "  # noqa: S608
    f"FROM {audit_events.name} WHERE seq > ? ORDER BY seq LIMIT ?"
)


def _mysql_packed_column() -> str:
    parts = []
    for name in _PROJECTED:
        value = name
        if name == "occurred_at":
            # The canonical event form, ``%%`` because pymysql formats the query with ``%``.
            value = "DATE_FORMAT(occurred_at, '%%Y-%%m-%%dT%%H:%%i:%%s.%%fZ')"
        parts.append(f"IFNULL(CONCAT(CHAR_LENGTH({value}), ':', {value}), '-')")
    return f"CONCAT({', '.join(parts)})"


_MYSQL_SELECT = (
    f"SELECT seq, prev_hash, hash, event_json, {_mysql_packed_column()} "  # noqa: S608
    f"FROM {audit_events.name} WHERE seq > %s ORDER BY seq LIMIT %s"
)
_EXACT_COLUMNS = select(*[audit_events.c[name] for name in _PROJECTED]).where(
    audit_events.c.seq == bindparam("seq")
)

# One batch: (seq, prev_hash, hash, event_json, columns as the fast test reads them).
Batch = list[tuple[int, str, str, str, Any]]


def _parse_whole(text: str) -> Any:
    """What json.loads(text) returns, for a text with no whitespace around the document
    (raises otherwise): json.loads less its two Python-level calls and whitespace scans."""
    doc, end = _scan_json(text, 0)
    if end != len(text):
        raise ValueError("not one JSON document")
    return doc


def _check_timestamp(text: str) -> None:
    """Raise unless parse_timestamp(text) succeeds (the same tests, minus its result)."""
    if len(text) != 27 or text[26] != "Z" or text[10] != "T" or text[19] != ".":
        raise ValueError("not a canonical timestamp")
    _fromisoformat(text[:26])


def _sqlite_implied(event_json: str) -> tuple[Any, ...]:
    """The columns as SQLite stores them, if they agree with the JSON (raises if unsure)."""
    doc = _parse_whole(event_json)
    ts = doc["occurred_at"]
    _check_timestamp(ts)
    # SQLAlchemy's SQLite storage form of the same instant: "YYYY-MM-DD HH:MM:SS.ffffff".
    return doc_columns(doc, ts[:10] + " " + ts[11:26])


def _pack(value: Any) -> str:
    if value is None:
        return "-"
    if type(value) is not str:
        raise TypeError("not a string")  # a column never equals it: let the exact test say
    return f"{len(value)}:{value}"


def _mysql_implied(event_json: str) -> str:
    """The packed column string (see _MYSQL_SELECT) the JSON implies (raises if unsure)."""
    doc = _parse_whole(event_json)
    ts = doc["occurred_at"]
    _check_timestamp(ts)
    return "".join(map(_pack, doc_columns(doc, ts)))


def exact_columns_agree(conn: Connection, seq: int, event_json: str) -> bool:
    """The searchable columns, read through SQLAlchemy, equal what the JSON says."""
    row = conn.execute(_EXACT_COLUMNS, {"seq": seq}).first()
    if row is None:
        return False
    try:
        implied = project_values(event_json)
    except MalformedPayload:
        return False
    return tuple(row) == implied


_CHUNK = 500  # rows taken from the cursor at a time while the server keeps sending


def batch_reader(
    conn: Connection, batch: int
) -> tuple[Callable[[int], Iterator[Batch]], Callable[[str], Any]]:
    """``fetch(after)``: the next batch after ``seq`` ``after``, in chunks; and the fast
    test's ``implied(event_json)``, to compare with each row's last field.

    On MySQL/MariaDB the cursor is unbuffered (pymysql's SSCursor): the server goes on
    sending while the rows already here are hashed and parsed. The connection is busy
    until the batch is read to its end, which is why the exact tests wait for settle().
    """
    dialect = conn.dialect
    raw = conn.connection.dbapi_connection
    if raw is not None and dialect.name == "sqlite" and dialect.driver == "pysqlite":

        def fetch_sqlite(after: int) -> Iterator[Batch]:
            assert raw is not None
            cursor = raw.cursor()
            try:
                cursor.execute(_SQLITE_SELECT, (after, batch))
                while chunk := cursor.fetchmany(_CHUNK):
                    yield [(r[0], r[1], r[2], r[3], r[4:]) for r in chunk]
            finally:
                cursor.close()

        return fetch_sqlite, _sqlite_implied
    if raw is not None and dialect.name in ("mysql", "mariadb") and dialect.driver == "pymysql":
        from pymysql.cursors import SSCursor

        def fetch_mysql(after: int) -> Iterator[Batch]:
            assert raw is not None
            cursor = raw.cursor(SSCursor)
            try:
                cursor.execute(_MYSQL_SELECT, (after, batch))
                while chunk := cursor.fetchmany(_CHUNK):
                    yield list(chunk)
            finally:
                cursor.close()  # reads what is left of the result, if anything

        return fetch_mysql, _mysql_implied
    return generic_reader(conn, batch), project_values


def generic_reader(conn: Connection, batch: int) -> Callable[[int], Iterator[Batch]]:
    stmt = select(
        audit_events.c.seq,
        audit_events.c.prev_hash,
        audit_events.c.hash,
        audit_events.c.event_json,
        *[audit_events.c[name] for name in _PROJECTED],
    ).order_by(audit_events.c.seq)

    def fetch(after: int) -> Iterator[Batch]:
        rows = conn.execute(stmt.where(audit_events.c.seq > after).limit(batch)).all()
        if rows:
            yield [(int(r[0]), r[1], r[2], r[3], tuple(r[4:])) for r in rows]

    return fetch
