"""Liveness, readiness, metrics, structured logs and the production guard."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from echo_auth.app import create_app
from echo_auth.config import ConfigurationError, Settings
from echo_auth.observability import JsonFormatter, mask_secrets, request_id_var
from echo_auth.runtime import Runtime
from tests.fixtures.app import PASSWORD, deliver
from tests.fixtures.db import Databases, make_settings
from tests.fixtures.proxy import TcpProxy


def _metric(text: str, name: str, labels: str = "") -> float | None:
    prefix = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_follow_the_pipeline(client: TestClient, runtime: Runtime) -> None:
    before = client.get("/metrics").text
    assert _metric(before, "echo_outbox_depth") is not None
    client.post("/v1/signup", json={"email": "m@example.com", "password": PASSWORD})
    client.post("/v1/login", json={"email": "m@example.com", "password": PASSWORD})
    client.post("/v1/login", json={"email": "m@example.com", "password": "wrong password"})
    during = client.get("/metrics").text
    depth = _metric(during, "echo_outbox_depth")
    assert depth is not None and depth >= 3
    assert (_metric(during, "echo_outbox_oldest_age_seconds") or 0) >= 0
    assert _metric(during, "echo_logins_total", 'outcome="success",step="password"') == 1
    assert (
        _metric(during, "echo_logins_total", 'outcome="invalid_credentials",step="password"') == 1
    )
    assert (
        _metric(during, "echo_http_requests_total", 'method="POST",route="/v1/signup",status="201"')
        == 1
    )
    head_before = _metric(during, "echo_chain_head_seq") or 0
    deliver(runtime)
    runtime.checkpointer.maybe_checkpoint(force=True)
    after = client.get("/metrics").text
    assert _metric(after, "echo_outbox_depth") == 0
    assert (_metric(after, "echo_chain_head_seq") or 0) >= head_before + depth
    age = _metric(after, "echo_last_checkpoint_age_seconds")
    assert age is not None and age < 60


def test_readyz_needs_migrations(tmp_path: Path, databases: Databases) -> None:
    settings = make_settings(tmp_path / "var", databases)
    runtime = Runtime(settings, pool_size=2)  # never migrated
    try:
        with TestClient(create_app(settings, runtime=runtime)) as client:
            assert client.get("/healthz").status_code == 200
            r = client.get("/readyz")
            assert r.status_code == 503 and "migrations pending" in r.text
            runtime.upgrade_databases()
            assert client.get("/readyz").status_code == 200
    finally:
        runtime.close()


@pytest.fixture
def proxied(
    tmp_path: Path, databases: Databases, runtime: Runtime
) -> Iterator[tuple[Runtime, TcpProxy]]:
    """A runtime whose identity and audit connections go through a TCP proxy we can cut."""
    real = make_url(databases.identity_url)
    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 3306).open()

    def through(url: str) -> str:
        return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(False)

    settings = make_settings(
        runtime.settings.data_dir,
        databases,
        identity_db_url=through(databases.identity_url),
        audit_db_url=through(databases.audit_url),
    )
    cut_runtime = Runtime(settings, pool_size=2)
    try:
        yield cut_runtime, proxy
    finally:
        cut_runtime.close()
        proxy.close()


@pytest.mark.mysql
def test_readiness_and_fast_503_while_mysql_is_unreachable(
    proxied: tuple[Runtime, TcpProxy],
) -> None:
    runtime, proxy = proxied
    with TestClient(create_app(runtime.settings, runtime=runtime)) as client:
        assert (
            client.post(
                "/v1/signup", json={"email": "r@example.com", "password": PASSWORD}
            ).status_code
            == 201
        )
        assert client.get("/readyz").status_code == 200
        proxy.close()
        started = time.monotonic()
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["code"] == "not_ready"
        login = client.post("/v1/login", json={"email": "r@example.com", "password": PASSWORD})
        assert login.status_code == 503, login.text
        assert login.json()["code"] == "service_unavailable"
        assert login.headers["content-type"] == "application/problem+json"
        assert time.monotonic() - started < 10  # fails fast, no hang
        proxy.open()
        deadline = time.monotonic() + 5
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "not ready 5 s after the database came back"
            time.sleep(0.2)
        assert (
            client.post(
                "/v1/login", json={"email": "r@example.com", "password": PASSWORD}
            ).status_code
            == 200
        )


def test_production_refuses_the_embedded_default(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, env="production", data_dir=tmp_path)  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match="production"):
        settings.check_for_serving()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "ECHO_ENV": "production",
        "ECHO_DATA_DIR": str(tmp_path / "var"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "echo_auth", "serve", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "production" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_json_logs_carry_the_request_id_and_no_secret() -> None:
    token = request_id_var.set("req-123")
    try:
        record = logging.LogRecord(
            "echo_auth.web",
            logging.WARNING,
            __file__,
            1,
            'login for %s with {"password": "hunter2hunter2"} and Bearer abcdefghijklmnop',
            ("ana@example.com",),
            None,
        )
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["request_id"] == "req-123" and line["level"] == "warning"
    assert "hunter2hunter2" not in line["message"] and "abcdefghijklmnop" not in line["message"]
    assert (
        mask_secrets("Cookie: echo_session=abc.def; other=1") == "Cookie: echo_session=***; other=1"
    )
