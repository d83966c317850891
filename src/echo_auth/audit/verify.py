"""Verify the audit log: recompute the chain, name every anomaly, check the checkpoints.

The report uses the vocabulary of ``aws cloudtrail validate-logs``: rows are *modified*,
*deleted*, *inserted* or *reordered*; checkpoints are *invalid* (bad signature or
statement), *missing* (present in one copy, absent from the other) or *mismatched* (their
signed hash is not the chain's hash at that ``seq``).

How rows are classified (``prev_hash`` links each row to its true predecessor):

* modified: the row's hash is not SHA-256(prev_hash || event_json), or its searchable
  columns disagree with its ``event_json``, or it lies in a range that a signed checkpoint
  contradicts (the chain was rewritten and re-hashed from there on);
* deleted: a gap in ``seq``, a row whose predecessor is nowhere to be found, or rows that a
  checkpoint signed but the table no longer has (a cut-off tail);
* inserted: a row that no other row names as predecessor while its neighbours link
  around it;
* reordered: a row whose predecessor comes after it, or whose successor comes before it.

The table is streamed in ``seq`` order a batch at a time with a bounded window of rows
around the one being judged, so memory does not grow with the log (only with the number
of checkpoints, which is small).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, func, select

from echo_auth.audit.chain import (
    PROJECTED_COLUMNS,
    MalformedPayload,
    link_hash,
    project_values,
    read_head,
)
from echo_auth.audit.checkpoints import (
    BadCheckpoint,
    Checkpoint,
    CheckpointKeyError,
    CheckpointSink,
    open_checkpoint,
    stored_checkpoints,
)
from echo_auth.audit.events import GENESIS_HASH
from echo_auth.db.audit_schema import audit_events, checkpoints

RowKind = Literal["modified", "deleted", "inserted", "reordered"]
CheckpointKind = Literal["invalid", "missing", "mismatch"]
Location = Literal["database", "external"]
MAX_REPORTED = 1000
WINDOW = 64


@dataclass(frozen=True)
class Problem:
    kind: RowKind
    seq: int
    detail: str
    seq_end: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seq": self.seq, "seq_end": self.seq_end, "detail": self.detail}

    def describe(self) -> str:
        where = (
            f"seq {self.seq}"
            if self.seq_end in (None, self.seq)
            else (f"seq {self.seq}..{self.seq_end}")
        )
        return f"{where}: {self.kind.upper()}: {self.detail}"


@dataclass(frozen=True)
class CheckpointIssue:
    kind: CheckpointKind
    location: Location
    name: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "location": self.location,
            "name": self.name,
            "detail": self.detail,
        }

    def describe(self) -> str:
        return f"checkpoint {self.name} ({self.location}): {self.kind.upper()}: {self.detail}"


@dataclass
class VerifyReport:
    events_checked: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS_HASH
    problems: list[Problem] = field(default_factory=list)
    problems_total: int = 0
    checkpoint_issues: list[CheckpointIssue] = field(default_factory=list)
    checkpoints_valid: int = 0
    checkpoints_checked_externally: bool = False

    @property
    def intact(self) -> bool:
        return self.problems_total == 0 and not self.checkpoint_issues

    @property
    def first_bad_seq(self) -> int | None:
        return min((p.seq for p in self.problems), default=None)

    def add(self, kind: RowKind, seq: int, detail: str, seq_end: int | None = None) -> None:
        self.problems_total += 1
        if len(self.problems) < MAX_REPORTED:
            self.problems.append(Problem(kind, seq, detail, seq_end))

    def counts(self) -> dict[str, int]:
        out = {"modified": 0, "deleted": 0, "inserted": 0, "reordered": 0}
        for p in self.problems:
            out[p.kind] += 1
        return out

    def summary(self) -> str:
        c = self.counts()
        cp_bad = len(self.checkpoint_issues)
        external = "" if self.checkpoints_checked_externally else " (no external checkpoints read)"
        verdict = "INTACT" if self.intact else "TAMPERED"
        return (
            f"{verdict}: {self.events_checked} events checked up to seq {self.head_seq}; "
            f"{c['modified']} modified, {c['deleted']} deleted, {c['inserted']} inserted, "
            f"{c['reordered']} reordered; checkpoints: {self.checkpoints_valid} valid, "
            f"{cp_bad} invalid or missing{external}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "intact": self.intact,
            "events_checked": self.events_checked,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "first_bad_seq": self.first_bad_seq,
            "counts": self.counts(),
            "problems_total": self.problems_total,
            "problems": [p.as_dict() for p in self.problems],
            "checkpoints_valid": self.checkpoints_valid,
            "checkpoint_issues": [i.as_dict() for i in self.checkpoint_issues],
            "summary": self.summary(),
        }


_PROJECTED = PROJECTED_COLUMNS


def count_events(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(audit_events)).scalar_one())


@dataclass
class _Row:
    pos: int
    seq: int
    hash: str
    prev_hash: str
    content_ok: bool
    columns_ok: bool
    computed: str = ""
    displaced: bool = False


class _Window:
    """The rows around the one being judged, with hash and back-reference indexes."""

    def __init__(self) -> None:
        self.rows: deque[_Row] = deque()
        self.by_hash: dict[str, _Row] = {}
        self.referenced: dict[str, int] = {}

    def push(self, row: _Row) -> None:
        self.rows.append(row)
        self.by_hash[row.hash] = row
        self.referenced[row.prev_hash] = self.referenced.get(row.prev_hash, 0) + 1

    def pop(self) -> None:
        row = self.rows.popleft()
        if self.by_hash.get(row.hash) is row:
            del self.by_hash[row.hash]
        left = self.referenced[row.prev_hash] - 1
        if left:
            self.referenced[row.prev_hash] = left
        else:
            del self.referenced[row.prev_hash]

    def at(self, pos: int) -> _Row | None:
        first = self.rows[0].pos if self.rows else 0
        index = pos - first
        return self.rows[index] if 0 <= index < len(self.rows) else None


def _judge(report: VerifyReport, window: _Window, row: _Row, is_last: bool) -> None:
    if not row.content_ok:
        report.add("modified", row.seq, "hash does not match the event's content")
    elif not row.columns_ok:
        report.add("modified", row.seq, "columns differ from the hashed event")
    pred = window.at(row.pos - 1)
    expected_prev = GENESIS_HASH if row.pos == 0 else (pred.hash if pred else None)
    nxt = window.at(row.pos + 1)
    # Inserted: nobody names this row as predecessor, and its neighbours link around it.
    if (
        not is_last
        and nxt is not None
        and row.hash not in window.referenced
        and nxt.prev_hash == (expected_prev or "")
    ):
        row.displaced = True
        report.add(
            "inserted", row.seq, "no other row links to this row; its neighbours link past it"
        )
        return
    if expected_prev is None or row.prev_hash == expected_prev:
        return
    if pred is not None and not pred.content_ok and row.prev_hash == pred.computed:
        return  # the predecessor's stored hash was altered (reported there); this link holds
    target = window.by_hash.get(row.prev_hash)
    mine_referenced_by_earlier = any(
        r.prev_hash == row.hash for r in window.rows if r.pos < row.pos
    )
    if (target is not None and target.pos > row.pos) or mine_referenced_by_earlier:
        row.displaced = True
        report.add("reordered", row.seq, "the row is out of its place in the chain")
        return
    if target is not None and target.pos < row.pos:
        between = [window.at(p) for p in range(target.pos + 1, row.pos)]
        if all(r is not None and r.displaced for r in between):
            return  # it follows rows already reported as inserted or reordered
        report.add("reordered", row.seq, "the row's predecessor is earlier in the chain")
        row.displaced = True
        return
    if pred is not None and row.seq > pred.seq + 1:
        gap = (pred.seq + 1, row.seq - 1)
        report.add("deleted", gap[0], f"seq {gap[0]}..{gap[1]} missing", gap[1])
        return
    if row.pos == 0 and row.seq > 1:
        report.add("deleted", 1, f"seq 1..{row.seq - 1} missing", row.seq - 1)
        return
    report.add("deleted", row.seq, "the row's predecessor is missing (rows deleted before it)")


def _load_checkpoints(
    conn: Connection,
    public_key: Ed25519PublicKey | None,
    external: Iterable[tuple[str, bytes, bytes | None]] | None,
    report: VerifyReport,
) -> dict[int, list[tuple[Location, str, Checkpoint]]]:
    """Valid checkpoints by seq; invalid and one-sided ones go into the report."""
    by_seq: dict[int, list[tuple[Location, str, Checkpoint]]] = {}
    if public_key is None:
        return by_seq
    db_statements: dict[bytes, str] = {}
    for row_id, statement, signature in stored_checkpoints(conn):
        name = f"row {row_id}"
        try:
            cp = open_checkpoint(statement, signature, public_key)
        except BadCheckpoint as exc:
            report.checkpoint_issues.append(CheckpointIssue("invalid", "database", name, str(exc)))
            continue
        name = f"{cp.file_stem} (row {row_id})"
        db_statements[statement] = name
        by_seq.setdefault(cp.seq, []).append(("database", name, cp))
        report.checkpoints_valid += 1
    if external is None:
        return by_seq
    report.checkpoints_checked_externally = True
    seen: set[bytes] = set()
    for name, statement, maybe_signature in external:
        if maybe_signature is None:
            report.checkpoint_issues.append(
                CheckpointIssue("invalid", "external", name, "signature file missing")
            )
            continue
        try:
            cp = open_checkpoint(statement, maybe_signature, public_key)
        except BadCheckpoint as exc:
            report.checkpoint_issues.append(CheckpointIssue("invalid", "external", name, str(exc)))
            continue
        seen.add(statement)
        report.checkpoints_valid += 1
        by_seq.setdefault(cp.seq, []).append(("external", name, cp))
        if statement not in db_statements:
            report.checkpoint_issues.append(
                CheckpointIssue(
                    "missing", "database", name, "signed externally but absent from the database"
                )
            )
    for statement, name in db_statements.items():
        if statement not in seen:
            report.checkpoint_issues.append(
                CheckpointIssue("missing", "external", name, "in the database but no external copy")
            )
    return by_seq


def verify_chain(
    conn: Connection,
    *,
    public_key: Ed25519PublicKey | None = None,
    external: Iterable[tuple[str, bytes, bytes | None]] | None = None,
    batch: int = 5000,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check the whole chain and, given the public key, every checkpoint in both copies."""
    report = VerifyReport()
    by_seq = _load_checkpoints(conn, public_key, external, report)
    stmt = select(
        audit_events.c.seq,
        audit_events.c.prev_hash,
        audit_events.c.hash,
        audit_events.c.event_json,
        *[audit_events.c[name] for name in _PROJECTED],
    ).order_by(audit_events.c.seq)
    window = _Window()
    pending: deque[_Row] = deque()  # pushed, not yet judged (waiting for look-ahead)
    last_good_checkpoint = 0
    chain_hash_at: dict[int, str] = {}
    signed_hashes = {cp.hash for entries in by_seq.values() for _, _, cp in entries}
    seq_of_signed_hash: dict[str, int] = {}
    pos, after = 0, 0
    last_row: _Row | None = None

    def judge_ready(final: bool) -> None:
        while pending and (final or pending[-1].pos - pending[0].pos >= WINDOW):
            row = pending.popleft()
            _judge(report, window, row, is_last=final and not pending)
            while window.rows and window.rows[0].pos < row.pos - WINDOW:
                window.pop()

    while True:
        rows = conn.execute(stmt.where(audit_events.c.seq > after).limit(batch)).all()
        for raw in rows:
            computed = link_hash(raw.prev_hash, raw.event_json)
            row = _Row(
                pos=pos,
                seq=int(raw.seq),
                hash=raw.hash,
                prev_hash=raw.prev_hash,
                content_ok=computed == raw.hash,
                columns_ok=_columns_agree(raw),
                computed=computed,
            )
            if row.seq in by_seq:
                chain_hash_at[row.seq] = row.hash
            if row.hash in signed_hashes:
                seq_of_signed_hash[row.hash] = row.seq
            window.push(row)
            pending.append(row)
            judge_ready(final=False)
            last_row = row
            pos += 1
        report.events_checked += len(rows)
        if progress is not None and rows:
            progress(len(rows))
        if len(rows) < batch:
            break
        after = int(rows[-1].seq)
    judge_ready(final=True)

    if last_row is not None:
        report.head_seq, report.head_hash = last_row.seq, last_row.hash
    for seq in sorted(by_seq):
        for location, name, cp in by_seq[seq]:
            if seq == 0:
                continue
            if seq > report.head_seq:
                report.add(
                    "deleted",
                    report.head_seq + 1,
                    f"the chain ends at seq {report.head_seq} but checkpoint {name} "
                    f"signed seq {seq}",
                    seq,
                )
                report.checkpoint_issues.append(
                    CheckpointIssue(
                        "mismatch", location, name, "signs rows the chain no longer has"
                    )
                )
            elif chain_hash_at.get(seq) != cp.hash and cp.hash in seq_of_signed_hash:
                moved_to = seq_of_signed_hash[cp.hash]
                report.checkpoint_issues.append(
                    CheckpointIssue(
                        "mismatch",
                        location,
                        name,
                        f"the row it signed is now at seq {moved_to}: rows were inserted or "
                        "deleted before it",
                    )
                )
            elif chain_hash_at.get(seq) != cp.hash:
                report.add(
                    "modified",
                    last_good_checkpoint + 1,
                    f"the chain's hash at seq {seq} differs from signed checkpoint {name}: "
                    "history was rewritten in this range",
                    seq,
                )
                report.checkpoint_issues.append(
                    CheckpointIssue("mismatch", location, name, f"chain hash at seq {seq} differs")
                )
            else:
                last_good_checkpoint = max(last_good_checkpoint, seq)
    head_seq, head_hash = read_head(conn)
    if head_seq > report.head_seq:
        report.add(
            "deleted",
            report.head_seq + 1,
            f"the chain head records seq {head_seq} but the table ends at seq {report.head_seq}",
            head_seq,
        )
    elif head_seq < report.head_seq:
        report.add(
            "inserted",
            head_seq + 1,
            f"rows after the recorded chain head (seq {head_seq}) were added outside the relay",
            report.head_seq,
        )
    elif head_hash != report.head_hash and report.problems_total == 0:
        report.add("modified", head_seq, "the last row differs from the recorded chain head")
    return report


def _columns_agree(row: Any) -> bool:
    """The searchable columns (row[4:], in PROJECTED_COLUMNS order) equal what the JSON says."""
    try:
        implied = project_values(row.event_json)
    except MalformedPayload:
        return False
    return tuple(row[4:]) == implied


def verify_audit_log(
    conn: Connection,
    *,
    public_key: Ed25519PublicKey | None,
    sink: CheckpointSink,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Verify the chain and every checkpoint, both copies.

    Raises :class:`CheckpointKeyError` when checkpoints exist but no public key is at hand:
    a report that silently skipped them would look clean and be wrong.
    """
    external = list(sink.read_all())
    if public_key is None:
        stored = conn.execute(select(func.count()).select_from(checkpoints)).scalar_one()
        if stored or external:
            raise CheckpointKeyError(
                f"{int(stored) + len(external)} checkpoints exist but no checkpoint public key "
                "was found: set ECHO_CHECKPOINT_PUBLIC_KEY_FILE"
            )
    return verify_chain(conn, public_key=public_key, external=external, progress=progress)
