"""Moving the audit database to its own server, for real, while the API takes logins.

``test_split_to_a_second_server_under_load`` follows the runbook (docs/operations.md)
against a SECOND MariaDB server that the test starts on another port with its own data
directory (tests/fixtures/mariadb.py). ``echo-auth serve --no-relay`` takes logins from
a thread the whole time; ``echo-auth relay`` delivers into the old server; then the relay
is stopped, ``echo-auth audit migrate --to URL`` copies and verifies, the URL is switched,
a relay for the new server drains the outbox. Every login the API answered (200 or 401,
found by its request id) must be in the new server exactly once, ``seq`` gapless, event
ids unique, the old server's rows copied unchanged, and the chain and checkpoints verify.

``test_migrate_while_relays_still_run`` (both backends) is the mistake the command must
survive: relays NOT stopped. A relay keeps delivering into the old database while events
keep arriving; the move seals the old database, so nothing is appended there after the
copy, the relay backs off, the events wait in the outbox, and a relay on the new
database delivers each exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import Engine, func, select

from echo_auth.audit.chain import ChainMoved
from echo_auth.audit.events import Actor, AuditEvent, Source, Target
from echo_auth.audit.outbox import enqueue_events
from echo_auth.audit.relay import AuditUnavailable, deliver_batch, drain, run_relay
from echo_auth.audit.search import EventFilter, search_events
from echo_auth.audit.verify import verify_audit_log
from echo_auth.db.audit_schema import audit_events, chain_head, checkpoints
from echo_auth.db.engines import make_engine, transaction
from echo_auth.db.identity_schema import audit_dead_letters, audit_outbox
from echo_auth.identity.provisioning import create_user_by_operator
from echo_auth.ops.split import SplitRefused, move_audit_log, moved_to
from echo_auth.runtime import Runtime
from tests.fixtures.app import PASSWORD
from tests.fixtures.db import Databases, MySQLServer
from tests.fixtures.mariadb import ThrowawayMariaDB

LOGIN_EMAIL = "load@example.com"
TIMEOUT_S = 30


def _count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _wait_for(check: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """``python -m echo_auth ...`` with an explicit environment and a log file."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "echo_auth", *args],
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=10)


class Logins:
    """Logins from a thread, good and bad passwords, each with its own request id."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.answers: list[tuple[str, int]] = []  # (request id, status)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="logins", daemon=True)

    def start(self) -> Logins:
        self._thread.start()
        return self

    def _run(self) -> None:
        with httpx2.Client(base_url=self.base_url, timeout=10) as client:
            i = 0
            while not self._stop.is_set():
                request_id = f"split-{i:06d}"
                password = PASSWORD if i % 3 else "not the password at all"
                try:
                    r = client.post(
                        "/v1/login",
                        json={"email": LOGIN_EMAIL, "password": password},
                        headers={"x-request-id": request_id},
                    )
                    self.answers.append((request_id, r.status_code))
                except httpx2.HTTPError as exc:
                    self.errors.append(f"{request_id}: {exc!r}")
                i += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=20)

    def acknowledged(self) -> dict[str, int]:
        return {rid: status for rid, status in self.answers if status in (200, 401)}


@pytest.fixture
def second_server() -> Iterator[ThrowawayMariaDB]:
    """Being made in the background while the test starts the API (``.server()`` waits)."""
    second = ThrowawayMariaDB().begin()
    try:
        yield second
    finally:
        second.stop()


@pytest.mark.mysql
@pytest.mark.slow
def test_split_to_a_second_server_under_load(
    runtime: Runtime, second_server: ThrowawayMariaDB, tmp_path: Path
) -> None:
    settings = runtime.settings
    runtime.checkpoint_key  # noqa: B018 - made now, so that every process shares one key
    actor = Actor("admin", "test", "test")
    create_user_by_operator(runtime.auth, LOGIN_EMAIL, PASSWORD, [], actor, Source())
    port = _free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_")}
    env = {
        **base_env,
        "ECHO_ENV": "test",
        "ECHO_DATA_DIR": str(settings.data_dir),
        "ECHO_IDENTITY_DB_URL": settings.identity_db_url,
        "ECHO_AUDIT_DB_URL": settings.audit_db_url,
        "ECHO_ARGON2_TIME_COST": "1",
        "ECHO_ARGON2_MEMORY_KIB": "1024",
        "ECHO_ARGON2_PARALLELISM": "1",
        "ECHO_RELAY_IDLE_SLEEP_S": "0.05",
        "ECHO_RELAY_BATCH_SIZE": "50",
        "ECHO_CHECKPOINT_EVERY_EVENTS": "15",
        # One account takes every login, a third of them wrong: no lockout in this test.
        "ECHO_LOGIN_MAX_FAILURES": "1000",
        "ECHO_IP_MAX_FAILURES": "100000",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: list[Process] = []
    logins: Logins | None = None

    def start(name: str, args: list[str], **extra: str) -> Process:
        process = Process(args, {**env, **extra}, tmp_path, logs / f"{name}.log")
        processes.append(process)
        return process

    try:
        api = start("serve", ["serve", "--no-relay", "--port", str(port)])
        _wait_for(lambda: _answers(port), f"the API on port {port}:\n{api.text()}")
        old_relay = start("relay-old", ["relay"])
        logins = Logins(f"http://127.0.0.1:{port}").start()
        # The old server has events and checkpoints before the move.
        _wait_for(
            lambda: (
                _count(runtime.audit, audit_events) >= 40
                and _count(runtime.audit, checkpoints) >= 2
            ),
            "events and checkpoints in the old audit database",
        )
        new_server = second_server.server()
        new_server.create_database("echo_audit")
        target_url = new_server.url("echo_audit")

        # -- 1. stop the relays (the API keeps taking logins; the outbox buffers).
        assert old_relay.stop() == 0, old_relay.text()
        answered_before = len(logins.answers)

        # -- 2. migrate, as the operator does, while logins go on.
        migrated = subprocess.run(
            [sys.executable, "-m", "echo_auth", "audit", "migrate", "--to", target_url],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        assert f"ECHO_AUDIT_DB_URL={target_url}" in migrated.stdout, migrated.stdout
        assert "ECHO_AUDIT_READ_DB_URL" in migrated.stdout
        assert "Traceback" not in migrated.stderr
        target = make_engine(target_url, pool_size=2)
        with transaction(runtime.audit, write=False) as conn:
            old_rows = conn.execute(
                select(audit_events.c.seq, audit_events.c.event_id, audit_events.c.hash).order_by(
                    audit_events.c.seq
                )
            ).all()
            old_checkpoints = _count(runtime.audit, checkpoints)
        assert moved_to(runtime.audit) is not None  # sealed
        _wait_for(
            lambda: len(logins.answers) > answered_before + 20,  # type: ignore[union-attr]
            "logins while the relay was stopped",
        )
        assert _count(runtime.identity, audit_outbox) > 0  # the outbox buffered them

        # -- 3. switch the URL, start a relay against the new server.
        start("relay-new", ["relay"], ECHO_AUDIT_DB_URL=target_url)
        _wait_for(
            lambda: len(logins.answers) > answered_before + 60,  # type: ignore[union-attr]
            "logins after the switch",
        )
        # -- 4. stop the load, drain.
        logins.stop()
        assert not logins.errors, logins.errors[:5]
        assert api.stop() == 0, api.text()
        _wait_for(lambda: _count(runtime.identity, audit_outbox) == 0, "the outbox to drain")
        for process in processes:
            process.stop()

        # -- every acknowledged login is in the NEW server exactly once.
        with transaction(target, write=False) as conn:
            rows = conn.execute(
                select(
                    audit_events.c.seq,
                    audit_events.c.event_id,
                    audit_events.c.hash,
                    audit_events.c.action,
                    audit_events.c.request_id,
                ).order_by(audit_events.c.seq)
            ).all()
            report = verify_audit_log(
                conn, public_key=runtime.checkpoint_public_key, sink=runtime.checkpoint_sink
            )
            migrated_events = search_events(
                conn, EventFilter(action="system.audit.migrated"), limit=10
            ).events
        assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
        assert len({r.event_id for r in rows}) == len(rows)
        # The old server's rows, copied unchanged, are the new chain's start.
        assert [(r.seq, r.event_id, r.hash) for r in rows[: len(old_rows)]] == [
            tuple(r) for r in old_rows
        ]
        # The old server got nothing after the move.
        assert _count(runtime.audit, audit_events) == len(old_rows)
        assert _count(runtime.audit, checkpoints) == old_checkpoints
        logins_by_request: dict[str, int] = {}
        for r in rows:
            if r.action.startswith("auth.login.") and r.request_id:
                logins_by_request[r.request_id] = logins_by_request.get(r.request_id, 0) + 1
        acknowledged = logins.acknowledged()
        assert len(acknowledged) > 90, len(acknowledged)
        assert {200, 401} <= set(acknowledged.values())
        missing = [rid for rid in acknowledged if rid not in logins_by_request]
        twice = [rid for rid, n in logins_by_request.items() if n != 1]
        assert not missing, f"{len(missing)} acknowledged logins missing: {missing[:5]}"
        assert not twice, f"logins recorded more than once: {twice[:5]}"
        assert report.intact, report.summary()
        assert report.checkpoints_valid >= 2 * old_checkpoints, report.summary()
        [event] = migrated_events
        assert event["actor"]["type"] == "admin"
        assert event["metadata"]["head_seq"] == len(old_rows)
        assert event["metadata"]["to"] == target_url  # no password to hide here
        assert _count(runtime.identity, audit_dead_letters) == 0
        target.dispose()
    finally:
        if logins is not None:
            logins.stop()
        for process in processes:
            process.stop()


def _answers(port: int) -> bool:
    try:
        return httpx2.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx2.HTTPError:
        return False


# -- relays NOT stopped: the seal keeps the move safe -------------------------------------


@pytest.fixture
def target_url(
    databases: Databases, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    """An empty database elsewhere: another SQLite file, or another MariaDB database."""
    if databases.backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'new-server' / 'audit.db'}"
        return
    server: MySQLServer = request.getfixturevalue("mysql_server")
    name = f"{databases.audit_name}_moved"
    server.create_database(name)
    try:
        yield server.url(name)
    finally:
        server.drop_database(name)


def _events(n: int, start: int) -> list[AuditEvent]:
    return [
        AuditEvent(
            action="session.revoked",
            outcome="success",
            actor=Actor("admin", "1", "root@example.com"),
            target=Target("session", str(i)),
            source=Source("192.0.2.10", "split-test", f"s{i}"),
        )
        for i in range(start, start + n)
    ]


def test_migrate_while_relays_still_run(runtime: Runtime, target_url: str) -> None:
    queued: list[str] = []
    stop_producing, stop_relay = threading.Event(), threading.Event()

    def produce() -> None:
        while not stop_producing.is_set():
            batch = _events(20, len(queued))
            with transaction(runtime.identity) as conn:
                enqueue_events(conn, batch)
            queued.extend(e.event_id for e in batch)
            time.sleep(0.01)

    producer = threading.Thread(target=produce, daemon=True)
    relay = threading.Thread(
        target=run_relay,
        args=(runtime.identity, runtime.audit, runtime.relay_policy, stop_relay),
        kwargs={"checkpointer": runtime.checkpointer},
        daemon=True,
    )
    target = make_engine(target_url, pool_size=2)
    try:
        producer.start()
        relay.start()
        _wait_for(lambda: _count(runtime.audit, audit_events) >= 200, "events in the old log")

        result = move_audit_log(
            runtime.audit_reader,
            runtime.audit,
            target,
            public_key=runtime.checkpoint_public_key,
            sink=runtime.checkpoint_sink,
            batch_size=50,
        )
        assert result.report.intact, result.report.summary()
        # The relay is still running and events keep coming, but the old log is sealed.
        time.sleep(0.5)
        assert _count(runtime.audit, audit_events) == result.head_seq
        with pytest.raises(AuditUnavailable) as refused:
            deliver_batch(runtime.identity, runtime.audit, runtime.relay_policy)
        assert isinstance(refused.value.__cause__, ChainMoved)
        assert runtime.checkpointer.maybe_checkpoint(force=True) is None
        assert _count(runtime.identity, audit_outbox) > 0

        stop_producing.set()
        producer.join(timeout=10)
        stop_relay.set()
        relay.join(timeout=10)
        drain(runtime.identity, target, runtime.relay_policy)  # the relay on the new server

        with transaction(target, write=False) as conn:
            rows = conn.execute(
                select(audit_events.c.seq, audit_events.c.event_id).order_by(audit_events.c.seq)
            ).all()
            head = conn.execute(select(chain_head.c.seq, chain_head.c.moved_to)).one()
            report = verify_audit_log(
                conn, public_key=runtime.checkpoint_public_key, sink=runtime.checkpoint_sink
            )
        assert [r.seq for r in rows] == list(range(1, len(queued) + 1))
        assert sorted(r.event_id for r in rows) == sorted(queued)
        assert (head.seq, head.moved_to) == (len(queued), None)
        assert report.intact, report.summary()
        assert _count(runtime.identity, audit_outbox) == 0

        # A second move to the now non-empty target is refused before anything changes.
        with pytest.raises(SplitRefused, match="not empty"):
            move_audit_log(
                runtime.audit_reader,
                runtime.audit,
                target,
                public_key=runtime.checkpoint_public_key,
                sink=runtime.checkpoint_sink,
            )
        with pytest.raises(SplitRefused, match="itself"):
            move_audit_log(
                runtime.audit_reader,
                runtime.audit,
                runtime.audit,
                public_key=runtime.checkpoint_public_key,
                sink=runtime.checkpoint_sink,
            )
    finally:
        stop_producing.set()
        stop_relay.set()
        producer.join(timeout=10)
        relay.join(timeout=10)
        target.dispose()
