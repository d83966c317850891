"""Operator access logging: every ``echo-auth`` command that reads or changes data is an
audit event by an ``admin`` actor (the OS user on this host), refused commands included.

The real console script runs as subprocesses (``python -m echo_auth``) against both
backends. What must hold:

* each data command writes its event: actor ``admin`` ``<osuser>@<host>``, the command
  line in ``metadata.command`` with no secret in it (a URL's password is hidden);
* a refused command (``user disable`` of an unknown address, ``user create`` of a taken
  one, the last admin, a bad filter, a move to the audit database itself) is recorded
  under its own action with outcome ``failure`` or ``denied`` and the reason code, once;
* commands that touch no data as an operator write nothing: ``db grants`` without
  ``--apply``, ``audit checkpoint --public-key``, ``relay --once`` (system work), and
  click's own usage errors (nothing ran);
* ``audit ingest-db-log`` turns a MariaDB server_audit log into
  ``system.db.admin_access`` events, idempotently, counting malformed lines;
* when the identity database (where the outbox lives) is unreachable, the error line
  says the refusal could not be recorded.
"""

from __future__ import annotations

import getpass
import uuid
from pathlib import Path
from typing import Any

import pytest

from echo_auth.audit.search import EventFilter, search_events
from echo_auth.config import Settings
from echo_auth.db.engines import transaction
from echo_auth.ops.db_access_log import NAMESPACE
from echo_auth.runtime import Runtime
from tests.e2e.test_cli import (
    Call,
    Done,
    EchoCli,
    cli_for,
    delivered,
    ok,
    one_line_error,
    operator_id,
)
from tests.fixtures.app import PASSWORD

# Lines as MariaDB 10.11's server_audit plugin writes them (captured from a real server,
# host renamed), one of another account, one malformed, and a last line still being
# written (no newline). Note the plugin's own masking leaves "pw" of 's3cr''pw' behind.
SERVER_AUDIT_LOG = (
    "20261127 18:38:20,db1,root,127.0.0.1,5,0,CONNECT,,,0\n"
    "20261127 18:38:20,db1,root,127.0.0.1,5,11,QUERY,mysql,'CREATE USER \\'echo_owner\\'"
    "@\\'127.0.0.1\\' IDENTIFIED BY *****\\'pw\\'',0\n"
    "20261127 18:38:20,db1,root,127.0.0.1,5,13,QUERY,mysql,'SELECT \\'a,b\\', \"it\\'s\"',0\n"
    "20261127 18:38:20,db1,root,127.0.0.1,5,0,DISCONNECT,,,0\n"
    "20261127 18:38:21,db1,echo_owner,127.0.0.1,7,0,FAILED_CONNECT,,,1045\n"
    "20261127 18:38:22,db1,echo_owner,10.0.0.5,8,19,QUERY,echo_identity,"
    "'select * from users where id=1',0\n"
    "20261127 18:38:23,db1,echo_app,10.0.0.9,9,20,QUERY,echo_identity,'select 1',0\n"
    "this is not a server_audit line\n"
    "\n"
    "20261127 18:38:24,db1,root,127.0.0.1,9,23,QUERY,x,'select nosuchcol from x.t',1054\n"
    "20261127 18:38:25,db1,root,127.0.0.1,10,0,CONNECT,,,0"
)
PRIVILEGED_LINES = 7


def run_in_groups(cli: EchoCli, *calls: Call, size: int = 3) -> list[Done]:
    """A few at a time: on a small, busy machine 20 interpreters at once time out."""
    done: list[Done] = []
    for start in range(0, len(calls), size):
        done += cli.run_all(*calls[start : start + size])
    return done


def events_of(runtime: Runtime) -> list[dict[str, Any]]:
    with transaction(runtime.audit, write=False) as conn:
        return search_events(conn, EventFilter(), limit=500).events


def by_command(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        command = (event.get("metadata") or {}).get("command")
        if command:
            out.setdefault(command, []).append(event)
    return out


@pytest.mark.slow
def test_every_data_command_and_every_refusal_is_recorded(
    settings: Settings, tmp_path: Path
) -> None:
    cli = cli_for(settings, tmp_path)
    runtime = Runtime(settings, pool_size=2)
    try:
        _operator_commands(cli, runtime, settings, tmp_path)
    finally:
        runtime.close()


def _operator_commands(cli: EchoCli, runtime: Runtime, settings: Settings, tmp: Path) -> None:
    ok(cli.run("db", "upgrade"))
    ok(cli.run("user", "create", "--email", "admin@example.com", "--role", "admin", stdin=PASSWORD))
    ok(cli.run("user", "create", "--email", "other@example.com", stdin=PASSWORD))
    log = tmp / "server_audit.log"
    log.write_text(SERVER_AUDIT_LOG)
    secret_url = "mysql://someone:topsecret@127.0.0.1:1/elsewhere"
    (
        roles,
        disabled,
        unlocked,
        rotated,
        searched,
        exported,
        verified,
        piped,
        letters,
        retried,
        signed,
        grants,
        ingested,
        ghost,
        taken,
        last_admin,
        bad_filter,
        onto_itself,
        unreachable_target,
        bad_role,
    ) = run_in_groups(
        cli,
        Call(["user", "roles", "other@example.com", "auditor"]),
        Call(["user", "disable", "other@example.com"]),
        Call(["user", "unlock", "other@example.com"]),
        Call(["keys", "rotate-jwt"]),
        Call(["audit", "search"]),
        Call(["audit", "export", "--format", "csv"]),
        Call(["audit", "verify"]),
        Call(["audit", "pipeline"]),
        Call(["audit", "dead-letters"]),
        Call(["audit", "dead-letters", "--retry"]),
        Call(["audit", "checkpoint"]),
        Call(["db", "grants"]),
        Call(["audit", "ingest-db-log", str(log), "--tz", "UTC"]),
        # Refusals.
        Call(["user", "disable", "ghost@example.com"]),
        Call(["user", "create", "--email", "ADMIN@example.com"], stdin=PASSWORD),
        Call(["user", "disable", "admin@example.com"]),
        Call(["audit", "search", "--since", "last tuesday"]),
        Call(["audit", "migrate", "--to", settings.audit_db_url]),
        Call(["audit", "migrate", "--to", secret_url]),
        Call(["user", "roles", "other@example.com", "superuser"]),  # click's usage error
    )
    for done in (roles, disabled, unlocked, rotated, searched, exported, verified, piped):
        ok(done)
    for done in (letters, retried, signed, ingested):
        ok(done)
    # After `audit checkpoint` made the key: --public-key only reads, never creates one.
    public_key = ok(cli.run("audit", "checkpoint", "--public-key"))
    assert "BEGIN PUBLIC KEY" in public_key.stdout
    assert "7 new admin-access events queued" in ingested.stdout, str(ingested)
    assert "1 of other accounts, 1 malformed, 1 still being written" in ingested.stdout
    assert "malformed lines skipped" in ingested.stderr
    if settings.identity_db_url.startswith("sqlite"):
        assert "MySQL" in one_line_error(grants)  # refused: grants are for MySQL only
    else:
        assert "GRANT" in ok(grants).stdout
    assert "no user with email ghost@example.com" in one_line_error(ghost)
    assert "exists" in one_line_error(taken)
    assert "last enabled admin" in one_line_error(last_admin)
    assert "since" in one_line_error(bad_filter)
    assert "itself" in one_line_error(onto_itself)
    line = one_line_error(unreachable_target)
    assert "database error" in line and "topsecret" not in line
    assert bad_role.code == 2 and "superuser" in bad_role.stderr

    ok(cli.run("user", "enable", "other@example.com"))
    relayed = cli.run("relay", "--once")
    assert delivered(relayed) > 0
    again = ok(cli.run("audit", "ingest-db-log", "--tz", "UTC", str(log)))
    assert "0 new admin-access events queued, 7 already ingested" in again.stdout, str(again)
    delivered(cli.run("relay", "--once"))

    events = events_of(runtime)
    commands = by_command(events)
    me = {"type": "admin", "id": operator_id(), "label": getpass.getuser()}

    def recorded(
        done: Done, action: str, outcome: str = "success", reason: str | None = None
    ) -> dict[str, Any]:
        command = "echo-auth " + " ".join(done.args)
        found = commands.get(command, [])
        assert [(e["action"], e["outcome"]) for e in found] == [(action, outcome)], (
            command,
            found,
        )
        [event] = found
        assert event["actor"] == me, event
        assert event["source"]["ip"] is None
        if reason is not None:
            assert event["reason"] == reason, event
        return event

    recorded(roles, "admin.user.roles_changed")
    recorded(disabled, "admin.user.disabled")
    recorded(unlocked, "account.unlocked")
    recorded(rotated, "system.jwt_key.rotated")
    recorded(searched, "audit.searched")
    recorded(exported, "audit.exported")
    recorded(verified, "audit.verified")
    recorded(piped, "audit.pipeline.viewed")
    recorded(letters, "audit.pipeline.viewed")
    assert recorded(retried, "audit.pipeline.viewed")["metadata"]["retried"] == 0
    recorded(signed, "system.checkpoint.signed")
    summary = recorded(ingested, "system.db.admin_log.ingested")["metadata"]
    assert (summary["queued"], summary["malformed"], summary["other_accounts"]) == (7, 1, 1)
    assert commands["echo-auth user enable other@example.com"][0]["action"] == (
        "admin.user.enabled"
    )
    [upgraded] = [e for e in events if e["action"] == "system.db.upgraded"]
    assert upgraded["actor"] == me
    created = [e for e in events if e["action"] == "user.signed_up"]
    assert {(e["actor"]["type"], e["outcome"]) for e in created} == {
        ("admin", "success"),
        ("admin", "failure"),
    }

    # Refusals: their own action, outcome failure or denied, the reason, recorded once.
    recorded(ghost, "admin.user.disabled", "failure", "not_found")
    recorded(taken, "user.signed_up", "failure", "email_taken")
    recorded(last_admin, "admin.user.disabled", "denied", "last_admin")
    recorded(bad_filter, "audit.searched", "failure", "invalid_query")
    recorded(onto_itself, "system.audit.migrated", "failure", "same_database")
    [secret] = [e for e in events if "elsewhere" in str(e["metadata"].get("command"))]
    assert secret["action"] == "system.audit.migrated" and secret["outcome"] == "failure"
    assert "topsecret" not in str(secret) and "someone:***@" in secret["metadata"]["command"]

    # Nothing for commands that touch no data as an operator, nor for click's usage errors.
    for done in (public_key, grants, bad_role, relayed):
        assert "echo-auth " + " ".join(done.args) not in commands, done.args
    assert not [e for e in events if e["action"] == "admin.command.refused"]

    # The server's own audit log, as events: privileged accounts only, secrets masked.
    access = [e for e in events if e["action"] == "system.db.admin_access"]
    assert len(access) == PRIVILEGED_LINES
    lines = [line for line in SERVER_AUDIT_LOG.splitlines(keepends=True) if line.endswith("\n")]
    assert {e["event_id"] for e in access} <= {
        str(uuid.uuid5(NAMESPACE, line.rstrip("\n"))) for line in lines
    }
    assert {e["actor"]["label"] for e in access} == {"root", "echo_owner"}
    failed = [e for e in access if e["metadata"]["operation"] == "FAILED_CONNECT"]
    assert [(e["outcome"], e["reason"]) for e in failed] == [("denied", "failed_connect_1045")]
    assert next(e for e in access if e["outcome"] == "failure")["reason"] == "error_1054"
    statements = [e["metadata"].get("statement", "") for e in access]
    assert "CREATE USER 'echo_owner'@'127.0.0.1' IDENTIFIED ***" in statements
    assert "SELECT 'a,b', \"it's\"" in statements
    assert not [s for s in statements if "pw" in s]
    first = min(access, key=lambda e: e["occurred_at"])
    assert first["occurred_at"] == "2026-11-27T18:38:20.000000Z"
    assert first["actor"]["id"] == "db:root@127.0.0.1" and first["source"]["ip"] == "127.0.0.1"


def test_a_refusal_that_cannot_be_recorded_says_so(tmp_path: Path) -> None:
    cli = EchoCli(
        tmp_path,
        {
            "ECHO_ENV": "test",
            "ECHO_DATA_DIR": str(tmp_path / "var"),
            "ECHO_IDENTITY_DB_URL": "mysql://root@127.0.0.1:1/echo_identity",
        },
    )
    line = one_line_error(cli.run("user", "disable", "someone@example.com"))
    assert "database error" in line
    assert "could not be recorded in the audit log" in line
