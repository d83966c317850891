"""Importing a server_audit log is idempotent, on both backends.

Lines already queued are skipped (the outbox), lines already delivered are skipped (the
audit log), the same line in two files counts once, and even when the audit database
cannot be asked the relay's idempotent append keeps every line exactly once. On MariaDB,
the plugin's real output from a throwaway server is imported too (passwords masked, the
failed login denied, other accounts left out).
"""

from __future__ import annotations

from datetime import UTC

import pymysql
import pytest
from sqlalchemy import func, select

from echo_auth.audit.search import EventFilter, search_events
from echo_auth.db.audit_schema import audit_events
from echo_auth.db.engines import make_engine, transaction
from echo_auth.db.identity_schema import audit_outbox
from echo_auth.ops.db_access_log import ingest
from echo_auth.runtime import Runtime
from tests.fixtures.app import deliver
from tests.fixtures.db import MySQLServer
from tests.fixtures.mariadb import ThrowawayMariaDB

LINES = [f"20261127 18:40:{s:02d},db1,root,127.0.0.1,{s},0,CONNECT,,,0\n" for s in range(10)] + [
    "20261127 18:41:00,db1,echo_app,127.0.0.1,99,0,CONNECT,,,0\n",
    "garbage\n",
]


def _events(runtime: Runtime) -> list[str]:
    with transaction(runtime.audit, write=False) as conn:
        return list(
            conn.execute(
                select(audit_events.c.event_id).where(
                    audit_events.c.action == "system.db.admin_access"
                )
            ).scalars()
        )


def _queued(runtime: Runtime) -> int:
    with transaction(runtime.identity, write=False) as conn:
        return int(conn.execute(select(func.count()).select_from(audit_outbox)).scalar_one())


def test_ingesting_twice_adds_nothing(runtime: Runtime) -> None:
    first = ingest([("a.log", LINES[:6])], runtime.identity, runtime.audit_reader, tz=UTC)
    assert (first.lines, first.queued, first.other_accounts, first.malformed) == (6, 6, 0, 0)

    # Overlapping files, part queued, part new: only the new lines are queued.
    second = ingest(
        [("a.log", LINES[:6]), ("b.log", LINES[4:])], runtime.identity, runtime.audit_reader, tz=UTC
    )
    assert (second.queued, second.already_ingested) == (4, 8)
    assert (second.other_accounts, second.malformed, second.malformed_at) == (1, 1, ["b.log:8"])
    assert _queued(runtime) == 10

    deliver(runtime)
    assert len(_events(runtime)) == 10
    # Delivered now: found in the audit log, not queued again.
    third = ingest([("b.log", LINES)], runtime.identity, runtime.audit_reader, tz=UTC)
    assert (third.queued, third.already_ingested, third.audit_checked) == (0, 10, True)
    assert _queued(runtime) == 0


def test_an_unreachable_audit_database_still_duplicates_nothing(runtime: Runtime) -> None:
    ingest([("a.log", LINES)], runtime.identity, runtime.audit_reader, tz=UTC)
    deliver(runtime)
    nowhere = make_engine("mysql://root@127.0.0.1:1/echo_audit", pool_size=1)
    try:
        report = ingest([("a.log", LINES)], runtime.identity, nowhere, tz=UTC)
    finally:
        nowhere.dispose()
    assert report.audit_checked is False
    assert report.queued == 10  # it could not tell; the relay can
    deliver(runtime)
    events = _events(runtime)
    assert len(events) == len(set(events)) == 10
    assert _queued(runtime) == 0


@pytest.mark.mysql
@pytest.mark.slow
def test_a_real_server_audit_log(runtime: Runtime) -> None:
    """The plugin's own output, from a throwaway server (never the suite's shared one)."""
    second = ThrowawayMariaDB().begin()
    try:
        server = second.server()
        log = second.base / "server_audit.log"
        with server.connect() as conn, conn.cursor() as cur:
            try:
                cur.execute("INSTALL SONAME 'server_audit'")
            except pymysql.MySQLError as exc:
                pytest.skip(f"no server_audit plugin in this MariaDB: {exc}")
            cur.execute(f"SET GLOBAL server_audit_file_path = '{log}'")
            cur.execute("SET GLOBAL server_audit_events = 'CONNECT,QUERY'")
            cur.execute("SET GLOBAL server_audit_incl_users = 'echo_owner,root,echo_app'")
            cur.execute("SET GLOBAL server_audit_logging = ON")
        with server.connect() as conn, conn.cursor() as cur:
            cur.execute("CREATE DATABASE shop")
            for account in ("echo_owner", "echo_app"):
                cur.execute(f"CREATE USER '{account}'@'%' IDENTIFIED BY 'pa''ss,word'")
                cur.execute(f"GRANT ALL ON shop.* TO '{account}'@'%'")
        owner = MySQLServer(server.host, server.port, "echo_owner", "pa'ss,word")
        with owner.connect("shop") as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE t (a INT)")
            cur.execute("SELECT 'x,y' FROM t")
        with pytest.raises(pymysql.MySQLError):
            MySQLServer(server.host, server.port, "echo_owner", "wrong").connect().close()
        app = MySQLServer(server.host, server.port, "echo_app", "pa'ss,word")
        app.connect("shop").close()
        lines = log.read_text(errors="replace").splitlines(keepends=True)
    finally:
        second.stop()

    report = ingest([("server_audit.log", lines)], runtime.identity, runtime.audit_reader)
    assert report.malformed == 0 and report.queued > 0, report
    assert report.other_accounts > 0  # echo_app: logged by the server, not imported
    deliver(runtime)
    with transaction(runtime.audit, write=False) as conn:
        events = search_events(conn, EventFilter(action="system.db.admin_access"), limit=500).events
    assert len(events) == report.queued
    assert {e["actor"]["label"] for e in events} == {"root", "echo_owner"}
    statements = [e["metadata"].get("statement", "") for e in events]
    assert any(s.startswith("CREATE USER 'echo_owner'@'%' IDENTIFIED ***") for s in statements)
    assert "SELECT 'x,y' FROM t" in statements
    assert not [s for s in statements if "ss,word" in s or "pa'" in s]
    failed = [e for e in events if e["metadata"]["operation"] == "FAILED_CONNECT"]
    assert [(e["actor"]["label"], e["outcome"]) for e in failed] == [("echo_owner", "denied")]
    again = ingest([("server_audit.log", lines)], runtime.identity, runtime.audit_reader)
    assert (again.queued, again.already_ingested) == (0, report.queued)
