"""Parsing MariaDB server_audit lines into ``system.db.admin_access`` events (no database).

The sample lines are what MariaDB 10.11.19's plugin wrote for the statements shown
(captured from a real server, host renamed ``db1``).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from echo_auth.ops.db_access_log import (
    NAMESPACE,
    MalformedLine,
    is_privileged,
    mask_secrets,
    parse_line,
    to_event,
)

CONNECT = "20261127 18:38:20,db1,root,127.0.0.1,5,0,CONNECT,,,0\n"
# CREATE USER 'echo_owner'@'127.0.0.1' IDENTIFIED BY 's3cr,et''pw'
CREATE_USER = (
    "20261127 18:38:20,db1,root,127.0.0.1,5,11,QUERY,mysql,'CREATE USER \\'echo_owner\\'"
    "@\\'127.0.0.1\\' IDENTIFIED BY *****\\'pw\\'',0\n"
)
# SELECT 'a,b', "it's"
COMMAS = "20261127 18:38:20,db1,root,127.0.0.1,5,13,QUERY,mysql,'SELECT \\'a,b\\', \"it\\'s\"',0\n"
# SELECT 1<newline>FROM dual
NEWLINE = "20261127 18:38:20,db1,root,127.0.0.1,6,17,QUERY,,'SELECT 1\\nFROM dual',0\n"
FAILED = "20261127 18:38:20,db1,echo_owner,127.0.0.1,7,0,FAILED_CONNECT,,,1045\n"
ERROR = "20261127 18:38:20,db1,root,127.0.0.1,9,23,QUERY,x,'select nosuchcol from x.t',1054\n"


def test_a_connect_line() -> None:
    access = parse_line(CONNECT, UTC)
    assert access.occurred_at == datetime(2026, 11, 27, 18, 38, 20, tzinfo=UTC)
    assert (access.server, access.username, access.host) == ("db1", "root", "127.0.0.1")
    assert (access.connection_id, access.query_id, access.retcode) == (5, 0, 0)
    assert (access.operation, access.database, access.object) == ("CONNECT", "", "")


def test_quoted_statements_keep_their_commas_quotes_and_newlines() -> None:
    assert parse_line(COMMAS, UTC).object == "SELECT 'a,b', \"it's\""
    assert parse_line(NEWLINE, UTC).object == "SELECT 1\nFROM dual"
    assert parse_line(CREATE_USER, UTC).database == "mysql"


def test_the_server_time_zone_is_applied() -> None:
    access = parse_line(CONNECT, ZoneInfo("Europe/Paris"))
    assert access.occurred_at == datetime(2026, 11, 27, 17, 38, 20, tzinfo=UTC)


def test_mariadb_12_host_with_port_is_kept_as_written() -> None:
    line = "20261127 18:38:20,db1,root,10.0.0.5:53422,5,0,CONNECT,,,0\n"
    assert parse_line(line, UTC).host == "10.0.0.5:53422"


@pytest.mark.parametrize(
    "line",
    [
        "",
        "not a server_audit line",
        "20261127 18:38:20,db1,root,127.0.0.1,5,0,CONNECT,,",  # 9 fields
        "yesterday,db1,root,127.0.0.1,5,0,CONNECT,,,0",
        "20261127 18:38:20,db1,root,127.0.0.1,five,0,CONNECT,,,0",
        "20261127 18:38:20,db1,root,127.0.0.1,5,0,CONNECT,,,ok",
        "20261127 18:38:20,db1,root,127.0.0.1,5,0,connect now,,,0",
        "20261127 18:38:20,db1,,127.0.0.1,5,0,CONNECT,,,0",
        "Nov 27 18:38:20 db1 mysql-server_auditing: db1,root,127.0.0.1,5,0,CONNECT,,,0",
    ],
)
def test_malformed_lines_are_refused(line: str) -> None:
    with pytest.raises(MalformedLine):
        parse_line(line, UTC)


def test_credentials_are_masked_even_where_the_plugin_leaks_them() -> None:
    statement = parse_line(CREATE_USER, UTC).object
    assert "pw" in statement  # the plugin's own masking left part of the password
    assert mask_secrets(statement) == "CREATE USER 'echo_owner'@'127.0.0.1' IDENTIFIED ***"
    cases = {
        "SET PASSWORD FOR 'a'@'b' = PASSWORD('x')": "SET PASSWORD FOR 'a'@'b' = ***",
        "ALTER USER a IDENTIFIED VIA ed25519 USING PASSWORD('x')": "ALTER USER a IDENTIFIED ***",
        "GRANT ALL ON x.* TO a IDENTIFIED BY 'x'": "GRANT ALL ON x.* TO a IDENTIFIED ***",
        "CHANGE MASTER TO MASTER_HOST='h', MASTER_PASSWORD='x'": (
            "CHANGE MASTER TO MASTER_HOST='h', MASTER_PASSWORD ***"
        ),
        "SELECT AES_ENCRYPT(card, 'key') FROM t": "SELECT AES_ENCRYPT(***)",
        "SELECT * FROM users WHERE id = 1": "SELECT * FROM users WHERE id = 1",
    }
    for given, masked in cases.items():
        assert mask_secrets(given) == masked


def test_privileged_accounts() -> None:
    assert is_privileged("root", None) and is_privileged("echo_owner", None)
    assert not is_privileged("echo_app", None) and not is_privileged("owner", None)
    only = frozenset({"echo_app"})
    assert is_privileged("echo_app", only) and not is_privileged("root", only)


def test_events_name_the_account_outcome_and_statement() -> None:
    query = to_event(parse_line(CREATE_USER, UTC))
    assert query.action == "system.db.admin_access"
    assert (query.actor.type, query.actor.id, query.actor.label) == (
        "admin",
        "db:root@127.0.0.1",
        "root",
    )
    assert (query.outcome, query.reason) == ("success", None)
    assert query.source.ip == "127.0.0.1"
    assert query.metadata["statement"].endswith("IDENTIFIED ***")
    assert query.metadata["operation"] == "QUERY" and query.metadata["query_id"] == 11
    assert query.occurred_at == datetime(2026, 11, 27, 18, 38, 20, tzinfo=UTC)
    failed = to_event(parse_line(FAILED, UTC))
    assert (failed.outcome, failed.reason) == ("denied", "failed_connect_1045")
    assert "statement" not in failed.metadata
    error = to_event(parse_line(ERROR, UTC))
    assert (error.outcome, error.reason) == ("failure", "error_1054")
    named = to_event(parse_line(CONNECT.replace("127.0.0.1", "app-host"), UTC))
    assert named.source.ip is None and named.metadata["client_host"] == "app-host"


def test_the_event_id_is_the_lines_own() -> None:
    first, again = to_event(parse_line(CONNECT, UTC)), to_event(parse_line(CONNECT, UTC))
    assert first.event_id == again.event_id == str(uuid.uuid5(NAMESPACE, CONNECT.rstrip("\n")))
    assert first.canonical() == again.canonical()
    assert to_event(parse_line(FAILED, UTC)).event_id != first.event_id
