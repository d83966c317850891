"""Privileged access to the database server, from MariaDB's ``server_audit`` log.

The decision record asks that every admin access to the server be logged. Echo's own
commands record themselves; people who connect to MariaDB directly as ``root`` or as the
owner account do not, so the server's audit plugin logs them and
``echo-auth audit ingest-db-log FILE...`` turns those lines into ``system.db.admin_access``
events in the same tamper-evident log.

The plugin's file format (MariaDB 10.x/11.x; 12.0 writes ``host:port`` in the host field)::

    timestamp,serverhost,username,host,connectionid,queryid,operation,database,object,retcode
    20261127 18:38:20,db1,root,127.0.0.1,5,11,QUERY,mysql,'GRANT ALL ON x.* TO \\'a\\'',0

``timestamp`` is the server's local time, to the second; ``object`` is the statement in
single quotes (``\\'`` and ``\\n`` escaped) for QUERY lines, a table for table events and
empty for CONNECT, DISCONNECT and FAILED_CONNECT (whose ``retcode`` is the error, 1045).
Syslog output is not read.

Guarantees:

* **Idempotent.** A line's event id is a UUID (version 5) of the line itself, so the same
  line always gives the same event; ids already queued in the outbox or already in the
  audit log are skipped, and the relay's append is idempotent on ``event_id`` besides.
  Re-ingesting a file, or a rotated file and its successor, adds nothing twice. (An
  offset file was the alternative; it breaks on rotation and on a restored log.)
* **Not fatal.** A malformed line is counted and reported (its line number), never
  stops the import.
* **No secrets.** The plugin masks passwords only partly (``IDENTIFIED BY 'a''b'`` leaves
  ``b`` in the log), so statements are masked again here: everything after
  ``IDENTIFIED`` or ``PASSWORD``, and the arguments of encryption functions. This is best
  effort: statements are clipped to 1000 characters and belong to privileged accounts
  only, whose work should not carry data secrets.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError

from echo_auth.audit.events import Actor, AuditEvent, Outcome, Source, Target
from echo_auth.audit.outbox import enqueue_events
from echo_auth.db.audit_schema import audit_events
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import audit_outbox

ACTION = "system.db.admin_access"
# Fixed forever: changing it would re-import every line already imported.
NAMESPACE = uuid.UUID("5f0c3b1e-9d7a-5e42-8c61-3a2b4d5e6f70")
MAX_STATEMENT = 1000
BATCH = 500
_OPERATION = re.compile(r"^[A-Z_]{2,32}$")
_ESCAPE = re.compile(r"\\(.)", re.S)
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "0": "\0"}
_SET_PASSWORD = re.compile(r"(\bSET\s+PASSWORD\b[^=]*=).*", re.I | re.S)
_CREDENTIALS = re.compile(r"(\b(?:IDENTIFIED|\w*PASSWORD)\b).*", re.I | re.S)
_CIPHERS = re.compile(
    r"(\b(?:AES_ENCRYPT|AES_DECRYPT|DES_ENCRYPT|DES_DECRYPT|ENCODE|DECODE|ENCRYPT)\s*\().*",
    re.I | re.S,
)


class MalformedLine(ValueError):
    """A line that is not a server_audit file record."""


@dataclass(frozen=True)
class DbAccess:
    """One line of the server_audit log."""

    line: str
    occurred_at: datetime
    server: str
    username: str
    host: str
    connection_id: int
    query_id: int
    operation: str
    database: str
    object: str
    retcode: int

    @property
    def event_id(self) -> str:
        return str(uuid.uuid5(NAMESPACE, self.line))


def parse_line(line: str, tz: tzinfo | None = None) -> DbAccess:
    """Parse one record; ``tz`` is the server's time zone (None: this machine's)."""
    text = line.rstrip("\r\n")
    parts = text.split(",", 8)
    if len(parts) != 9:
        raise MalformedLine(f"{len(parts)} fields, not 10")
    stamp, server, username, host, conn_id, query_id, operation, database, rest = parts
    obj, comma, retcode = rest.rpartition(",")
    if not comma:
        raise MalformedLine("no retcode field")
    try:
        local = datetime.strptime(stamp, "%Y%m%d %H:%M:%S")
        occurred = local.replace(tzinfo=tz) if tz is not None else local.astimezone()
        numbers = int(conn_id), int(query_id), int(retcode)
    except ValueError as exc:
        raise MalformedLine(str(exc)) from None
    if not _OPERATION.match(operation) or not username or not server:
        raise MalformedLine(f"not a record: operation {operation[:40]!r}")
    return DbAccess(
        line=text,
        occurred_at=occurred.astimezone(UTC),
        server=server,
        username=username,
        host=host,
        connection_id=numbers[0],
        query_id=numbers[1],
        operation=operation,
        database=database,
        object=_unquote(obj),
        retcode=numbers[2],
    )


def _unquote(obj: str) -> str:
    if len(obj) >= 2 and obj[0] == obj[-1] == "'":
        return _ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(1)), obj[1:-1])
    return obj


def mask_secrets(statement: str) -> str:
    """Hide credentials in a SQL statement (best effort; see the module doc)."""
    masked, found = _SET_PASSWORD.subn(r"\1 ***", statement)
    if not found:
        masked = _CREDENTIALS.sub(r"\1 ***", masked)
    return _CIPHERS.sub(r"\1***)", masked)


def is_privileged(username: str, accounts: frozenset[str] | None) -> bool:
    """The given accounts; by default ``root`` and every account ending in ``_owner``."""
    if accounts is not None:
        return username in accounts
    return username == "root" or username.endswith("_owner")


def to_event(access: DbAccess) -> AuditEvent:
    outcome: Outcome
    if access.operation == "FAILED_CONNECT":
        outcome, reason = "denied", f"failed_connect_{access.retcode}"
    elif access.retcode != 0:
        outcome, reason = "failure", f"error_{access.retcode}"
    else:
        outcome, reason = "success", None
    try:
        ip: str | None = str(ipaddress.ip_address(access.host))
    except ValueError:
        ip = None
    metadata: dict[str, Any] = {
        "operation": access.operation,
        "server": access.server[:255],
        "db_user": access.username[:80],
        "client_host": access.host[:255],
        "database": access.database[:64],
        "connection_id": access.connection_id,
        "query_id": access.query_id,
        "retcode": access.retcode,
    }
    if access.object:
        key = "statement" if access.operation.startswith("QUERY") else "object"
        metadata[key] = mask_secrets(access.object)[:MAX_STATEMENT]
    return AuditEvent(
        action=ACTION,
        outcome=outcome,
        actor=Actor("admin", f"db:{access.username}@{access.host}", access.username),
        target=Target("database", access.database or access.server),
        reason=reason,
        source=Source(ip=ip, user_agent="mariadb server_audit"),
        metadata=metadata,
        event_id=access.event_id,
        occurred_at=access.occurred_at,
    )


@dataclass
class IngestReport:
    lines: int = 0
    queued: int = 0
    already_ingested: int = 0
    other_accounts: int = 0
    malformed: int = 0
    malformed_at: list[str] = field(default_factory=list)  # "file:line", the first few
    incomplete: int = 0  # a last line without its newline: the server is still writing it
    audit_checked: bool = True  # False: the audit DB was unreachable, only the outbox was

    def as_metadata(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "queued": self.queued,
            "already_ingested": self.already_ingested,
            "other_accounts": self.other_accounts,
            "malformed": self.malformed,
            "incomplete": self.incomplete,
        }

    def summary(self) -> str:
        unfinished = f", {self.incomplete} still being written" if self.incomplete else ""
        return (
            f"{self.lines} lines: {self.queued} new admin-access events queued, "
            f"{self.already_ingested} already ingested, {self.other_accounts} of other "
            f"accounts, {self.malformed} malformed{unfinished}"
        )


def ingest(
    sources: Iterable[tuple[str, Iterable[str]]],
    identity: Engine,
    audit_reader: Engine | None,
    *,
    accounts: frozenset[str] | None = None,
    tz: tzinfo | None = None,
) -> IngestReport:
    """Queue an event for each new line of privileged accounts in ``sources``.

    ``sources`` are (name, lines) pairs, e.g. files in the order they were written.
    """
    report = IngestReport()
    seen: set[str] = set()
    batch: list[AuditEvent] = []
    for access in _records(sources, tz, report):
        if not is_privileged(access.username, accounts):
            report.other_accounts += 1
            continue
        if access.event_id in seen:
            report.already_ingested += 1
            continue
        seen.add(access.event_id)
        batch.append(to_event(access))
        if len(batch) >= BATCH:
            _queue_new(batch, identity, audit_reader, report)
            batch = []
    if batch:
        _queue_new(batch, identity, audit_reader, report)
    return report


def _records(
    sources: Iterable[tuple[str, Iterable[str]]], tz: tzinfo | None, report: IngestReport
) -> Iterator[DbAccess]:
    for name, lines in sources:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if not line.endswith("\n"):
                # Only a file's last line can lack it: MariaDB is writing that line now.
                # The next run reads it whole (a cut line would get another event id).
                report.incomplete += 1
                continue
            report.lines += 1
            try:
                yield parse_line(line, tz)
            except MalformedLine:
                report.malformed += 1
                if len(report.malformed_at) < 5:
                    report.malformed_at.append(f"{name}:{number}")


def _queue_new(
    events: list[AuditEvent], identity: Engine, audit_reader: Engine | None, report: IngestReport
) -> None:
    ids = [e.event_id for e in events]
    delivered: set[str] = set()
    if audit_reader is not None and report.audit_checked:
        try:
            with transaction(audit_reader, write=False) as aconn:
                delivered = set(
                    aconn.execute(
                        select(audit_events.c.event_id).where(audit_events.c.event_id.in_(ids))
                    ).scalars()
                )
        except DBAPIError:
            # The outbox check below still prevents a second queueing, and the relay skips
            # ids the log already has: the counts are all that suffers.
            report.audit_checked = False
    with transaction(identity) as conn:
        queued = set(
            conn.execute(
                select(audit_outbox.c.event_id).where(audit_outbox.c.event_id.in_(ids))
            ).scalars()
        )
        new = [e for e in events if e.event_id not in delivered and e.event_id not in queued]
        enqueue_events(conn, new)
    report.queued += len(new)
    report.already_ingested += len(events) - len(new)
