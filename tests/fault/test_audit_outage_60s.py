"""The audit database alone unreachable for 60 seconds under continuous load (MariaDB).

The long version of test_audit_db_unreachable.py (which takes the audit database away
for a few requests, in-process): here ``echo-auth serve`` runs as a real process, relay
in-process, and its audit URL goes through a TCP proxy (tests/fixtures/proxy.py). Closing
the proxy drops every open audit connection and refuses new ones, as a server that went
down would; the identity database stays. Threads log in (good and wrong passwords) and
read ``/v1/me`` the whole time.

For 60 seconds: logins keep working in every 10-second slice (counted), nothing answers
5xx, and the outbox grows (``echo_outbox_depth`` on ``/metrics`` rises, as an operator
sees it). Then the proxy opens again: the same relay drains the outbox completely, every
event that waited is in the chain exactly once, every acknowledged request has its
event, ``seq`` is gapless and the chain verifies.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx2
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from echo_auth.audit.events import Actor, Source
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import audit_dead_letters, audit_outbox
from echo_auth.identity.provisioning import create_user_by_operator
from echo_auth.runtime import Runtime
from tests.fixtures.app import PASSWORD
from tests.fixtures.db import Databases
from tests.fixtures.proxy import TcpProxy
from tests.fixtures.services import (
    EchoProcess,
    Workload,
    check_acknowledged,
    check_chain,
    count_rows,
    echo_env,
    free_port,
    outbox_depth,
    wait_for,
)

OUTAGE_S = 60  # the number
SLICE_S = 10  # logins must succeed in every slice of the outage this long


def _depth(http: httpx2.Client) -> float:
    """``echo_outbox_depth`` from ``/metrics``, as a monitoring system reads it."""
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("echo_outbox_depth "):
            return float(line.split()[1])
    raise AssertionError("no echo_outbox_depth in /metrics")


@pytest.mark.mysql
@pytest.mark.slow
def test_audit_db_unreachable_for_60_seconds(
    runtime: Runtime, databases: Databases, tmp_path: Path
) -> None:
    real = make_url(databases.audit_url)
    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 3306).open()
    audit_url = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    emails = [f"user{i}@example.com" for i in range(6)]
    for email in emails:
        create_user_by_operator(
            runtime.auth, email, PASSWORD, [], Actor("admin", "test", "test"), Source()
        )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = echo_env(runtime.settings.data_dir, databases.identity_url, audit_url)
    api = EchoProcess("serve", ["serve", "--port", str(port)], env, tmp_path, tmp_path)
    load = Workload(
        [base],
        emails,
        prefix="audit-down",
        mix={"login": 3, "wrong_password": 1, "me": 2},
        threads=3,
        pause_s=0.01,
    )
    http = httpx2.Client(base_url=base, timeout=30)
    try:
        api.start().wait_http(base)
        load.start()
        wait_for(lambda: len(load.acknowledged()) >= 20, 30, "load before the outage")
        wait_for(lambda: outbox_depth(runtime.identity) < 50, 30, "the relay to keep up")

        proxy.close()  # the audit database is gone
        down = time.monotonic()
        depths: list[float] = []
        while time.monotonic() < down + OUTAGE_S:
            depths.append(_depth(http))
            time.sleep(2)
        # Requests answered before this moment have their events committed in the outbox;
        # ones still in flight (one per load thread) may commit after the snapshot.
        snapshot_at = time.monotonic()
        with transaction(runtime.identity, write=False) as conn:
            waiting = set(conn.execute(select(audit_outbox.c.event_id)).scalars())
        proxy.open()  # and back

        drained_in = wait_for(lambda: _depth(http) == 0, 60, "the outbox to drain", 0.2)
        time.sleep(1)
        load.stop()
        wait_for(lambda: outbox_depth(runtime.identity) == 0, 30, "the last events to drain")
        assert api.stop() == 0, api.log()
        assert "Traceback" not in api.all_logs(), api.all_logs()[-3000:]
    finally:
        load.stop()
        api.stop()
        http.close()
        proxy.close()

    answers = list(load.answers)
    assert not [a for a in answers if a.status == 0 or a.status >= 500], "errors while down"
    logins_ok = [a.started for a in answers if a.op == "login" and a.status == 200]
    slices = [
        sum(1 for t in logins_ok if down + i <= t < down + i + SLICE_S)
        for i in range(0, OUTAGE_S, SLICE_S)
    ]
    assert all(n > 0 for n in slices), f"logins per {SLICE_S}s slice of the outage: {slices}"
    during = [a for a in answers if down <= a.started and a.started + a.elapsed < snapshot_at]
    recorded_during = sum(1 for a in during if a.action is not None)
    # The outbox grew through the outage, and nothing left it (not even as a dead letter);
    # at its end it held at least one event per recorded request.
    assert depths == sorted(depths) and depths[-1] > depths[0], depths
    assert len(waiting) >= recorded_during > 100, (len(waiting), recorded_during)

    rows = check_chain(runtime.audit)
    stored = {r.event_id for r in rows}
    assert waiting <= stored, f"{len(waiting - stored)} events that waited are missing"
    check_acknowledged(answers, rows)
    assert count_rows(runtime.identity, audit_outbox) == 0
    assert count_rows(runtime.identity, audit_dead_letters) == 0
    print(
        f"audit down {OUTAGE_S}s: logins per {SLICE_S}s {slices}; outbox depth "
        f"{depths[0]:.0f} -> {depths[-1]:.0f}; {len(waiting)} waiting events drained in "
        f"{drained_in:.1f}s, each once; {len(rows)} events in the chain"
    )
