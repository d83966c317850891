"""What ``audit verify`` reports: row problems, checkpoint issues and the summary line.

The vocabulary is that of ``aws cloudtrail validate-logs`` (see
:mod:`echo_auth.audit.verify`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from echo_auth.audit.events import GENESIS_HASH

RowKind = Literal["modified", "deleted", "inserted", "reordered"]
CheckpointKind = Literal["invalid", "missing", "mismatch"]
Location = Literal["database", "external"]
MAX_REPORTED = 1000


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
