"""With the audit database unreachable, the service keeps serving and nothing is lost.

How the audit database goes away:

* MariaDB: for real. The audit engine reaches MariaDB through a TCP proxy
  (tests/fixtures/proxy.py); closing the proxy drops every open connection and refuses
  new ones, as a server that went down would; reopening it on the same port brings the
  database back. Pooled connections are NOT reset by the test: the code must cope.
* SQLite: the honest equivalent of "cannot connect". The audit file lives in its own
  directory; that directory is moved aside and a regular file put in its place, so no
  connection can open the database ("unable to open database file"), and the audit
  engine's pool is disposed, because an already-open SQLite handle would keep working on
  the moved file (a server outage drops connections too). Moving the directory back
  restores the database untouched.

Meanwhile logins go through HTTP, their events wait in the outbox, ``drain`` raises
``AuditUnavailable``, and a running relay keeps backing off without dying. When the audit
database is back, the same relay delivers every waiting event exactly once.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from echo_auth.app import create_app
from echo_auth.audit.pipeline import pipeline_status
from echo_auth.audit.relay import AuditUnavailable, RelayStats, drain, run_relay
from echo_auth.audit.search import EventFilter, search_events
from echo_auth.audit.verify import verify_chain
from echo_auth.db.audit_schema import audit_events
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import audit_outbox
from echo_auth.runtime import Runtime
from tests.fixtures.app import PASSWORD
from tests.fixtures.db import Databases, make_settings
from tests.fixtures.proxy import TcpProxy


class AuditOutage:
    """Takes the audit database away and brings it back, per backend (see module doc)."""

    def __init__(self, databases: Databases, tmp_path: Path) -> None:
        self.backend = databases.backend
        self.proxy: TcpProxy | None = None
        if self.backend == "mysql":
            real = make_url(databases.audit_url)
            self.proxy = TcpProxy(real.host or "127.0.0.1", real.port or 3306).open()
            self.audit_url = real.set(host="127.0.0.1", port=self.proxy.port).render_as_string(
                hide_password=False
            )
        else:
            self.directory = tmp_path / "audit-db"
            self.moved = tmp_path / "audit-db.away"
            self.audit_url = f"sqlite:///{self.directory / 'audit.db'}"
        self.runtime: Runtime | None = None

    def begin(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
            return
        assert self.runtime is not None
        self.directory.rename(self.moved)
        self.directory.write_text("not a directory: the audit database is unreachable\n")
        self.runtime.audit.dispose()

    def end(self) -> None:
        if self.proxy is not None:
            self.proxy.open()
            return
        self.directory.unlink()
        self.moved.rename(self.directory)

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        elif self.moved.exists():
            if self.directory.is_file():
                self.directory.unlink()
            shutil.rmtree(self.directory, ignore_errors=True)
            self.moved.rename(self.directory)


@pytest.fixture
def outage(databases: Databases, tmp_path: Path) -> Iterator[AuditOutage]:
    fault = AuditOutage(databases, tmp_path)
    settings = make_settings(tmp_path / "var", databases, audit_db_url=fault.audit_url)
    runtime = Runtime(settings, pool_size=4)
    fault.runtime = runtime
    try:
        runtime.upgrade_databases()
        yield fault
    finally:
        fault.close()
        runtime.close()


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _outbox(runtime: Runtime) -> list[str]:
    with transaction(runtime.identity, write=False) as conn:
        return list(
            conn.execute(select(audit_outbox.c.payload).order_by(audit_outbox.c.id)).scalars()
        )


def test_logins_succeed_and_events_wait_while_the_audit_db_is_down(outage: AuditOutage) -> None:
    runtime = outage.runtime
    assert runtime is not None
    app = create_app(runtime.settings, runtime=runtime)
    stop = threading.Event()
    stats = RelayStats()
    relay = threading.Thread(
        target=run_relay,
        args=(runtime.identity, runtime.audit, runtime.relay_policy, stop),
        kwargs={"stats": stats},
        name="relay-under-test",
        daemon=True,
    )
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        r = client.post("/v1/signup", json={"email": "ana@example.com", "password": PASSWORD})
        assert r.status_code == 201, r.text
        relay.start()
        try:
            _wait(lambda: not _outbox(runtime), 10, "the relay to deliver the sign-up")
            with transaction(runtime.audit, write=False) as conn:
                delivered_before = conn.execute(
                    select(func.count()).select_from(audit_events)
                ).scalar_one()
            assert delivered_before >= 2  # system.started, user.signed_up
            errors_before = stats.errors

            outage.begin()
            tokens = []
            for _ in range(3):
                r = client.post(
                    "/v1/login", json={"email": "ana@example.com", "password": PASSWORD}
                )
                assert r.status_code == 200, r.text
                tokens.append(r.json()["session_token"])
            r = client.post("/v1/login", json={"email": "ana@example.com", "password": "wrong" * 4})
            assert r.status_code == 401
            r = client.get("/v1/me", headers={"Authorization": f"Bearer {tokens[0]}"})
            assert r.status_code == 200 and r.json()["email"] == "ana@example.com"

            # The events wait in the outbox; nothing can reach the audit database. The
            # running relay may hold the batch (SKIP LOCKED) at the moment we try, in
            # which case this drain claims nothing: try until it gets a batch of its own.
            deadline = time.monotonic() + 10
            while True:
                try:
                    drain(runtime.identity, runtime.audit, runtime.relay_policy)
                except AuditUnavailable:
                    break
                assert time.monotonic() < deadline, "drain never met the outage"
                time.sleep(0.05)
            _wait(lambda: stats.errors >= errors_before + 2, 10, "the relay to retry")
            assert relay.is_alive(), "the relay must back off, not die"
            waiting = _outbox(runtime)
            assert sum('"action":"auth.login.succeeded"' in p for p in waiting) == 3
            assert sum('"action":"auth.login.failed"' in p for p in waiting) == 1
            with transaction(runtime.identity, write=False) as conn:
                status = pipeline_status(conn, None)
            assert status.outbox_depth == len(waiting)
            assert status.oldest_undelivered_age_s is not None
            assert stats.last_error
        finally:
            outage.end()
            try:
                # The same relay, still running, delivers everything once the DB is back.
                _wait(lambda: not _outbox(runtime), 20, "the relay to drain after the outage")
            finally:
                stop.set()
                relay.join(timeout=10)
    assert not relay.is_alive()

    waiting_ids = {p.split('"event_id":"', 1)[1][:36] for p in waiting}
    assert len(waiting_ids) == len(waiting)
    with transaction(runtime.audit, write=False) as conn:
        rows = conn.execute(
            select(audit_events.c.seq, audit_events.c.event_id).order_by(audit_events.c.seq)
        ).all()
        logins = search_events(conn, EventFilter(action="auth.login.succeeded")).events
        report = verify_chain(conn)
    stored = [r.event_id for r in rows]
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    assert len(stored) == len(set(stored))
    assert waiting_ids <= set(stored)
    # Exactly the waiting events were added: none lost, none twice.
    assert len(stored) == delivered_before + len(waiting_ids)
    assert len(logins) == 3
    assert report.intact, report.summary()
