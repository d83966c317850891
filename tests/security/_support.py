"""Helpers shared by the security tests: answers, accounts, mail, snapshots, scans."""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from httpx2 import Response
from sqlalchemy import Engine, String, Text, inspect, select, text

from echo_auth.audit.search import EventFilter, search_events
from echo_auth.db.audit_schema import audit_events
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import sessions, users
from echo_auth.identity.provisioning import create_user_by_operator
from echo_auth.runtime import Runtime, operator_actor
from tests.fixtures.app import PASSWORD, deliver

BASE_URL = "http://127.0.0.1:8000"
PROBLEM_JSON = "application/problem+json"
TOKEN_IN_LINK = re.compile(r"token=([A-Za-z0-9_-]+)")


@dataclass(frozen=True)
class Endpoint:
    path: str
    methods: frozenset[str]
    tags: tuple[str, ...]
    dependant: Any


def endpoints(app: Any) -> list[Endpoint]:
    """Every FastAPI route of the app (API and pages), with its full path."""
    found = []
    for context in iter_route_contexts(app.routes):
        if isinstance(context.original_route, APIRoute):
            found.append(
                Endpoint(
                    str(context.path),
                    frozenset(context.methods or ()),
                    tuple(str(t) for t in context.tags),
                    context.dependant,
                )
            )
    return found


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_problem(r: Response, *statuses: int) -> dict[str, Any]:
    """A 4xx problem+json answer (of one of ``statuses`` when given), never a 5xx."""
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if statuses:
        assert r.status_code in statuses, (r.status_code, r.text[:500])
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert r.headers["content-type"].split(";")[0] == PROBLEM_JSON, r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == r.status_code and body["code"] and body["detail"]
    assert body["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in r.text
    return body


def make_user(runtime: Runtime, address: str, *roles: str, password: str = PASSWORD) -> str:
    actor, source = operator_actor()
    return create_user_by_operator(runtime.auth, address, password, list(roles), actor, source).id


def login(client: TestClient, address: str, password: str = PASSWORD) -> str:
    """Log in over HTTP; the session token (the client keeps no cookie)."""
    r = client.post("/v1/login", json={"email": address, "password": password})
    assert r.status_code == 200, r.text
    client.cookies.clear()
    return str(r.json()["session_token"])


def mails(runtime: Runtime) -> list[EmailMessage]:
    """Every mail written so far, oldest first."""
    folder = runtime.settings.mail_dir
    out: list[EmailMessage] = []
    for path in sorted(folder.glob("*.eml")) if folder.exists() else []:
        parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        out.append(parsed)
    return out


def mailed_token(message: EmailMessage) -> str:
    body = message.get_body(("plain",))
    assert body is not None
    found = TOKEN_IN_LINK.search(str(body.get_content()))
    assert found, str(body.get_content())
    return found.group(1)


def last_token_to(runtime: Runtime, address: str) -> str:
    """The token in the newest mail to ``address``."""
    [*_, newest] = [m for m in mails(runtime) if m["To"] == address]
    return mailed_token(newest)


def stored_events(runtime: Runtime, **filters: str) -> list[dict[str, Any]]:
    """Delivered events, newest first."""
    deliver(runtime)
    with transaction(runtime.audit, write=False) as conn:
        return search_events(conn, EventFilter(**filters), limit=500).events


def snapshot(runtime: Runtime) -> dict[str, Any]:
    """What must never change under attack: every user and session row, every audit row."""
    with transaction(runtime.identity, write=False) as conn:
        user_rows = {r.id: tuple(r) for r in conn.execute(select(users))}
        session_rows = {r.id: tuple(r) for r in conn.execute(select(sessions))}
    with transaction(runtime.audit, write=False) as conn:
        audit_rows = {r.seq: tuple(r) for r in conn.execute(select(audit_events))}
    return {"users": user_rows, "sessions": session_rows, "audit": audit_rows}


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Every row that existed before is still there, exactly as it was (new ones may exist)."""
    for table, rows in before.items():
        changed = {key for key, row in rows.items() if after[table].get(key) != row}
        assert not changed, f"{table}: rows changed or vanished: {sorted(changed)[:5]}"
    assert len(after["audit"]) >= len(before["audit"])


def text_cells(engine: Engine) -> list[tuple[str, str, str]]:
    """Every non-empty text value of every table: (table, column, value)."""
    found: list[tuple[str, str, str]] = []
    inspector = inspect(engine)
    with transaction(engine, write=False) as conn:
        for table in inspector.get_table_names():
            columns = [
                c["name"]
                for c in inspector.get_columns(table)
                if isinstance(c["type"], String | Text)
            ]
            if not columns:
                continue
            quoted = ", ".join(conn.dialect.identifier_preparer.quote(c) for c in columns)
            name = conn.dialect.identifier_preparer.quote(table)
            for row in conn.execute(text(f"SELECT {quoted} FROM {name}")):
                for column, value in zip(columns, row, strict=True):
                    if isinstance(value, str) and value:
                        found.append((table, column, value))
    return found
