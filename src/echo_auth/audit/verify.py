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

import hashlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, func, select

from echo_auth.audit.chain import (
    PROJECTED_COLUMNS,
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
from echo_auth.audit.verify_read import Batch, batch_reader, exact_columns_agree
from echo_auth.audit.verify_report import (
    CheckpointIssue,
    Location,
    VerifyReport,
)
from echo_auth.db.audit_schema import audit_events, checkpoints

WINDOW = 64

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


class _Scanner:
    """Reads the chain row by row and judges the dirty rows (see the notes above)."""

    def __init__(self, report: VerifyReport) -> None:
        self.report = report
        self.n = 0  # rows read; the next row's position
        self.base = 0  # the position of the first row kept in the lists below
        self.seqs: list[int] = []
        self.prevs: list[str] = []
        self.hashes: list[str] = []
        self.computed: list[str] = []
        self.columns_bad: set[int] = set()
        self.displaced: set[int] = set()
        self.dirty: deque[int] = deque()  # positions to judge, ascending
        self.unsure: list[tuple[int, int, str]] = []  # (position, seq, event_json)
        self.last_hash = GENESIS_HASH  # what the next row's prev_hash must be
        self.window = _Window()

    def feed(self, rows: Batch, implied: Callable[[str], Any]) -> None:
        """Take in rows read (settle() before judging: the cursor may still be open)."""
        n, last = self.n, self.last_hash
        seqs, prevs, hashes, computed = self.seqs, self.prevs, self.hashes, self.computed
        dirty, unsure = self.dirty, self.unsure
        sha256 = hashlib.sha256
        for seq, prev, digest, event_json, columns in rows:
            mine = sha256((prev + event_json).encode("utf-8")).hexdigest()  # link_hash
            try:
                agree = implied(event_json) == columns
            except Exception:  # anything odd goes to the exact test
                agree = False
            if not agree:
                unsure.append((n, seq, event_json))
            if prev != last:
                # Both this row and its predecessor (whose successor no longer links to
                # it) need judging.
                if n and (not dirty or dirty[-1] < n - 1):
                    dirty.append(n - 1)
                if not dirty or dirty[-1] < n:
                    dirty.append(n)
            elif mine != digest and (not dirty or dirty[-1] < n):
                dirty.append(n)
            seqs.append(seq)
            prevs.append(prev)
            hashes.append(digest)
            computed.append(mine)
            last = digest
            n += 1
        self.n, self.last_hash = n, last

    def settle(self, conn: Connection) -> None:
        """After a batch, with the connection free: the exact test for the rows the fast
        one did not clear, then judge what can be judged and forget what is not needed."""
        if self.unsure:
            bad = {
                n
                for n, seq, event_json in self.unsure
                if not exact_columns_agree(conn, seq, event_json)
            }
            self.unsure.clear()
            if bad:
                self.columns_bad |= bad
                self.dirty = deque(sorted(bad.union(self.dirty)))
        self._judge_ready(final=False)
        n, seqs, prevs, hashes, computed = self.n, self.seqs, self.prevs, self.hashes, self.computed
        columns_bad = self.columns_bad
        # Keep what the dirty rows still to be judged can need: WINDOW + 1 rows before
        # them, and they lie at most WINDOW rows before the last one read.
        keep_from = max(self.base, n - 2 * WINDOW - 2)
        if keep_from > self.base:
            cut = keep_from - self.base
            for values in (seqs, prevs, hashes, computed):
                del values[:cut]
            self.base = keep_from
            if columns_bad:
                self.columns_bad = {p for p in columns_bad if p >= keep_from}
            if self.displaced:
                self.displaced = {p for p in self.displaced if p >= keep_from}

    def finish(self) -> None:
        self._judge_ready(final=True)

    def last_row(self) -> tuple[int, str] | None:
        if not self.seqs:
            return None
        return self.seqs[-1], self.hashes[-1]

    def _judge_ready(self, final: bool) -> None:
        dirty, last = self.dirty, self.n - 1
        while dirty and (final or dirty[0] + WINDOW <= last):
            pos = dirty.popleft()
            self._judge(pos, is_last=final and pos == last)

    def _judge(self, pos: int, is_last: bool) -> None:
        # The window _judge has always seen: rows pos - WINDOW - 1 .. pos + WINDOW.
        lo, hi = max(0, pos - 1 - WINDOW), min(pos + WINDOW, self.n - 1)
        window = self.window
        start = window.rows[-1].pos + 1 if window.rows else lo
        if start < lo:
            window = self.window = _Window()
            start = lo
        while window.rows and window.rows[0].pos < lo:
            window.pop()
        for p in range(start, hi + 1):
            window.push(self._row(p))
        row = window.at(pos)
        assert row is not None
        _judge(self.report, window, row, is_last)
        if row.displaced:
            self.displaced.add(pos)

    def _row(self, pos: int) -> _Row:
        i = pos - self.base
        return _Row(
            pos=pos,
            seq=self.seqs[i],
            hash=self.hashes[i],
            prev_hash=self.prevs[i],
            content_ok=self.computed[i] == self.hashes[i],
            columns_ok=pos not in self.columns_bad,
            computed=self.computed[i],
            displaced=pos in self.displaced,
        )


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
    last_good_checkpoint = 0
    chain_hash_at: dict[int, str] = {}
    signed_hashes = {cp.hash for entries in by_seq.values() for _, _, cp in entries}
    seq_of_signed_hash: dict[str, int] = {}
    fetch, implied = batch_reader(conn, batch)
    scanner = _Scanner(report)
    after = 0
    while True:
        count = 0
        for rows in fetch(after):
            scanner.feed(rows, implied)
            if by_seq:
                for seq, _, digest, _, _ in rows:
                    if seq in by_seq:
                        chain_hash_at[seq] = digest
                    if digest in signed_hashes:
                        seq_of_signed_hash[digest] = seq
            count += len(rows)
            after = int(rows[-1][0])
        scanner.settle(conn)
        report.events_checked += count
        if progress is not None and count:
            progress(count)
        if count < batch:
            break
    scanner.finish()
    last_row = scanner.last_row()

    if last_row is not None:
        report.head_seq, report.head_hash = last_row
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
