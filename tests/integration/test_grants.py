"""Least-privilege accounts on the real MariaDB: what each may and may not do, and the whole
flow (HTTP, relay, checkpoints, verify) running with them."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from echo_auth.app import create_app
from echo_auth.audit.relay import drain
from echo_auth.audit.verify import verify_chain
from echo_auth.config import Settings
from echo_auth.db.engines import transaction
from echo_auth.identity.provisioning import create_user_by_operator
from echo_auth.runtime import Runtime, operator_actor
from tests.fixtures.app import PASSWORD
from tests.fixtures.db import Databases, MySQLServer, make_settings

pytestmark = pytest.mark.mysql


def _cli_env(settings: Settings) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "ECHO_DATA_DIR": str(settings.data_dir),
        "ECHO_IDENTITY_DB_URL": settings.identity_db_url,
        "ECHO_AUDIT_DB_URL": settings.audit_db_url,
    }


@pytest.fixture
def accounts(
    runtime: Runtime, databases: Databases, mysql_server: MySQLServer, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """`db grants --apply` with a throwaway prefix; the accounts are dropped afterwards."""
    prefix = f"t{secrets.token_hex(3)}"
    out = tmp_path / "accounts.env"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "echo_auth",
            "db",
            "grants",
            "--apply",
            "--prefix",
            prefix,
            "--out",
            str(out),
        ],
        env=_cli_env(runtime.settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        assert result.returncode == 0, result.stderr
        assert out.stat().st_mode & 0o777 == 0o600
        values: dict[str, str] = {}
        owner: dict[str, str] = {}
        for line in out.read_text().splitlines():
            if line.startswith("# ECHO_"):
                key, _, value = line[2:].partition("=")
                owner[key] = value
            elif line.startswith("ECHO_"):
                key, _, value = line.partition("=")
                values[key] = value
        values["OWNER_IDENTITY"] = owner["ECHO_IDENTITY_DB_URL"]
        values["OWNER_AUDIT"] = owner["ECHO_AUDIT_DB_URL"]
        yield values
    finally:
        with mysql_server.connect() as conn, conn.cursor() as cur:
            for role in ("app", "relay", "auditor", "owner"):
                cur.execute(f"DROP USER IF EXISTS '{prefix}_{role}'@'127.0.0.1'")


def _connect(url: str) -> pymysql.Connection:  # type: ignore[type-arg]
    u = make_url(url)
    return pymysql.connect(
        host=u.host,
        port=u.port or 3306,
        user=u.username,
        password=u.password or "",
        database=u.database,
        autocommit=True,
    )


def _refused(url: str, sql: str) -> str:
    with (
        _connect(url) as conn,
        conn.cursor() as cur,
        pytest.raises(pymysql.MySQLError) as caught,
    ):
        cur.execute(sql)
    return str(caught.value)


def test_grants_print_without_apply(runtime: Runtime) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "echo_auth", "db", "grants"],
        env=_cli_env(runtime.settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "GRANT SELECT, INSERT ON" in result.stdout and "<generated>" in result.stdout


def test_each_account_is_bounded(
    accounts: dict[str, str], databases: Databases, runtime: Runtime
) -> None:
    # Some history to protect (the grants command recorded its own event).
    assert drain(runtime.identity, runtime.audit, runtime.relay_policy) >= 1
    audit_db, identity_db = databases.audit_name, databases.identity_name
    app, relay = accounts["ECHO_IDENTITY_DB_URL"], accounts["ECHO_AUDIT_DB_URL"]
    auditor = accounts["ECHO_AUDIT_READ_DB_URL"]
    # The app cannot read or write any audit table.
    for sql in (
        f"SELECT * FROM `{audit_db}`.audit_events",
        f"INSERT INTO `{audit_db}`.checkpoints (seq) VALUES (1)",
        f"SELECT * FROM `{audit_db}`.chain_head",
    ):
        assert "denied" in _refused(app, sql)
    # ... nor take events out of the outbox.
    assert "denied" in _refused(app, f"DELETE FROM `{identity_db}`.audit_outbox")
    # The relay may append but never change or remove audit history.
    relay_audit = relay
    assert "denied" in _refused(relay_audit, f"UPDATE `{audit_db}`.audit_events SET action='x'")
    assert "denied" in _refused(relay_audit, f"DELETE FROM `{audit_db}`.audit_events")
    assert "denied" in _refused(relay_audit, f"DELETE FROM `{audit_db}`.checkpoints")
    assert "denied" in _refused(relay_audit, f"DROP TRIGGER `{audit_db}`.audit_events_no_update")
    # The auditor reads and nothing else.
    with _connect(auditor) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT COUNT(*) FROM `{audit_db}`.audit_events")
    assert "denied" in _refused(
        auditor, f"INSERT INTO `{audit_db}`.chain_head VALUES (2,0,'',NOW())"
    )
    assert "denied" in _refused(auditor, f"SELECT * FROM `{identity_db}`.users")
    # Even the owner meets the trigger.
    owner = accounts["OWNER_AUDIT"]
    assert "append-only" in _refused(owner, f"UPDATE `{audit_db}`.audit_events SET action='x'")
    assert "append-only" in _refused(owner, f"DELETE FROM `{audit_db}`.audit_events")


def test_whole_flow_runs_with_least_privilege(
    accounts: dict[str, str], databases: Databases, tmp_path: Path, runtime: Runtime
) -> None:
    settings = make_settings(
        runtime.settings.data_dir,
        databases,
        identity_db_url=accounts["ECHO_IDENTITY_DB_URL"],
        audit_db_url=accounts["ECHO_AUDIT_DB_URL"],
        relay_identity_db_url=accounts["ECHO_RELAY_IDENTITY_DB_URL"],
        audit_read_db_url=accounts["ECHO_AUDIT_READ_DB_URL"],
    )
    lp = Runtime(settings, pool_size=2)
    try:
        actor, source = operator_actor()
        create_user_by_operator(lp.auth, "boss@example.com", PASSWORD, ["admin"], actor, source)
        with TestClient(create_app(settings, runtime=lp)) as client:
            assert client.get("/readyz").status_code == 200
            assert (
                client.post(
                    "/v1/signup", json={"email": "ana@example.com", "password": PASSWORD}
                ).status_code
                == 201
            )
            login = client.post(
                "/v1/login", json={"email": "ana@example.com", "password": PASSWORD}
            )
            assert login.status_code == 200
            token = login.json()["session_token"]
            assert (
                client.get("/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code
                == 200
            )
            assert (
                client.post("/v1/logout", headers={"Authorization": f"Bearer {token}"}).status_code
                == 204
            )
            assert drain(lp.relay_identity, lp.audit, lp.relay_policy) >= 4
            assert lp.checkpointer.maybe_checkpoint(force=True) is not None
            admin = client.post(
                "/v1/login", json={"email": "boss@example.com", "password": PASSWORD}
            ).json()["session_token"]
            auth = {"Authorization": f"Bearer {admin}"}
            found = client.get("/v1/audit/events?action=auth.login.succeeded", headers=auth)
            assert found.status_code == 200 and found.json()["events"]
            assert client.get("/v1/audit/pipeline", headers=auth).json()["dead_letters"] == 0
            verified = client.get("/v1/audit/verify", headers=auth).json()
            assert verified["intact"], verified
        with transaction(lp.audit_reader, write=False) as conn:
            report = verify_chain(
                conn, public_key=lp.checkpoint_public_key, external=lp.checkpoint_sink.read_all()
            )
        assert report.intact and report.checkpoints_valid >= 2
    finally:
        lp.close()
