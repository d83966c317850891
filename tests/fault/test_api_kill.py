"""The API server SIGKILLed under concurrent load, then restarted: nothing acknowledged lost.

``echo-auth serve --no-relay`` runs as a real process on MariaDB while threads send
sign-ups, logins and wrong passwords, each with its own ``X-Request-ID``. The server is
killed with SIGKILL at random moments (twice, each after a random number of answers)
and started again on the same port; the load goes on through the kills, so requests are
cut off mid-flight and others are refused while no server listens.

Then a relay drains the outbox. Every request that got an answer promising an event (201
sign-up, 200 login, 401 wrong password, 429 throttled) must have that event in the audit
log exactly once, found by its request id. Requests cut off by a kill got no answer and
promise nothing; nothing acknowledged may be missing.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from echo_auth.audit.events import Actor, Source
from echo_auth.audit.relay import drain
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

KILLS = 2


@pytest.mark.mysql
@pytest.mark.slow
def test_api_killed_under_load_loses_no_acknowledged_event(
    runtime: Runtime, tmp_path: Path
) -> None:
    settings = runtime.settings
    emails = [f"user{i}@example.com" for i in range(10)]
    for email in emails:
        create_user_by_operator(
            runtime.auth, email, PASSWORD, [], Actor("admin", "test", "test"), Source()
        )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = echo_env(settings.data_dir, settings.identity_db_url, settings.audit_db_url)
    api = EchoProcess(
        "serve", ["serve", "--no-relay", "--port", str(port)], env, tmp_path, tmp_path
    )
    load = Workload(
        [base],
        emails,
        prefix="kill",
        mix={"login": 3, "wrong_password": 2, "signup": 2},
        threads=6,
    )
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    kills: list[tuple[int, int]] = []  # (answers since the start, answers so far)
    try:
        api.start().wait_http(base)
        load.start()
        for _ in range(KILLS):
            served = len(load.answers)
            target = served + rng.randint(30, 150)  # answers before the kill
            wait_for(lambda: len(load.answers) >= target, 60, "load to reach the server")  # noqa: B023
            time.sleep(rng.uniform(0, 0.1))  # anywhere inside a request
            assert api.kill() == -signal.SIGKILL
            kills.append((target - served, len(load.answers)))
            api.start().wait_http(base)  # the load keeps knocking while it starts
        restarted = time.monotonic()
        time.sleep(1.0)
        load.stop()
        assert api.stop() == 0, api.log()
    finally:
        load.stop()
        api.stop()

    drain(runtime.identity, runtime.audit, runtime.relay_policy)  # a relay drains
    assert outbox_depth(runtime.identity) == 0
    assert count_rows(runtime.identity, audit_dead_letters) == 0
    answers = list(load.answers)
    context = f"seed {seed}, kills (answers since start, in all) {kills}"
    cut = [a for a in answers if a.status == 0]
    assert cut, f"no request was cut off or refused by the kills: {context}"
    assert not [a for a in answers if a.status >= 500], context
    assert all(a.echoed_id for a in answers if a.status)
    acknowledged = {(a.op, a.status) for a in answers if a.action is not None}
    assert {("signup", 201), ("login", 200), ("wrong_password", 401)} <= acknowledged, context
    assert [a for a in answers if a.action and a.started > restarted], "none after restart"
    rows = check_chain(runtime.audit)
    checked = check_acknowledged(answers, rows)
    print(
        f"{context}: {len(answers)} requests, {checked} acknowledged with their event, "
        f"{len(cut)} cut off or refused; {len(rows)} events in the chain"
    )
