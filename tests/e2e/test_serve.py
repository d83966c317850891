"""``echo-auth serve`` as an operator starts it: a real process on a real port.

On fresh, migrated SQLite files it prints a one-time setup token; that token creates the
first admin (roles admin and auditor) exactly once; the in-process relay moves the
events into the audit log; SIGTERM stops the process cleanly.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.fixtures.app import PASSWORD

STARTUP_TIMEOUT_S = 30
TOKEN = re.compile(r'"token":\s*"([A-Za-z0-9_-]{20,})"')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Output:
    """Collects a pipe's lines in a thread so the child never blocks on a full pipe."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def join(self) -> None:
        self._thread.join(timeout=5)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_")}
    return {
        **base,
        "ECHO_DATA_DIR": str(tmp_path / "var"),
        "ECHO_ARGON2_TIME_COST": "1",
        "ECHO_ARGON2_MEMORY_KIB": "1024",
        "ECHO_ARGON2_PARALLELISM": "1",
        "ECHO_RELAY_IDLE_SLEEP_S": "0.05",
    }


@pytest.fixture
def server(
    tmp_path: Path, env: dict[str, str]
) -> Iterator[tuple[subprocess.Popen[str], Output, str]]:
    upgraded = subprocess.run(
        [sys.executable, "-m", "echo_auth", "db", "upgrade"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert upgraded.returncode == 0, upgraded.stderr
    assert (tmp_path / "var" / "identity.db").exists() and (tmp_path / "var" / "audit.db").exists()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "echo_auth", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None and proc.stdout is not None
    stderr, stdout = Output(proc.stderr), Output(proc.stdout)
    try:
        yield proc, stderr, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        stderr.join()
        stdout.join()
        proc.stderr.close()
        proc.stdout.close()


@pytest.mark.slow
def test_serve_first_admin_relay_and_clean_shutdown(
    server: tuple[subprocess.Popen[str], Output, str],
) -> None:
    proc, stderr, base = server
    with httpx2.Client(base_url=base, timeout=5) as http:

        def healthy() -> bool:
            assert proc.poll() is None, f"serve exited early:\n{stderr.text()}"
            try:
                return http.get("/healthz").status_code == 200
            except httpx2.TransportError:
                return False

        wait_for(healthy, STARTUP_TIMEOUT_S, "/healthz")
        assert http.get("/readyz").status_code == 200

        # The one-time token is on stderr, in the printed curl command.
        tokens = TOKEN.findall(stderr.text())
        assert len(tokens) == 1, stderr.text()
        token = tokens[0]
        assert f"{base}/setup?token={token}" in stderr.text()  # and as a link to the page
        setup = {"token": token, "email": "First@Example.com", "password": PASSWORD}
        r = http.post("/v1/setup", json=setup)
        assert r.status_code == 201, r.text
        first = r.json()
        assert first["email"] == "first@example.com"
        assert {"admin", "auditor"} <= set(first["roles"])
        assert first["email_verified"] is True

        # Used once, never again (not even for another address).
        for again in (setup, {**setup, "email": "second@example.com"}):
            r = http.post("/v1/setup", json=again)
            assert r.status_code == 400, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] == "invalid_token"
        r = http.post("/v1/login", json={"email": "second@example.com", "password": PASSWORD})
        assert r.status_code == 401

        r = http.post("/v1/login", json={"email": "first@example.com", "password": PASSWORD})
        assert r.status_code == 200, r.text
        assert set(r.json()["user"]["roles"]) == {"admin", "auditor", "user"}
        admin = {"Authorization": f"Bearer {r.json()['session_token']}"}
        http.cookies.clear()

        # The in-process relay drains the outbox into the chain.
        seen: dict[str, Any] = {}

        def drained() -> bool:
            r = http.get("/v1/audit/pipeline", headers=admin)
            assert r.status_code == 200, r.text
            seen.update(r.json())
            return seen["outbox_depth"] == 0 and (seen["delivered"] or 0) > 0

        wait_for(drained, 10, "the relay to drain the outbox")
        assert seen["dead_letters"] == 0 and seen["audit_db_reachable"] is True

        r = http.get("/v1/audit/events", params={"limit": 500}, headers=admin)
        assert r.status_code == 200, r.text
        actions = {e["action"] for e in r.json()["events"]}
        assert {
            "system.started",
            "admin.bootstrap.token_issued",
            "user.signed_up",
            "auth.login.succeeded",
        } <= actions
        [created] = [e for e in r.json()["events"] if e["action"] == "user.signed_up"]
        assert created["metadata"]["via"] == "bootstrap" and created["target"]["id"] == first["id"]

    # SIGTERM: uvicorn shuts down gracefully (the lifespan stops the relay thread) and the
    # process is gone within 10 s, without a traceback.
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=10)
    assert time.monotonic() - started < 10
    assert "Traceback" not in stderr.text(), stderr.text()
    with pytest.raises(httpx2.TransportError):
        httpx2.get(f"{base}/healthz", timeout=2)
    assert code == 0, stderr.text()
