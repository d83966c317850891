"""Recompute the hash chain and report every row that does not fit.

Streams the table in ``seq`` order, a batch at a time, so memory does not grow with the
log. For every row it checks: ``seq`` follows the previous one (a jump is a deletion),
``prev_hash`` equals the previous row's ``hash`` (a break is an insertion, a reorder or a
deletion), ``hash`` equals SHA-256(prev_hash || event_json) (else the row was modified),
and the searchable columns equal what ``event_json`` says (else they were modified).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Connection, func, select

from echo_auth.audit.chain import MalformedPayload, link_hash, project, read_head
from echo_auth.audit.events import GENESIS_HASH
from echo_auth.db.audit_schema import audit_events

Kind = Literal["modified", "deleted", "inserted", "reordered", "broken_link", "head_mismatch"]
MAX_REPORTED = 1000


@dataclass(frozen=True)
class Problem:
    kind: Kind
    seq: int
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seq": self.seq, "detail": self.detail}


@dataclass
class VerifyReport:
    events_checked: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS_HASH
    problems: list[Problem] = field(default_factory=list)
    problems_total: int = 0

    @property
    def intact(self) -> bool:
        return self.problems_total == 0

    @property
    def first_bad_seq(self) -> int | None:
        return min((p.seq for p in self.problems), default=None)

    def add(self, kind: Kind, seq: int, detail: str) -> None:
        self.problems_total += 1
        if len(self.problems) < MAX_REPORTED:
            self.problems.append(Problem(kind, seq, detail))

    def summary(self) -> str:
        if self.intact:
            return f"chain intact: {self.events_checked} events, head seq {self.head_seq}"
        counts: dict[str, int] = {}
        for p in self.problems:
            counts[p.kind] = counts.get(p.kind, 0) + 1
        parts = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        return (
            f"chain TAMPERED: {self.problems_total} problems ({parts}); "
            f"first bad seq {self.first_bad_seq}; {self.events_checked} events checked"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "intact": self.intact,
            "events_checked": self.events_checked,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "first_bad_seq": self.first_bad_seq,
            "problems_total": self.problems_total,
            "problems": [p.as_dict() for p in self.problems],
            "summary": self.summary(),
        }


_PROJECTED = (
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


def count_events(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(audit_events)).scalar_one())


def verify_chain(
    conn: Connection, *, batch: int = 5000, progress: Callable[[int], None] | None = None
) -> VerifyReport:
    report = VerifyReport()
    cols = [audit_events.c[name] for name in _PROJECTED]
    stmt = select(
        audit_events.c.seq,
        audit_events.c.prev_hash,
        audit_events.c.hash,
        audit_events.c.event_json,
        *cols,
    ).order_by(audit_events.c.seq)
    expected_seq, expected_prev = 1, GENESIS_HASH
    after = 0
    while True:
        rows = conn.execute(stmt.where(audit_events.c.seq > after).limit(batch)).all()
        for row in rows:
            seq = int(row.seq)
            if seq > expected_seq:
                missing = (
                    f"{expected_seq}" if seq == expected_seq + 1 else (f"{expected_seq}..{seq - 1}")
                )
                report.add("deleted", expected_seq, f"seq {missing} missing")
            if row.prev_hash != expected_prev:
                report.add("broken_link", seq, "prev_hash does not match the previous row's hash")
            if link_hash(row.prev_hash, row.event_json) != row.hash:
                report.add("modified", seq, "hash does not match the event's content")
            _check_projection(report, seq, row)
            expected_seq, expected_prev = seq + 1, row.hash
            report.events_checked += 1
        if progress is not None and rows:
            progress(len(rows))
        if len(rows) < batch:
            break
        after = int(rows[-1].seq)
    report.head_seq, report.head_hash = expected_seq - 1, expected_prev
    head_seq, head_hash = read_head(conn)
    if (head_seq, head_hash) != (report.head_seq, report.head_hash):
        report.add(
            "head_mismatch",
            min(head_seq, report.head_seq) + 1,
            f"chain head says seq {head_seq}, the table ends at seq {report.head_seq}",
        )
    return report


def _check_projection(report: VerifyReport, seq: int, row: Any) -> None:
    try:
        implied = project(row.event_json)
    except MalformedPayload:
        report.add("modified", seq, "event_json is not an event document")
        return
    changed = [name for name in _PROJECTED if getattr(row, name) != implied[name]]
    if changed:
        report.add("modified", seq, f"columns differ from the hashed event: {', '.join(changed)}")
