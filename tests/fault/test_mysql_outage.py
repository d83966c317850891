"""MariaDB stopped for real for 30 seconds under load, then started again.

The test starts a PRIVATE MariaDB server (tests/fixtures/mariadb.py; the suite's shared
server is never touched) and ``echo-auth serve --workers 1`` on it, relay in-process, as
an operator would. Threads send logins, wrong passwords, sign-ups and ``/v1/me`` the whole
time. Then ``mariadbd`` is shut down (SIGTERM, and the process is gone: connections
dropped, new ones refused) for 30 seconds, and started again on the same port.

The promises, each checked:

* while the database is down, every request that needs it fails fast (each answer within
  a few seconds, no hang) with 503 ``service_unavailable`` problem+json; never a 500,
  never a dropped connection, and no traceback in the server's output;
* ``/healthz`` stays 200 and ``/readyz`` answers 503 ``not_ready`` throughout;
* within 5 seconds of the database's return, everything serves again (readiness, login,
  ``/v1/me``, sign-up), and from then on the load sees no 503;
* once the in-process relay has drained, every acknowledged request (2xx that records an
  event, 401) has its event in the audit log exactly once, and the chain verifies.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from echo_auth.audit.events import Actor, Source
from echo_auth.identity.provisioning import create_user_by_operator
from echo_auth.runtime import Runtime
from tests.fixtures.app import PASSWORD
from tests.fixtures.db import Databases, make_settings
from tests.fixtures.mariadb import ThrowawayMariaDB
from tests.fixtures.services import (
    EchoProcess,
    Workload,
    check_acknowledged,
    check_chain,
    echo_env,
    free_port,
    outbox_depth,
    wait_for,
)

OUTAGE_S = 30  # the number
BACK_WITHIN_S = 5  # everything serves again this soon after the database answers
FAST_S = 5  # "fails fast": every answer, during the outage too, within this
PROBLEM_JSON = "application/problem+json"


@pytest.fixture
def private_server() -> Iterator[ThrowawayMariaDB]:
    """Being made in the background while the test sets up (``.server()`` waits)."""
    server = ThrowawayMariaDB().begin()
    try:
        yield server
    finally:
        server.stop()


def _probe(http: httpx2.Client, path: str) -> tuple[int, float, str | None]:
    started = time.monotonic()
    r = http.get(path)
    code = r.json().get("code") if r.status_code >= 400 else None
    return r.status_code, time.monotonic() - started, code


@pytest.mark.mysql
@pytest.mark.slow
def test_mysql_stopped_for_30_seconds_under_load(
    private_server: ThrowawayMariaDB, tmp_path: Path
) -> None:
    server = private_server.server()
    for name in ("echo_identity", "echo_audit"):
        server.create_database(name)
    dbs = Databases("mysql", server.url("echo_identity"), server.url("echo_audit"))
    runtime = Runtime(make_settings(tmp_path / "var", dbs), pool_size=2)
    api: EchoProcess | None = None
    load: Workload | None = None
    http = httpx2.Client(timeout=30)
    try:
        runtime.upgrade_databases()
        emails = [f"user{i}@example.com" for i in range(8)]
        operator = Actor("admin", "test", "test")
        for email in emails:
            create_user_by_operator(runtime.auth, email, PASSWORD, [], operator, Source())
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = echo_env(runtime.settings.data_dir, dbs.identity_url, dbs.audit_url)
        api = EchoProcess(
            "serve", ["serve", "--workers", "1", "--port", str(port)], env, tmp_path, tmp_path
        ).start()
        api.wait_http(base)
        http.base_url = httpx2.URL(base)
        assert http.get("/readyz").status_code == 200

        # A short pause per request: during the outage the 503s come back at once, and
        # the point is their shape and speed, not their number.
        load = Workload([base], emails, prefix="outage", threads=4, pause_s=0.02).start()
        before = load
        wait_for(lambda: len(before.acknowledged()) >= 40, 30, "load before the outage")

        # -- the database goes away, for real -----------------------------------------------
        stopping = time.monotonic()
        private_server.shutdown()
        down = time.monotonic()
        probes: list[tuple[str, int, float, str | None]] = []
        while time.monotonic() < down + OUTAGE_S:
            for path in ("/healthz", "/readyz"):
                probes.append((path, *_probe(http, path)))
            time.sleep(0.5)
        # -- and comes back ------------------------------------------------------------------
        restarting = time.monotonic()
        private_server.restart()
        back = time.monotonic()  # it answers
        runtime.identity.dispose()  # the test's own pooled connections died with it
        runtime.audit.dispose()
        token = ""

        def everything_serves() -> bool:
            nonlocal token
            if http.get("/readyz").status_code != 200:
                return False
            r = http.post("/v1/login", json={"email": emails[0], "password": PASSWORD})
            if r.status_code != 200:
                return False
            token = r.json()["session_token"]
            me = http.get("/v1/me", headers={"authorization": f"Bearer {token}"})
            signup = http.post(
                "/v1/signup", json={"email": "after@example.com", "password": PASSWORD}
            )
            return me.status_code == 200 and signup.status_code == 201

        recovered_in = wait_for(everything_serves, BACK_WITHIN_S, "service after the restart")
        recovered = time.monotonic()
        time.sleep(2)  # the load runs on the restored database for a while
        load.stop()

        wait_for(lambda: outbox_depth(runtime.identity) == 0, 30, "the relay to drain")
        assert api.stop() == 0, api.log()
        output = api.all_logs()
        rows = check_chain(runtime.audit)
    finally:
        if load is not None:
            load.stop()
        if api is not None:
            api.stop()
        http.close()
        runtime.close()

    answers = list(load.answers)
    during = [a for a in answers if a.started >= down and a.started + a.elapsed < restarting]
    after = [a for a in answers if a.started >= recovered]
    # Fail fast: every answer within a few seconds, the outage's 503s included; none lost.
    slowest = max(answers, key=lambda a: a.elapsed)
    assert slowest.elapsed < FAST_S, f"a request hung for {slowest.elapsed:.1f}s: {slowest}"
    dropped = [a for a in answers if a.status == 0]
    assert not dropped, (
        f"connections dropped (outage {down}..{restarting}): {dropped[:3]}\n{output}"
    )
    assert not [a for a in answers if a.status >= 500 and a.status != 503], "a 5xx not 503"
    assert all(a.echoed_id for a in answers)
    # While the database is down every request needs it, and gets a clean 503.
    assert len(during) >= 100, f"the load barely ran during the outage: {len(during)}"
    wrong = [
        a
        for a in during
        if (a.status, a.code, a.content_type) != (503, "service_unavailable", PROBLEM_JSON)
    ]
    assert not wrong, f"{len(wrong)} not a 503 problem during the outage: {wrong[:3]}"
    assert not [a for a in answers if a.status == 503 and a.code != "service_unavailable"]
    # Liveness never wavered; readiness said the truth, quickly.
    assert {(s, c) for p, s, _, c in probes if p == "/healthz"} == {(200, None)}
    assert {(s, c) for p, s, _, c in probes if p == "/readyz"} == {(503, "not_ready")}
    assert max(t for _, _, t, _ in probes) < FAST_S, probes
    # Back within 5 seconds, and from then on no 503 at all.
    assert recovered_in < BACK_WITHIN_S
    assert after and not [a for a in after if a.status == 503], "503s after the recovery"
    assert {a.status for a in after} >= {200, 401}
    # No traceback: database errors are expected here and must be handled.
    assert "Traceback" not in output, output[-3000:]
    # Nothing acknowledged is missing.
    with_events = check_acknowledged(answers, rows)
    assert with_events >= 40, with_events
    print(
        f"outage {OUTAGE_S}s (shutdown {down - stopping:.1f}s, restart {back - restarting:.1f}s): "
        f"{len(during)} answers "
        f"during it, all 503 in <= {max((a.elapsed for a in during), default=0):.2f}s; "
        f"serving again {recovered_in:.2f}s after the restart; {with_events} acknowledged "
        f"events of {len(rows)} in the log"
    )
