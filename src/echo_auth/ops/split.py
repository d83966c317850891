"""Moving the audit database to its own server: ``echo-auth audit migrate --to URL``.

What it does, in order (the runbook is in docs/operations.md):

1. **Preflight**, changing nothing: the source is migrated to head; the target is another
   database, reachable and empty (no tables, or a freshly migrated audit schema without
   rows); a checkpoint public key is at hand if any checkpoint exists.
2. **Schema** on the target by the audit migrations (the append-only triggers included).
3. **Copy** while the source may still be live: events in ``seq`` order, a batch at a time,
   each batch committed together with the target's chain head, so the target always holds
   a consistent prefix of the chain.
4. **Seal** the source: under the chain-head lock (the lock every append takes),
   ``chain_head.moved_to`` is set. From that commit on no relay appends to the source
   (:class:`echo_auth.audit.chain.ChainMoved`); what the API keeps enqueueing waits in the
   outbox. This is what makes the command safe when relays were NOT stopped first: events
   they delivered before the seal are copied below, events after it are not delivered to
   the old server at all, and the relays that point at the new server deliver them later.
5. **Copy the rest** (the source is frozen now), then the checkpoints with their ids, then
   **verify** the target's chain against the checkpoint key and the external copies, and
   require that its head ``seq`` and hash equal the source's. Should the source still have
   moved on (a relay of an older Echo that ignores the seal), the delta is copied again,
   a few times at most, and then the command refuses.
6. Anything that fails after the seal **unseals** the source, so the old setup keeps
   serving exactly as before; nothing is switched by this module.

Reads of the source go through the reader engine (``ECHO_AUDIT_READ_DB_URL``, SELECT
only); only the seal needs the writer (``ECHO_AUDIT_DB_URL``, which may UPDATE the
one-row chain head and nothing else of the history).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, Engine, Table, func, insert, inspect, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.exc import ArgumentError

from echo_auth.audit.chain import read_head
from echo_auth.audit.checkpoints import CheckpointKeyError, CheckpointSink
from echo_auth.audit.verify import verify_audit_log
from echo_auth.audit.verify_report import VerifyReport
from echo_auth.db import audit_schema, migrate
from echo_auth.db.audit_schema import audit_events, chain_head, checkpoints
from echo_auth.db.engines import transaction

Advance = Callable[[int], None]
#: ``progress(label, total)`` opens a progress display and yields the function that
#: advances it (the CLI passes its terminal progress bar; tests pass nothing).
ProgressFactory = Callable[[str, int | None], AbstractContextManager[Advance]]

DEFAULT_BATCH = 500
MAX_CATCH_UP_ROUNDS = 5
READER_LAG_TIMEOUT_S = 30.0
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", ""}


class SplitRefused(Exception):
    """Refused before the source was changed (a usage or configuration problem)."""

    code = "refused"

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


class SplitFailed(Exception):
    """The copy was made but does not check out; the source was unsealed."""

    code = "copy_not_verified"

    def __init__(self, message: str, report: VerifyReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class SplitResult:
    source: str  # URLs with the password hidden
    target: str
    head_seq: int
    head_hash: str
    events_copied: int
    checkpoints_copied: int
    events_after_start: int  # appended to the source while the copy ran (copied too)
    report: VerifyReport

    def as_metadata(self) -> dict[str, Any]:
        """For the ``system.audit.migrated`` event (no secrets: passwords are hidden)."""
        return {
            "from": self.source[:255],
            "to": self.target[:255],
            "head_seq": self.head_seq,
            "head_sha256": self.head_hash,
            "events": self.events_copied,
            "checkpoints": self.checkpoints_copied,
            "appended_during_copy": self.events_after_start,
        }


def redact_url(raw: str) -> str:
    """A database URL fit to print or record: the password replaced by ``***``."""
    try:
        return make_url(raw).render_as_string(hide_password=True)
    except ArgumentError:
        return "<not a URL>"


@contextmanager
def _no_progress(_label: str, _total: int | None) -> Iterator[Advance]:
    yield lambda _n: None


def source_head(reader: Engine) -> tuple[int, str]:
    with transaction(reader, write=False) as conn:
        return read_head(conn)


# -- preflight ----------------------------------------------------------------------------


def _same_database(a: URL, b: URL) -> bool:
    if a.get_backend_name() != b.get_backend_name():
        return False
    if a.get_backend_name() == "sqlite":
        return Path(a.database or "").resolve() == Path(b.database or "").resolve()
    host_a = "127.0.0.1" if (a.host or "") in _LOCAL_HOSTS else a.host
    host_b = "127.0.0.1" if (b.host or "") in _LOCAL_HOSTS else b.host
    return (host_a, a.port or 3306, a.database) == (host_b, b.port or 3306, b.database)


def check_target_empty(target: Engine) -> None:
    """Refuse a target that holds anything but (at most) an empty, migrated audit schema."""
    names = set(inspect(target).get_table_names())
    if not names:
        return
    ours = set(audit_schema.metadata.tables) | {"alembic_version"}
    foreign = sorted(names - ours)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise SplitRefused(
            f"the target database is not empty (it has tables {shown}): "
            "give an empty database on the new server",
            "target_not_empty",
        )
    if "alembic_version" not in names or "audit_events" not in names:
        raise SplitRefused(
            "the target database is not empty (tables without Echo's migration history): "
            "give an empty database on the new server",
            "target_not_empty",
        )
    with transaction(target, write=False) as conn:
        for table in (audit_events, checkpoints):
            if table.name not in names:
                continue
            rows = int(conn.execute(select(func.count()).select_from(table)).scalar_one())
            if rows:
                raise SplitRefused(
                    f"the target database is not empty: {table.name} holds {rows} rows "
                    "(drop and re-create it to start over)",
                    "target_not_empty",
                )
        head = conn.execute(select(chain_head.c.seq)).scalars().all()
        if any(int(seq) != 0 for seq in head):
            raise SplitRefused(
                "the target database is not empty: its chain head is not at the start",
                "target_not_empty",
            )


def preflight(
    reader: Engine,
    writer: Engine,
    target: Engine,
    *,
    public_key: Ed25519PublicKey | None,
    sink: CheckpointSink,
) -> None:
    """Every check that can refuse before anything changes. Raises :class:`SplitRefused`."""
    if _same_database(writer.url, target.url) or _same_database(reader.url, target.url):
        raise SplitRefused(
            "the target is the audit database itself: give a database on the new server",
            "same_database",
        )
    if not migrate.is_at_head(writer, "audit"):
        raise SplitRefused(
            "the audit database is not at the latest schema: run 'echo-auth db upgrade' first",
            "not_migrated",
        )
    check_target_empty(target)
    if public_key is None:
        with transaction(reader, write=False) as conn:
            stored = int(conn.execute(select(func.count()).select_from(checkpoints)).scalar_one())
        external = sum(1 for _ in sink.read_all())
        if stored or external:
            raise CheckpointKeyError(
                f"{stored + external} checkpoints exist but no checkpoint public key was found "
                "to verify the copy: set ECHO_CHECKPOINT_PUBLIC_KEY_FILE"
            )


# -- copying --------------------------------------------------------------------------------


def _copy_events(
    reader: Engine,
    target: Engine,
    after_seq: int,
    upto_seq: int,
    batch_size: int,
    advance: Advance,
) -> tuple[int, int]:
    """Copy events ``after_seq < seq <= upto_seq``; returns (last seq copied, count).

    Each batch commits with the target's chain head set to its last row, so the target
    is a consistent prefix at every commit. A reader that lags (a replica) is waited for.
    """
    last, copied = after_seq, 0
    waited_since: float | None = None
    while last < upto_seq:
        with transaction(reader, write=False) as sconn:
            rows = [
                dict(r)
                for r in sconn.execute(
                    select(audit_events)
                    .where(audit_events.c.seq > last, audit_events.c.seq <= upto_seq)
                    .order_by(audit_events.c.seq)
                    .limit(batch_size)
                ).mappings()
            ]
        if not rows:
            # The head says there is more, the table has none yet: a lagging reader, or
            # a tail cut off by hand (verification of the copy will name it).
            waited_since = waited_since or time.monotonic()
            if time.monotonic() - waited_since > READER_LAG_TIMEOUT_S:
                break
            time.sleep(0.2)
            continue
        waited_since = None
        with transaction(target) as tconn:
            tconn.execute(insert(audit_events), rows)
            tconn.execute(
                update(chain_head)
                .where(chain_head.c.id == 1)
                .values(seq=rows[-1]["seq"], hash=rows[-1]["hash"], updated_at=datetime.now(UTC))
            )
        last = int(rows[-1]["seq"])
        copied += len(rows)
        advance(len(rows))
    return last, copied


def _copy_checkpoints(reader: Engine, target: Engine, after_id: int, upto_seq: int) -> int:
    """Copy checkpoint rows (ids kept) that sign no more than ``upto_seq``; returns last id."""
    with transaction(reader, write=False) as sconn:
        rows = [
            dict(r)
            for r in sconn.execute(
                select(checkpoints).where(checkpoints.c.id > after_id).order_by(checkpoints.c.id)
            ).mappings()
        ]
    ready: list[dict[str, Any]] = []
    for row in rows:
        if int(row["seq"]) > upto_seq:
            break  # signed after rows not copied yet: the next round takes it
        ready.append(row)
    for start in range(0, len(ready), DEFAULT_BATCH):
        with transaction(target) as tconn:
            tconn.execute(insert(checkpoints), ready[start : start + DEFAULT_BATCH])
    return int(ready[-1]["id"]) if ready else after_id


def _set_target_head(target: Engine, seq: int, head_hash: str, updated_at: datetime) -> None:
    with transaction(target) as conn:
        conn.execute(
            update(chain_head)
            .where(chain_head.c.id == 1)
            .values(seq=seq, hash=head_hash, updated_at=updated_at, moved_to=None, moved_at=None)
        )


def _read_full_head(conn: Connection) -> tuple[int, str, datetime]:
    row = conn.execute(
        select(chain_head.c.seq, chain_head.c.hash, chain_head.c.updated_at).where(
            chain_head.c.id == 1
        )
    ).one()
    return int(row.seq), str(row.hash), row.updated_at


# -- sealing --------------------------------------------------------------------------------


def seal(writer: Engine, moved_to: str) -> tuple[int, str, datetime]:
    """Mark the source as moved, under the chain-head lock; returns its final head."""
    with transaction(writer) as conn:
        row = conn.execute(
            select(chain_head.c.seq, chain_head.c.hash, chain_head.c.updated_at)
            .where(chain_head.c.id == 1)
            .with_for_update()
        ).one()
        conn.execute(
            update(chain_head)
            .where(chain_head.c.id == 1)
            .values(moved_to=moved_to[:255], moved_at=datetime.now(UTC))
        )
    return int(row.seq), str(row.hash), row.updated_at


def unseal(writer: Engine) -> None:
    """Put the source back in service (after a failed move, or to undo one)."""
    with transaction(writer) as conn:
        conn.execute(
            update(chain_head).where(chain_head.c.id == 1).values(moved_to=None, moved_at=None)
        )


def moved_to(engine: Engine) -> str | None:
    """Where this audit database was moved, or None while it is in service."""
    with transaction(engine, write=False) as conn:
        value = conn.execute(select(chain_head.c.moved_to).where(chain_head.c.id == 1)).scalar()
    return None if value is None else str(value)


# -- the move -------------------------------------------------------------------------------


def move_audit_log(
    reader: Engine,
    writer: Engine,
    target: Engine,
    *,
    public_key: Ed25519PublicKey | None,
    sink: CheckpointSink,
    batch_size: int = DEFAULT_BATCH,
    progress: ProgressFactory | None = None,
    source_label: str | None = None,
    target_label: str | None = None,
) -> SplitResult:
    """Copy the audit log to ``target``, seal the source, verify the copy (see module doc).

    ``reader`` and ``writer`` are the source's reading and writing engines (they may be
    the same); the labels are the URLs as the operator wrote them, password hidden (the
    target's is stored in the sealed source as ``moved_to``). Raises
    :class:`SplitRefused` (nothing changed), :class:`SplitFailed` (the copy does not
    check out; the source was unsealed) or a database error.
    """
    progress = progress or _no_progress
    source_label = source_label or writer.url.render_as_string(hide_password=True)
    target_label = target_label or target.url.render_as_string(hide_password=True)
    preflight(reader, writer, target, public_key=public_key, sink=sink)
    migrate.upgrade(target, "audit")

    start_seq, _ = source_head(reader)
    with progress("copying audit events", start_seq) as advance:
        last_seq, copied = _copy_events(reader, target, 0, start_seq, batch_size, advance)
        last_checkpoint = _copy_checkpoints(reader, target, 0, last_seq)

    sealed_seq, sealed_hash, sealed_at = seal(writer, target_label)
    try:
        # One progress display at a time (a terminal has one live display).
        with progress("copying the rest", None) as advance:
            for _round in range(MAX_CATCH_UP_ROUNDS):
                last_seq, more = _copy_events(
                    reader, target, last_seq, sealed_seq, batch_size, advance
                )
                copied += more
                last_checkpoint = _copy_checkpoints(reader, target, last_checkpoint, last_seq)
                _set_target_head(target, sealed_seq, sealed_hash, sealed_at)
                # The seal froze the source for every relay of this version; check anyway.
                with transaction(writer, write=False) as conn:
                    now_seq, now_hash, now_at = _read_full_head(conn)
                if (now_seq, now_hash) == (sealed_seq, sealed_hash):
                    break
                sealed_seq, sealed_hash, sealed_at = now_seq, now_hash, now_at
            else:
                raise SplitFailed(
                    f"the source audit log kept growing after it was sealed (now at seq "
                    f"{sealed_seq}): a relay of an older Echo still writes to it; stop every "
                    "relay, empty the target database and run again"
                )
        report = _verify_copy(target, public_key, sink, progress)
        _compare(reader, target, report, sealed_seq, sealed_hash)
    except BaseException:
        unseal(writer)
        raise
    return SplitResult(
        source=source_label,
        target=target_label,
        head_seq=sealed_seq,
        head_hash=sealed_hash,
        events_copied=copied,
        checkpoints_copied=_count(target, checkpoints),
        events_after_start=max(0, sealed_seq - start_seq),
        report=report,
    )


def _verify_copy(
    target: Engine,
    public_key: Ed25519PublicKey | None,
    sink: CheckpointSink,
    progress: ProgressFactory,
) -> VerifyReport:
    with transaction(target, write=False) as conn:
        total = int(conn.execute(select(func.count()).select_from(audit_events)).scalar_one())
        with progress("verifying the copy", total) as advance:
            return verify_audit_log(conn, public_key=public_key, sink=sink, progress=advance)


def _count(engine: Engine, table: Table) -> int:
    with transaction(engine, write=False) as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _compare(
    reader: Engine, target: Engine, report: VerifyReport, head_seq: int, head_hash: str
) -> None:
    if not report.intact:
        raise SplitFailed(f"the copy does not verify: {report.summary()}", report)
    with transaction(target, write=False) as conn:
        target_seq, target_hash = read_head(conn)
    if (target_seq, target_hash) != (head_seq, head_hash) or report.head_hash != head_hash:
        raise SplitFailed(
            f"the copy's head (seq {target_seq}, hash {target_hash[:16]}...) differs from the "
            f"source's (seq {head_seq}, hash {head_hash[:16]}...)",
            report,
        )
    in_source, in_target = _count(reader, checkpoints), _count(target, checkpoints)
    if in_source != in_target:
        raise SplitFailed(
            f"the source has {in_source} checkpoints, the copy {in_target}",
            report,
        )
