"""The relay SIGKILLed 20 times at random moments while 20,000 events flow: nothing lost,
nothing twice.

(This replaces the earlier 3-kill test, tests/fault/test_relay_sigkill.py: same checks,
more kills, and the events now arrive while the relays die.)

A producer thread enqueues events in transactions of random size (1 to 100 events) the
whole time. Real ``python -m echo_auth relay`` subprocesses with small batches deliver
them; each is killed with SIGKILL at a random moment once it works (after a random number
of batches has been appended since it came up, plus a random fraction of a batch), and a
fresh process takes over. Two more relays are always starting up behind the victim, so
their start-up (a second or more of imports each) overlaps the victim's work instead of
adding to the test's time; when a kill lands, often two or three relays are delivering at
once, as in production with several relays. The producer is paced by the kills (each
kill releases the next 1/21 of the events), so events keep arriving through every kill,
never all queued up front.

Then the relays still running drain the rest and stop on SIGTERM with exit 0. Every
event must be in the chain exactly once, ``seq`` 1..20,000 without a gap, the chain and
the database checkpoints verifying, no dead letter.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import deque
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from echo_auth.audit.checkpoints import DirectorySink
from echo_auth.audit.events import Actor, AuditEvent, Source, Target
from echo_auth.audit.outbox import enqueue_events
from echo_auth.audit.verify import verify_chain
from echo_auth.db.audit_schema import chain_head
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import audit_dead_letters, audit_outbox
from echo_auth.runtime import Runtime
from tests.fixtures.services import (
    EchoProcess,
    audit_rows,
    count_rows,
    echo_env,
    wait_for,
)

EVENTS = 20_000
KILLS = 20
BATCH = 50
SPARES = 2  # relays starting up behind the one to be killed next
STEP = EVENTS // (KILLS + 1)  # events released to the producer per kill


def _head(audit: Engine) -> int:
    """Events appended so far (the chain head's seq: one row, cheap to poll)."""
    with audit.connect() as conn:
        return int(conn.execute(select(chain_head.c.seq)).scalar() or 0)


class Producer:
    """Enqueues events in transactions until ``released`` are out, then waits for more."""

    def __init__(self, runtime: Runtime, seed: int) -> None:
        self.runtime = runtime
        self.rng = random.Random(seed)
        self.ids: list[str] = []
        self.released = 0
        self.failure: BaseException | None = None
        self.stopped = False
        self._more = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)

    def start(self) -> Producer:
        self._thread.start()
        return self

    def release(self, upto: int) -> None:
        with self._more:
            self.released = min(EVENTS, upto)
            self._more.notify()

    def stop(self) -> None:
        with self._more:
            self.stopped = True
            self._more.notify()
        self._thread.join(timeout=30)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the producer is stuck at {len(self.ids)}"
        assert self.failure is None, repr(self.failure)

    def _run(self) -> None:
        try:
            while len(self.ids) < EVENTS:
                with self._more:
                    while len(self.ids) >= self.released and not self.stopped:
                        assert self._more.wait(timeout=300), "no more events released"
                    if self.stopped:
                        return
                    n = min(self.rng.randint(1, 100), self.released - len(self.ids))
                start = len(self.ids)
                events = [
                    AuditEvent(
                        action="session.revoked",
                        outcome="success",
                        actor=Actor("admin", "1", "root@example.com"),
                        target=Target("session", str(i)),
                        source=Source("192.0.2.10", "kill-test", f"k{i}"),
                        metadata={"n": i},
                    )
                    for i in range(start, start + n)
                ]
                with transaction(self.runtime.identity) as conn:
                    enqueue_events(conn, events)
                self.ids.extend(e.event_id for e in events)
                time.sleep(self.rng.uniform(0, 0.003))
        except BaseException as exc:
            self.failure = exc


@pytest.mark.mysql
@pytest.mark.slow
def test_relay_killed_20_times_while_events_flow(runtime: Runtime, tmp_path: Path) -> None:
    settings = runtime.settings
    runtime.checkpoint_key  # noqa: B018 - made now: every relay signs with this one key
    env = echo_env(
        settings.data_dir,
        settings.identity_db_url,
        settings.audit_db_url,
        ECHO_RELAY_BATCH_SIZE=str(BATCH),
        ECHO_CHECKPOINT_EVERY_EVENTS="700",  # checkpoints are signed, and killed, too
    )
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    producer = Producer(runtime, seed).start()
    relays: list[EchoProcess] = []
    waiting: deque[EchoProcess] = deque()  # started, not killed yet; the oldest dies next
    kills: list[tuple[int, int, int]] = []  # (appended before, target, at kill)

    def spawn() -> None:
        relay = EchoProcess(f"relay{len(relays) + 1:02d}", ["relay"], env, tmp_path, tmp_path)
        relays.append(relay.start())
        waiting.append(relay)

    def context() -> str:
        return f"seed {seed}, kills (before, target, at kill) = {kills}"

    try:
        for k in range(KILLS):
            while len(waiting) < 1 + SPARES:
                spawn()
            victim = waiting[0]
            wait_for(
                lambda: "relay running" in victim.log() or not victim.alive,  # noqa: B023
                60,
                f"{victim.name} to start",
            )
            assert victim.alive, f"{victim.name} exited:\n{victim.log()}"
            producer.release((k + 2) * STEP)  # always well ahead of what was appended
            before = _head(runtime.audit)
            target = before + rng.randint(1, 8) * BATCH

            def progressed() -> bool:
                assert victim.alive, f"{victim.name} died:\n{victim.log()}"  # noqa: B023
                return _head(runtime.audit) >= target  # noqa: B023

            wait_for(progressed, 60, f"{target} appended ({context()})", interval=0.005)
            time.sleep(rng.uniform(0, 0.05))  # land anywhere inside a batch
            assert victim.kill() == -signal.SIGKILL
            at_kill = _head(runtime.audit)
            kills.append((before, target, at_kill))
            assert before < at_kill < EVENTS, f"the kill did not land mid-stream: {context()}"
            waiting.popleft()

        producer.release(EVENTS)
        producer.join(timeout=120)
        # The relays still running drain the rest, then stop cleanly on SIGTERM.
        last = list(waiting)

        def drained() -> bool:
            dead = [r.name for r in last if not r.alive]
            assert not dead, f"{dead} exited: {context()}"
            return (
                count_rows(runtime.identity, audit_outbox) == 0 and _head(runtime.audit) >= EVENTS
            )

        wait_for(drained, 120, f"the last relays to drain ({context()})", interval=0.1)
        for relay in last:
            wait_for(lambda: "relay running" in relay.log(), 60, f"{relay.name} to start")  # noqa: B023
            assert relay.stop() == 0, relay.log()
    finally:
        producer.stop()
        for relay in relays:
            if relay.alive:
                relay.kill()

    rows = audit_rows(runtime.audit)
    assert [r.seq for r in rows] == list(range(1, EVENTS + 1)), context()
    stored = [r.event_id for r in rows]
    assert len(stored) == len(set(stored)) == EVENTS, context()
    assert set(stored) == set(producer.ids), context()
    assert count_rows(runtime.identity, audit_outbox) == 0
    assert count_rows(runtime.identity, audit_dead_letters) == 0
    public_key = runtime.checkpoint_key.public_key()
    with transaction(runtime.audit, write=False) as conn:
        report = verify_chain(conn)
        signed = verify_chain(conn, public_key=public_key)
        external = verify_chain(
            conn,
            public_key=public_key,
            external=DirectorySink(settings.data_dir / "checkpoints").read_all(),
        )
    assert report.intact, f"{context()}: {report.summary()}"
    # The checkpoints the killed relays signed in the database agree with the chain.
    assert signed.intact and signed.checkpoints_valid >= 1, f"{context()}: {signed.summary()}"
    # Files are written after the database row commits, so a kill can leave a row without
    # files (a documented limitation), never a signed file the database lacks, and no
    # checkpoint may disagree with the chain.
    assert external.problems_total == 0, f"{context()}: {external.summary()}"
    assert not [
        issue
        for issue in external.checkpoint_issues
        if issue.kind == "mismatch" or (issue.kind, issue.location) == ("missing", "database")
    ], f"{context()}: {[i.describe() for i in external.checkpoint_issues]}"
