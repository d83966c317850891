"""Health of the audit pipeline: what waits in the outbox, what was delivered, what died."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, func, select

from echo_auth.audit.chain import read_head
from echo_auth.db.identity_schema import audit_dead_letters, audit_outbox


@dataclass(frozen=True)
class PipelineStatus:
    outbox_depth: int
    oldest_undelivered_age_s: float | None
    delivered: int | None
    chain_head_seq: int | None
    dead_letters: int
    audit_db_reachable: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def outbox_status(identity: Connection) -> tuple[int, float | None, int]:
    depth, oldest = identity.execute(
        select(func.count(), func.min(audit_outbox.c.created_at))
    ).one()
    dead = identity.execute(select(func.count()).select_from(audit_dead_letters)).scalar_one()
    age = None
    if oldest is not None:
        # MIN() bypasses the column type on some backends; normalise to aware UTC.
        if isinstance(oldest, str):
            oldest = datetime.fromisoformat(oldest)
        if oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        age = max(0.0, (datetime.now(UTC) - oldest).total_seconds())
    return int(depth), age, int(dead)


def pipeline_status(identity: Connection, audit: Connection | None) -> PipelineStatus:
    """``audit`` may be None when the audit database is unreachable: the outbox still reports."""
    depth, age, dead = outbox_status(identity)
    head: int | None = None
    if audit is not None:
        head, _ = read_head(audit)
    return PipelineStatus(
        outbox_depth=depth,
        oldest_undelivered_age_s=None if age is None else round(age, 3),
        delivered=head,
        chain_head_seq=head,
        dead_letters=dead,
        audit_db_reachable=audit is not None,
    )
