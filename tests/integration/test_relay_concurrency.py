"""Two relays draining one outbox at once (MariaDB: SKIP LOCKED claims, chain-head lock).

Each relay is a thread running the production loop (``run_relay``) with its own engines,
as two relay processes would have. The promise: every event lands exactly once, ``seq``
runs 1..N with no gap, and the chain verifies.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import Engine, Table, func, select

from echo_auth.audit.events import Actor, AuditEvent, Source, Target
from echo_auth.audit.outbox import enqueue_events
from echo_auth.audit.relay import BatchResult, RelayPolicy, RelayStats, run_relay
from echo_auth.audit.verify import verify_chain
from echo_auth.db.audit_schema import audit_events
from echo_auth.db.engines import make_engine, transaction
from echo_auth.db.identity_schema import audit_outbox
from echo_auth.runtime import Runtime

EVENTS = 5000
RELAYS = 2
DEADLINE_S = 60.0


def _queue(runtime: Runtime, count: int) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, 1000):
        events = [
            AuditEvent(
                action="auth.login.succeeded",
                outcome="success",
                actor=Actor("user", str(i), f"u{i}@example.com"),
                target=Target("user", str(i)),
                source=Source("192.0.2.1", "load/1.0", f"r{i}"),
                metadata={"i": i},
            )
            for i in range(start, min(count, start + 1000))
        ]
        with transaction(runtime.identity) as conn:
            enqueue_events(conn, events)
        ids.extend(e.event_id for e in events)
    return ids


def _count(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


@pytest.mark.mysql
@pytest.mark.slow
def test_two_relays_deliver_every_event_exactly_once(runtime: Runtime) -> None:
    ids = _queue(runtime, EVENTS)
    policy = RelayPolicy(batch_size=100, max_attempts=3, backoff_base_s=0.1, idle_sleep_s=0.01)
    results: dict[int, list[BatchResult]] = {n: [] for n in range(RELAYS)}
    stats = {n: RelayStats() for n in range(RELAYS)}
    crashed: list[BaseException] = []
    stop = threading.Event()
    start = threading.Barrier(RELAYS + 1)

    def relay(n: int) -> None:
        # Its own engines, as a separate relay process would have.
        identity = make_engine(runtime.settings.identity_db_url, pool_size=2)
        audit = make_engine(runtime.settings.audit_db_url, pool_size=2)
        try:
            start.wait(timeout=10)
            run_relay(identity, audit, policy, stop, on_batch=results[n].append, stats=stats[n])
        except BaseException as exc:  # run_relay promises never to raise for DB trouble
            crashed.append(exc)
        finally:
            identity.dispose()
            audit.dispose()

    threads = [threading.Thread(target=relay, args=(n,), name=f"relay-{n}") for n in range(RELAYS)]
    for thread in threads:
        thread.start()
    start.wait(timeout=10)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while time.monotonic() < deadline:
            if _count(runtime.identity, audit_outbox) == 0:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a relay did not stop"
    assert crashed == []
    assert _count(runtime.identity, audit_outbox) == 0, "the outbox did not drain in time"

    # Both relays really worked. Every event left the outbox in exactly one successful
    # batch, as a new row or as one found already appended (a batch whose outbox delete
    # failed after its audit commit, then was claimed again).
    delivered = {n: stats[n].delivered for n in range(RELAYS)}
    assert all(delivered[n] > 0 for n in range(RELAYS)), delivered
    batches = [r for rs in results.values() for r in rs]
    assert sum(r.claimed for r in batches) == EVENTS
    assert sum(r.delivered + r.already_present for r in batches) == EVENTS
    assert sum(r.failed + r.dead_lettered for r in batches) == 0

    with transaction(runtime.audit, write=False) as conn:
        rows = conn.execute(
            select(audit_events.c.seq, audit_events.c.event_id).order_by(audit_events.c.seq)
        ).all()
        report = verify_chain(conn)
    assert [r.seq for r in rows] == list(range(1, EVENTS + 1))
    stored = [r.event_id for r in rows]
    assert len(set(stored)) == EVENTS
    assert set(stored) == set(ids)
    assert report.intact, report.summary()
    assert report.events_checked == EVENTS and report.head_seq == EVENTS
