"""Two API processes and two relay processes at once, for two minutes of mixed load.

``echo-auth serve --no-relay`` twice (two ports) and ``echo-auth relay`` twice, all on the
same MariaDB databases, as a scaled-out installation runs. Threads spread a mixed
workload over both APIs: sign-ups, logins, wrong passwords, ``/v1/me``, logouts and
admin reads (user list and user detail), each request with its own ``X-Request-ID``.
The two relays drain the one outbox at the same time (SKIP LOCKED claims, the chain-head
lock serialising appends).

After two minutes the load stops, the relays empty the outbox and every process stops
cleanly. Nothing lost or duplicated: every acknowledged request has its event exactly
once, ``seq`` is gapless, event ids are unique, the chain verifies, no dead letter, the
outbox is empty, both APIs acknowledged every kind of request, and both relays ran to
the end (each stops on SIGTERM with exit 0).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from echo_auth.audit.events import Actor, Source
from echo_auth.db.identity_schema import audit_dead_letters
from echo_auth.identity.provisioning import create_user_by_operator
from echo_auth.runtime import Runtime
from tests.fixtures.app import PASSWORD
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

DURATION_S = 120  # the number
MIX = {
    "signup": 1,
    "login": 3,
    "wrong_password": 1,
    "me": 4,
    "logout": 1,
    "admin_list": 1,
    "admin_view": 1,
}


@pytest.mark.mysql
@pytest.mark.slow
def test_two_apis_and_two_relays_lose_and_duplicate_nothing(
    runtime: Runtime, tmp_path: Path
) -> None:
    settings = runtime.settings
    runtime.checkpoint_key  # noqa: B018 - made now: both relays sign with this one key
    operator = Actor("admin", "test", "test")
    admin = "admin@example.com"
    create_user_by_operator(runtime.auth, admin, PASSWORD, ["admin"], operator, Source())
    emails = [f"user{i}@example.com" for i in range(12)]
    for email in emails:
        create_user_by_operator(runtime.auth, email, PASSWORD, [], operator, Source())
    env = echo_env(
        settings.data_dir,
        settings.identity_db_url,
        settings.audit_db_url,
        ECHO_RELAY_BATCH_SIZE="50",  # small batches: the two relays take turns often
    )
    ports = [free_port(), free_port()]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    apis = [
        EchoProcess(
            f"api{n}", ["serve", "--no-relay", "--port", str(port)], env, tmp_path, tmp_path
        )
        for n, port in enumerate(ports, 1)
    ]
    relays = [EchoProcess(f"relay{n}", ["relay"], env, tmp_path, tmp_path) for n in (1, 2)]
    load = Workload(bases, emails, prefix="duo", mix=MIX, threads=6, admin_email=admin)
    try:
        for process in (*apis, *relays):
            process.start()
        for api, base in zip(apis, bases, strict=True):
            api.wait_http(base)
        load.start()
        time.sleep(DURATION_S)
        load.stop()
        wait_for(lambda: outbox_depth(runtime.identity) == 0, 60, "the relays to drain", 0.2)
        for process in (*apis, *relays):
            assert process.stop() == 0, f"{process.name}:\n{process.log()}"
        logs = "".join(p.all_logs() for p in (*apis, *relays))
        assert "Traceback" not in logs, logs[-3000:]
    finally:
        load.stop()
        for process in (*apis, *relays):
            process.stop()

    answers = list(load.answers)
    assert not [a for a in answers if a.status == 0 or a.status >= 500], "errors under load"
    assert all(a.echoed_id for a in answers)
    served = {(a.base_url, a.op) for a in answers if a.action is not None}
    for base in bases:
        for op in ("signup", "login", "wrong_password", "logout", "admin_list", "admin_view"):
            assert (base, op) in served, f"{base} never acknowledged a {op}"
    rows = check_chain(runtime.audit)
    checked = check_acknowledged(answers, rows)
    assert outbox_depth(runtime.identity) == 0
    assert count_rows(runtime.identity, audit_dead_letters) == 0
    print(
        f"{DURATION_S}s, 2 APIs + 2 relays: {len(answers)} requests, {checked} acknowledged "
        f"with their event exactly once; {len(rows)} events in the chain"
    )
