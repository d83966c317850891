"""Prometheus gauges read at scrape time: the pipeline's health, the chain, the backups."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from echo_auth.audit.chain import read_head
from echo_auth.audit.pipeline import outbox_status
from echo_auth.audit.relay import RelayStats
from echo_auth.db.audit_schema import checkpoints
from echo_auth.db.engines import transaction
from echo_auth.runtime import Runtime

BACKUP_GLOB = "echo-backup-*"


class PipelineCollector(Collector):
    """Outbox depth and age, dead letters, chain head, checkpoint and backup ages."""

    def __init__(self, runtime: Runtime, relay_stats: RelayStats) -> None:
        self.runtime = runtime
        self.relay_stats = relay_stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "echo_relay_delivered",
            "Events appended to the chain by this process's relay",
            value=self.relay_stats.delivered,
        )
        try:
            with transaction(self.runtime.identity, write=False) as conn:
                depth, age, dead = outbox_status(conn)
        except DBAPIError:
            depth, age, dead = -1, None, -1
        if depth >= 0:
            yield GaugeMetricFamily(
                "echo_outbox_depth", "Events waiting in the outbox", value=depth
            )
            yield GaugeMetricFamily(
                "echo_outbox_oldest_age_seconds",
                "Age of the oldest undelivered event (0 when the outbox is empty)",
                value=age or 0.0,
            )
            yield GaugeMetricFamily(
                "echo_dead_letters", "Events set aside as undeliverable", value=dead
            )
        now = datetime.now(UTC)
        try:
            with transaction(self.runtime.audit_reader, write=False) as conn:
                head_seq, _ = read_head(conn)
                last_signed = conn.execute(select(func.max(checkpoints.c.signed_at))).scalar()
        except DBAPIError:
            head_seq, last_signed = -1, None
        if head_seq >= 0:
            yield GaugeMetricFamily(
                "echo_chain_head_seq", "Sequence number of the newest audit event", value=head_seq
            )
        if last_signed is not None:
            if isinstance(last_signed, str):  # MAX() can bypass the column type on SQLite
                last_signed = datetime.fromisoformat(last_signed)
            if last_signed.tzinfo is None:
                last_signed = last_signed.replace(tzinfo=UTC)
            yield GaugeMetricFamily(
                "echo_last_checkpoint_age_seconds",
                "Seconds since the newest signed checkpoint",
                value=max(0.0, (now - last_signed).total_seconds()),
            )
        backup_dir = self.runtime.settings.backup_dir
        if backup_dir is not None and backup_dir.is_dir():
            newest = max((p.stat().st_mtime for p in backup_dir.glob(BACKUP_GLOB)), default=None)
            if newest is not None:
                yield GaugeMetricFamily(
                    "echo_last_backup_age_seconds",
                    "Seconds since the newest backup archive was written",
                    value=max(0.0, now.timestamp() - newest),
                )
