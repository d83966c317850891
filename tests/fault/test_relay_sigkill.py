"""A relay process killed with SIGKILL mid-stream, again and again, loses and duplicates nothing.

The real ``python -m echo_auth relay`` runs as a subprocess against MariaDB with small
batches, and is killed at random moments while it works (never before it made progress,
never after it finished). A last relay then drains the rest. Every event must be in the
chain exactly once, ``seq`` gapless, the chain and its database checkpoints verifying.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, Table, func, select

from echo_auth.audit.checkpoints import DirectorySink, load_or_create_key
from echo_auth.audit.events import Actor, AuditEvent, Source, Target
from echo_auth.audit.outbox import enqueue_events
from echo_auth.audit.verify import verify_chain
from echo_auth.db.audit_schema import audit_events
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import audit_dead_letters, audit_outbox
from echo_auth.runtime import Runtime

EVENTS = 3000
KILLS = 3
BATCH = 50


def _count(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _event_ids(engine: Engine, table: Table) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(table.c.event_id)).scalars())


class RelayProcess:
    """``python -m echo_auth relay`` with a minimal, explicit environment."""

    def __init__(self, runtime: Runtime, data_dir: Path, log_dir: Path) -> None:
        self.env = {
            "ECHO_ENV": "test",
            "ECHO_IDENTITY_DB_URL": runtime.settings.identity_db_url,
            "ECHO_AUDIT_DB_URL": runtime.settings.audit_db_url,
            "ECHO_DATA_DIR": str(data_dir),
            "ECHO_RELAY_BATCH_SIZE": str(BATCH),
            "ECHO_RELAY_IDLE_SLEEP_S": "0.05",
            "ECHO_RELAY_BACKOFF_BASE_S": "0.1",
        }
        self.cwd = data_dir.parent  # no stray .env file can be picked up from here
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.log_dir / f"relay-{self.starts}.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "echo_auth", "relay"],
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=30)

    def log(self) -> str:
        return (self.log_dir / f"relay-{self.starts}.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.alive():
            self.signal(signal.SIGKILL)


@pytest.fixture
def relay(runtime: Runtime, tmp_path: Path) -> Iterator[RelayProcess]:
    (tmp_path / "logs").mkdir()
    process = RelayProcess(runtime, tmp_path / "relay-var", tmp_path / "logs")
    yield process
    process.stop()


def _queue(runtime: Runtime) -> list[str]:
    ids: list[str] = []
    for start in range(0, EVENTS, 1000):
        events = [
            AuditEvent(
                action="session.revoked",
                outcome="success",
                actor=Actor("admin", "1", "root@example.com"),
                target=Target("session", str(i)),
                source=Source("192.0.2.10", "kill-test", f"k{i}"),
                metadata={"n": i},
            )
            for i in range(start, min(EVENTS, start + 1000))
        ]
        with transaction(runtime.identity) as conn:
            enqueue_events(conn, events)
        ids.extend(e.event_id for e in events)
    return ids


def _wait_for(
    condition: Callable[[], bool], timeout: float, relay: RelayProcess, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert relay.alive(), f"relay exited while waiting for {what}:\n{relay.log()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{relay.log()}"
        time.sleep(0.003)


@pytest.mark.mysql
@pytest.mark.slow
def test_sigkilled_relay_loses_and_duplicates_nothing(
    runtime: Runtime, relay: RelayProcess
) -> None:
    ids = _queue(runtime)
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    kills: list[tuple[int, int, int]] = []  # (delivered before, at kill, in both DBs)

    for _ in range(KILLS):
        before = _count(runtime.audit, audit_events)
        target = before + rng.randint(2 * BATCH, 8 * BATCH)
        relay.start()
        _wait_for(
            lambda: _count(runtime.audit, audit_events) >= target,  # noqa: B023 - used at once
            30,
            relay,
            f"{target} delivered events",
        )
        time.sleep(rng.uniform(0, 0.03))  # land anywhere inside a batch
        assert relay.signal(signal.SIGKILL) == -signal.SIGKILL
        at_kill = _count(runtime.audit, audit_events)
        # Events already appended but still queued: the crash window between the audit
        # commit and the outbox delete. Redelivery must skip them, not append them twice.
        both = len(
            _event_ids(runtime.audit, audit_events) & _event_ids(runtime.identity, audit_outbox)
        )
        kills.append((before, at_kill, both))
        assert before < at_kill < EVENTS, f"seed {seed}: kill did not land mid-stream: {kills}"

    relay.start()
    _wait_for(
        lambda: (
            _count(runtime.identity, audit_outbox) == 0
            and _count(runtime.audit, audit_events) >= EVENTS
        ),
        60,
        relay,
        "the last relay to drain the outbox",
    )
    assert relay.signal(signal.SIGTERM) == 0, relay.log()

    context = f"seed {seed}, kills (before, at kill, in both DBs) = {kills}"
    with transaction(runtime.audit, write=False) as conn:
        rows = conn.execute(
            select(audit_events.c.seq, audit_events.c.event_id).order_by(audit_events.c.seq)
        ).all()
        report = verify_chain(conn)
        data_dir = relay.cwd / "relay-var"
        key = load_or_create_key(data_dir / "keys" / "checkpoint-ed25519.pem", create=False)
        signed = verify_chain(conn, public_key=key.public_key())
        external = verify_chain(
            conn,
            public_key=key.public_key(),
            external=DirectorySink(data_dir / "checkpoints").read_all(),
        )
    assert [r.seq for r in rows] == list(range(1, EVENTS + 1)), context
    stored = [r.event_id for r in rows]
    assert len(stored) == len(set(stored)) == EVENTS, context
    assert set(stored) == set(ids), context
    assert _count(runtime.identity, audit_outbox) == 0
    assert _count(runtime.identity, audit_dead_letters) == 0
    assert report.intact, f"{context}: {report.summary()}"
    # The checkpoints the killed relays signed in the database agree with the chain.
    assert signed.intact and signed.checkpoints_valid >= 1, f"{context}: {signed.summary()}"
    # Files are written after the database row commits, so a kill can leave a row without
    # files (a documented limitation), never a signed file the database lacks, and no
    # checkpoint may disagree with the chain.
    assert external.problems_total == 0, f"{context}: {external.summary()}"
    assert not [
        issue
        for issue in external.checkpoint_issues
        if issue.kind == "mismatch" or (issue.kind, issue.location) == ("missing", "database")
    ], f"{context}: {[i.describe() for i in external.checkpoint_issues]}"
