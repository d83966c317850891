"""The real ``echo-auth`` console script, run as a subprocess against the real databases.

What an operator relies on: ``db upgrade`` builds fresh databases; ``user create`` reads
the password from stdin and makes an account that can log in over HTTP; mistakes exit 2
with one line on stderr and no traceback; ``relay --once`` delivers; ``audit search``,
``audit pipeline`` and ``audit verify`` report (verify exits 1 naming the tampered seq);
and every such command is itself an audit event by an ``admin`` actor ``<osuser>@<host>``.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select, text, update

from echo_auth.app import create_app
from echo_auth.audit.search import EventFilter, search_events
from echo_auth.config import Settings
from echo_auth.db import migrate
from echo_auth.db.audit_schema import audit_events
from echo_auth.db.engines import transaction
from echo_auth.runtime import Runtime
from tests.fixtures.app import PASSWORD, deliver

TIMEOUT_S = 60
BASE_URL = "http://127.0.0.1:8000"
CHEAP_ARGON2 = {
    "ECHO_ARGON2_TIME_COST": "1",
    "ECHO_ARGON2_MEMORY_KIB": "1024",
    "ECHO_ARGON2_PARALLELISM": "1",
}


@dataclass(frozen=True)
class Done:
    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"echo-auth {' '.join(self.args)} -> {self.code}\n{self.stdout}\n{self.stderr}"


@dataclass(frozen=True)
class Call:
    args: Sequence[str]
    stdin: str = ""
    env: dict[str, str] | None = None


class EchoCli:
    """Runs ``python -m echo_auth`` with a clean ``ECHO_*`` environment and piped stdin."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        base = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_")}
        self.env = {**base, **CHEAP_ARGON2, **env}

    def _start(self, call: Call) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "echo_auth", *call.args],
            cwd=self.cwd,  # no stray .env file is read
            env={**self.env, **(call.env or {})},
            stdin=subprocess.PIPE,  # never a tty
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run_all(self, *calls: Call) -> list[Done]:
        """Run the calls at the same time (they must not depend on each other)."""
        procs = [(call, self._start(call)) for call in calls]
        done = []
        for call, proc in procs:
            out, err = proc.communicate(call.stdin, timeout=TIMEOUT_S)
            done.append(Done(tuple(call.args), proc.returncode, out, err))
        return done

    def run(self, *args: str, stdin: str = "", env: dict[str, str] | None = None) -> Done:
        [result] = self.run_all(Call(args, stdin, env))
        return result


def cli_for(settings: Settings, cwd: Path) -> EchoCli:
    return EchoCli(
        cwd,
        {
            "ECHO_ENV": "test",
            "ECHO_DATA_DIR": str(settings.data_dir),
            "ECHO_IDENTITY_DB_URL": settings.identity_db_url,
            "ECHO_AUDIT_DB_URL": settings.audit_db_url,
        },
    )


def ok(result: Done) -> Done:
    assert result.code == 0, str(result)
    assert "Traceback" not in result.stderr, str(result)
    return result


def one_line_error(result: Done, code: int = 2) -> str:
    """Exit ``code`` with exactly one line on stderr, no traceback, nothing on stdout."""
    assert result.code == code, str(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, str(result)
    assert lines[0].startswith("echo-auth: "), str(result)
    assert "Traceback" not in result.stderr
    assert result.stdout == "", str(result)
    return lines[0]


def delivered(result: Done) -> int:
    """The count ``relay --once`` reports."""
    found = re.match(r"delivered (\d+) events\b", ok(result).stdout)
    assert found, str(result)
    return int(found.group(1))


def operator_id() -> str:
    """Computed here, independently of the code under test."""
    return f"{getpass.getuser()}@{socket.gethostname()}"[:64]


def all_events(runtime: Runtime) -> list[dict[str, Any]]:
    with transaction(runtime.audit, write=False) as conn:
        return search_events(conn, EventFilter(), limit=500).events


def test_operator_flow_on_fresh_databases(settings: Settings, tmp_path: Path) -> None:
    cli = cli_for(settings, tmp_path)
    runtime = Runtime(settings, pool_size=2)  # not migrated: the CLI does that
    try:
        _operator_flow(cli, runtime)
    finally:
        runtime.close()


def _operator_flow(cli: EchoCli, runtime: Runtime) -> None:
    # -- db upgrade on empty databases.
    out = ok(cli.run("db", "upgrade")).stdout
    assert "identity database at" in out and "audit database at" in out
    assert migrate.is_at_head(runtime.identity, "identity")
    assert migrate.is_at_head(runtime.audit, "audit")

    # -- user create, the password on stdin (not a tty).
    out = ok(
        cli.run(
            "user",
            "create",
            "--email",
            "Root@Example.com",
            "--role",
            "admin",
            stdin=PASSWORD + "\n",
        )
    ).stdout
    assert "root@example.com" in out

    # Deliver in-process for now; the relay command itself is run below.
    assert deliver(runtime) == 2  # system.db.upgraded and user.signed_up

    # -- the account works over HTTP, with the password exactly as given on stdin.
    client = TestClient(create_app(runtime.settings, runtime=runtime), base_url=BASE_URL)
    r = client.post("/v1/login", json={"email": "root@example.com", "password": PASSWORD})
    assert r.status_code == 200, r.text
    assert r.json()["user"]["roles"] == ["admin", "user"]
    assert r.json()["user"]["email_verified"] is True
    login_user_id = r.json()["user"]["id"]
    client.close()

    # -- a duplicate address, and the reading commands, all at once.
    duplicate, searched, piped, verified = cli.run_all(
        Call(["user", "create", "--email", "ROOT@example.com"], stdin="another long password\n"),
        Call(["audit", "search", "--json"]),
        Call(["audit", "pipeline"]),
        Call(["audit", "verify"]),
    )
    assert "exists" in one_line_error(duplicate)
    printed = [json.loads(line) for line in ok(searched).stdout.splitlines()]
    assert [e["action"] for e in printed] == ["user.signed_up", "system.db.upgraded"]
    assert printed == all_events(runtime)

    def shown(label: str) -> str:
        found = re.search(rf"^{label}[^:]*:\s+(\S+)\s*$", ok(piped).stdout, re.MULTILINE)
        assert found, f"{label!r} not in {piped}"
        return found.group(1)

    assert int(shown("outbox depth")) >= 1  # the HTTP login, at least
    assert shown("delivered") == "2"
    assert shown("dead letters") == "0"
    assert "intact" in ok(verified).stdout.lower() and "tampered" not in verified.stdout.lower()

    # -- relay --once delivers everything queued: the login, 3 operator reads and the
    # refused duplicate (a refusal is recorded too, but changes nothing).
    assert delivered(cli.run("relay", "--once")) == 5
    events = all_events(runtime)
    assert len(events) == 7
    r = TestClient(create_app(runtime.settings, runtime=runtime), base_url=BASE_URL).post(
        "/v1/login", json={"email": "root@example.com", "password": "another long password"}
    )
    assert r.status_code == 401  # the duplicate changed nothing

    # -- every operator command is an event by the OS user on this host.
    me = {"type": "admin", "id": operator_id(), "label": getpass.getuser()}
    by_operator: dict[str, list[str]] = {}
    for event in events:
        if event["actor"]["type"] == "admin":
            assert event["actor"] == me, event
            assert event["source"]["ip"] is None
            command = event["metadata"].get("command", "")
            by_operator.setdefault(event["action"], []).append(command)
    assert sorted(by_operator) == [
        "audit.pipeline.viewed",
        "audit.searched",
        "audit.verified",
        "system.db.upgraded",
        "user.signed_up",
    ]
    assert by_operator["system.db.upgraded"] == ["echo-auth db upgrade"]
    assert by_operator["audit.searched"] == ["echo-auth audit search --json"]
    assert by_operator["audit.pipeline.viewed"] == ["echo-auth audit pipeline"]
    assert by_operator["audit.verified"] == ["echo-auth audit verify"]
    outcomes = {e["outcome"]: e for e in events if e["action"] == "user.signed_up"}
    assert sorted(outcomes) == ["failure", "success"]
    created, refused = outcomes["success"], outcomes["failure"]
    assert created["outcome"] == "success" and created["target"]["id"] == login_user_id
    assert created["metadata"]["via"] == "cli" and created["metadata"]["roles"] == ["admin", "user"]
    assert refused["outcome"] == "failure" and refused["reason"] == "email_taken"
    assert refused["metadata"]["command"] == "echo-auth user create --email ROOT@example.com"

    # -- change one row by hand, as someone with the database's owner rights could (the
    # append-only trigger, where there is one, is dropped first): verify exits 1 and
    # names the row's seq.
    with transaction(runtime.audit) as conn:
        conn.execute(text("DROP TRIGGER IF EXISTS audit_events_no_update"))
    with transaction(runtime.audit) as conn:
        seq = 2
        doc = conn.execute(
            select(audit_events.c.event_json).where(audit_events.c.seq == seq)
        ).scalar_one()
        forged = doc.replace('"outcome":"success"', '"outcome":"failure"')
        assert forged != doc
        changed = conn.execute(
            update(audit_events).where(audit_events.c.seq == seq).values(event_json=forged)
        )
        assert changed.rowcount == 1
    tampered = cli.run("audit", "verify")
    assert tampered.code == 1, str(tampered)
    assert "Traceback" not in tampered.stderr
    assert "tampered" in tampered.stdout.lower(), str(tampered)
    named = [line for line in tampered.stdout.splitlines() if line.startswith("seq ")]
    assert named and all(re.match(rf"seq {seq}\b", line) for line in named), str(tampered)


def test_usage_and_configuration_errors_are_one_line(tmp_path: Path) -> None:
    data = tmp_path / "var"
    cli = EchoCli(tmp_path, {"ECHO_ENV": "test", "ECHO_DATA_DIR": str(data)})
    bad_url, unreachable, unknown_role = cli.run_all(
        Call(["audit", "pipeline"], env={"ECHO_IDENTITY_DB_URL": "postgres://x"}),
        Call(["audit", "search"], env={"ECHO_AUDIT_DB_URL": "mysql://root@127.0.0.1:1/echo"}),
        Call(["user", "create", "--email", "new@example.com", "--role", "superuser"], PASSWORD),
    )
    assert "postgres" in one_line_error(bad_url)
    line = one_line_error(unreachable)
    assert "database error" in line and "127.0.0.1" in line
    # An unknown role is a usage error (click's usage text), refused before anything runs.
    assert unknown_role.code == 2, str(unknown_role)
    assert "superuser" in unknown_role.stderr and "Traceback" not in unknown_role.stderr
    assert unknown_role.stdout == ""
