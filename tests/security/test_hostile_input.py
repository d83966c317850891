"""Hostile input that ``tests/e2e/test_http_errors.py`` does not already cover.

Huge headers (in-process, and on a real socket where the HTTP parser has a say);
overlong and Unicode-confusable addresses and the one normalisation Echo applies;
passwords of 0, 1,024 and 100,000 characters on every route that takes one; SQL
metacharacters and NUL bytes in every string field, path segment, query parameter and
header, with nothing already stored changing; negative and enormous ``limit`` and
``cursor`` values on every paginated route; and a bad argument to every CLI command.
Every answer is a clear 4xx problem (or a page, for the HTML forms), never a 5xx.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
import httpx2
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import select

from echo_auth.app import create_app
from echo_auth.audit.verify import verify_audit_log
from echo_auth.cli.main import cli as cli_group
from echo_auth.config import Settings
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import sessions, users
from echo_auth.identity.users import normalize_email
from echo_auth.runtime import Runtime
from tests.fixtures.app import PASSWORD, deliver
from tests.security._support import (
    BASE_URL,
    assert_problem,
    assert_unchanged,
    bearer,
    last_token_to,
    login,
    mails,
    make_user,
    snapshot,
    stored_events,
)

HTML = {"accept": "text/html"}
KB64 = 64 * 1024

# -- huge headers ---------------------------------------------------------------------------


def test_huge_headers_in_process_are_4xx_or_harmless(client: TestClient, runtime: Runtime) -> None:
    make_user(runtime, "ana@example.com")
    huge = "A" * KB64
    assert_problem(client.get("/v1/me", headers=bearer(huge)), 401)
    assert_problem(client.get("/v1/me", headers={"Cookie": f"echo_session={huge}"}), 401)
    assert_problem(client.get("/v1/me", headers={"Authorization": huge}), 401)
    r = client.get("/nope", headers={"X-Request-ID": huge})
    assert len(assert_problem(r, 404)["request_id"]) <= 64  # replaced, not echoed
    # A cross-origin Origin of 64 KB on a cookie write is refused as any foreign origin is.
    token = login(client, "ana@example.com")
    r = client.post("/v1/logout", headers={"Cookie": f"echo_session={token}", "Origin": huge})
    assert_problem(r, 403)
    assert client.get("/v1/me", headers=bearer(token)).status_code == 200
    # Headers that are stored are stored clipped; the request itself works.
    r = client.post(
        "/v1/login",
        json={"email": "ana@example.com", "password": PASSWORD},
        headers={"User-Agent": huge, "X-Forwarded-For": huge, "Accept-Language": huge},
    )
    assert r.status_code == 200, r.text
    client.cookies.clear()
    session = r.json()["session_token"]
    with transaction(runtime.identity, write=False) as conn:
        agents = conn.execute(select(sessions.c.user_agent)).scalars().all()
    assert huge[:512] in agents and all(len(a or "") <= 512 for a in agents)
    # A thousand headers.
    many = {f"x-junk-{i}": "v" * 64 for i in range(1000)}
    assert client.get("/v1/me", headers={**many, **bearer(session)}).status_code == 200
    event = stored_events(runtime, action="auth.login.succeeded")[0]
    assert event["source"]["user_agent"] == huge[:512]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def live_server(runtime: Runtime) -> Iterator[str]:
    """The app behind uvicorn on a real socket (uvicorn's own HTTP parser), in a thread."""
    port = _free_port()
    config = uvicorn.Config(
        create_app(runtime.settings, runtime=runtime),
        host="127.0.0.1",
        port=port,
        access_log=False,
        log_config=None,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_huge_headers_on_a_real_socket_are_4xx(runtime: Runtime, live_server: str) -> None:
    make_user(runtime, "ana@example.com")
    with httpx2.Client(base_url=live_server, timeout=10) as http:
        for headers in (
            {"X-Huge": "A" * KB64},
            {"Cookie": "echo_session=" + "A" * KB64},
            {"Authorization": "Bearer " + "A" * KB64},
            {f"x-many-{i}": "v" * 256 for i in range(300)},  # 75 KB in many headers
        ):
            r = http.get("/v1/me", headers=headers)
            assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
        # The server still serves, and an ordinary request gets an ordinary answer.
        r = http.post("/v1/login", json={"email": "ana@example.com", "password": PASSWORD})
        assert r.status_code == 200, r.text
        assert http.get("/healthz").status_code == 200


# -- email normalisation ----------------------------------------------------------------------

CYRILLIC_A = "\u0430"  # looks like "a"


def test_email_normalisation_is_nfkc_and_lowercase(client: TestClient, runtime: Runtime) -> None:
    r = client.post("/v1/signup", json={"email": "ana@example.com", "password": PASSWORD})
    assert r.status_code == 201
    ana = login(client, "ana@example.com")
    ana_id = client.get("/v1/me", headers=bearer(ana)).json()["id"]

    # One account whatever the spelling: full-width letters and at sign, case, combining
    # marks composed, the Kelvin sign K.
    same = [
        "\uff21\uff4e\uff41@example.com",  # full-width "Ana"
        "ana\uff20example.com",  # full-width @
        "ANA@EXAMPLE.COM",
        "  ana@example.com  ",
    ]
    for spelling in same:
        assert normalize_email(spelling) == "ana@example.com", spelling
        token = login(client, spelling)
        assert client.get("/v1/me", headers=bearer(token)).json()["id"] == ana_id, spelling
        # Sign-up with it is the "taken" answer (a fresh id, nothing created).
        r = client.post("/v1/signup", json={"email": spelling, "password": PASSWORD + "!"})
        assert r.status_code == 201 and r.json()["user_id"] != ana_id
    assert normalize_email("jose\u0301@example.com") == normalize_email("jos\u00e9@example.com")
    assert normalize_email("\u212aim@example.com") == "kim@example.com"

    # A Cyrillic "a" is another letter, so another address and another account.
    homoglyph = f"{CYRILLIC_A}na@example.com"
    assert normalize_email(homoglyph) != "ana@example.com"
    r = client.post("/v1/login", json={"email": homoglyph, "password": PASSWORD})
    assert_problem(r, 401)
    r = client.post("/v1/signup", json={"email": homoglyph, "password": "another long passphrase"})
    assert r.status_code == 201
    other = login(client, homoglyph, "another long passphrase")
    me = client.get("/v1/me", headers=bearer(other)).json()
    assert me["id"] != ana_id and me["email"] == homoglyph
    # Reset of the look-alike mails the look-alike, never ana.
    before = [m["To"] for m in mails(runtime)]
    assert client.post("/v1/password-reset", json={"email": homoglyph}).status_code == 202
    after = [m["To"] for m in mails(runtime)]
    assert after[len(before) :] == [homoglyph]

    with transaction(runtime.identity, write=False) as conn:
        stored = sorted(conn.execute(select(users.c.email)).scalars())
    assert stored == sorted(["ana@example.com", homoglyph])


@pytest.mark.parametrize(
    "address",
    [
        "a" * 300 + "@example.com",  # a 300-character local part
        "ana@" + "b" * 250 + ".com",
        "ana@" + ".".join(["label"] * 60) + ".com",  # over 254 in all
        "ana@example.com" + "\u0301" * 300,
        "\u202eana@example.com",  # right-to-left override
        "ana\u200b@example.com",  # zero-width space
        "ana@exa\u0000mple.com",
        "ana@@example.com",
        "<ana@example.com>",
        "ana@example.com\r\nBcc: eve@example.com",  # header injection
    ],
)
def test_overlong_and_malformed_addresses_are_422(client: TestClient, address: str) -> None:
    for path, body in (
        ("/v1/signup", {"email": address, "password": PASSWORD}),
        ("/v1/login", {"email": address, "password": PASSWORD}),
        ("/v1/password-reset", {"email": address}),
        ("/v1/email-verification/resend", {"email": address}),
    ):
        body_ = assert_problem(client.post(path, json=body), 422)
        assert body_["code"] == "validation_error", body_


# -- passwords of 0, 1,024 and 100,000 characters ----------------------------------------------

LONG = "p" * 1024  # the policy's maximum: accepted
HUGE = "p" * 100_000  # more than the body limit


def test_password_lengths_on_every_api_route(client: TestClient, runtime: Runtime) -> None:
    make_user(runtime, "ana@example.com")
    ana = login(client, "ana@example.com")

    def post(path: str, body: dict[str, Any], method: str = "POST") -> httpx2.Response:
        return client.request(method, path, json=body, headers=bearer(ana))

    # Empty: refused by the schema everywhere.
    empty = [
        ("/v1/signup", {"email": "zero@example.com", "password": ""}),
        ("/v1/login", {"email": "ana@example.com", "password": ""}),
        ("/v1/setup", {"token": "t", "email": "z@example.com", "password": ""}),
        ("/v1/me/password", {"current_password": "", "new_password": PASSWORD + "x"}),
        ("/v1/me/password", {"current_password": PASSWORD, "new_password": ""}),
        ("/v1/password-reset/confirm", {"token": "t", "new_password": ""}),
    ]
    for path, body in empty:
        assert_problem(post(path, body), 422)
    assert_problem(post("/v1/me/mfa/totp", {"password": ""}, "DELETE"), 422)
    # 100,000 characters: over the body limit, refused before any route (and any hashing).
    huge = [
        ("/v1/signup", {"email": "huge@example.com", "password": HUGE}),
        ("/v1/login", {"email": "ana@example.com", "password": HUGE}),
        ("/v1/setup", {"token": "t", "email": "z@example.com", "password": HUGE}),
        ("/v1/me/password", {"current_password": HUGE, "new_password": PASSWORD + "x"}),
        ("/v1/me/password", {"current_password": PASSWORD, "new_password": HUGE}),
        ("/v1/password-reset/confirm", {"token": "t", "new_password": HUGE}),
    ]
    for path, body in huge:
        assert_problem(post(path, body), 413)
    assert_problem(post("/v1/me/mfa/totp", {"password": HUGE}, "DELETE"), 413)

    # 1,024: the longest password the policy takes works end to end on every route.
    r = client.post("/v1/signup", json={"email": "long@example.com", "password": LONG})
    assert r.status_code == 201, r.text
    long_session = login(client, "long@example.com", LONG)
    assert_problem(post("/v1/login", {"email": "ana@example.com", "password": LONG}), 401)
    body = {"current_password": LONG, "new_password": LONG[:-1] + "q"}
    r = client.post("/v1/me/password", json=body, headers=bearer(long_session))
    assert r.status_code == 204, r.text
    login(client, "long@example.com", LONG[:-1] + "q")
    assert_problem(
        client.post("/v1/signup", json={"email": "over@example.com", "password": LONG + "p"}),
        422,
    )
    assert client.post("/v1/password-reset", json={"email": "long@example.com"}).status_code == 202
    reset = last_token_to(runtime, "long@example.com")
    r = client.post("/v1/password-reset/confirm", json={"token": reset, "new_password": LONG})
    assert r.status_code == 204, r.text
    login(client, "long@example.com", LONG)
    r = post("/v1/setup", {"token": "not-a-token", "email": "z@example.com", "password": LONG})
    assert_problem(r, 400)
    assert_problem(post("/v1/me/mfa/totp", {"password": LONG}, "DELETE"), 401)  # not hers


def _page_token(client: TestClient, path: str) -> str:
    page = client.get(path, headers=HTML)
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found, (path, page.status_code, page.text[:300])
    return found.group(1)


def test_password_lengths_on_every_page_form(client: TestClient, runtime: Runtime) -> None:
    make_user(runtime, "ana@example.com")

    def submit(path: str, form_page: str, fields: dict[str, str]) -> int:
        data = {"csrf_token": _page_token(client, form_page), **fields}
        r = client.post(path, data=data, headers=HTML, follow_redirects=False)
        assert r.status_code < 500, (path, r.status_code)
        return r.status_code

    anonymous = [
        ("/signup", "/signup", lambda p: {"email": "form@example.com", "password": p}),
        ("/login", "/login", lambda p: {"email": "ana@example.com", "password": p}),
        (
            "/reset-password",
            "/reset-password?token=t",
            lambda p: {"token": "t", "new_password": p, "new_password_repeat": p},
        ),
        ("/setup", "/setup", lambda p: {"token": "t", "email": "z@example.com", "password": p}),
    ]
    for path, form_page, fields in anonymous:
        assert submit(path, form_page, fields("")) == 422, path
        assert submit(path, form_page, fields(HUGE)) == 413, path
        assert submit(path, form_page, fields(LONG)) in (200, 303, 400, 401, 422), path
    # Signed in: the password change and the factor removal forms.
    r = client.post(
        "/login",
        data={
            "csrf_token": _page_token(client, "/login"),
            "email": "ana@example.com",
            "password": PASSWORD,
        },
        follow_redirects=False,
    )
    assert r.status_code == 303
    fields_by_form = {
        "/account/password": lambda p: {
            "current_password": p,
            "new_password": PASSWORD + "x",
            "new_password_repeat": PASSWORD + "x",
        },
        "/account/mfa/totp/remove": lambda p: {"password": p},
    }
    for path, fields in fields_by_form.items():
        assert submit(path, "/account", fields("")) in (400, 409, 422), path
        assert submit(path, "/account", fields(HUGE)) == 413, path
        assert submit(path, "/account", fields(LONG)) in (400, 401, 409, 422), path
    # The long signup went through and nothing else changed ana's password.
    login(client, "form@example.com", LONG)
    login(client, "ana@example.com")


# -- SQL metacharacters and NUL bytes in every field -------------------------------------------

SQL = [
    "' OR 1=1 --",
    '"; DROP TABLE users; --',
    "'; DELETE FROM audit_events; --",
    "%",
    "_",
    "\\",
    "\\'",
    "%' OR email LIKE '%",
    "') OR ('a'='a",
    "1; SELECT SLEEP(5)",
    "\x00",
    "a\x00b",
]
HEADER_SQL = [p for p in SQL if "\x00" not in p]


def _requests(payload: str, ids: dict[str, str]) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, url, request kwargs) putting ``payload`` into every string input once."""
    p, path = payload, quote(payload, safe="")
    as_email = f"{payload}@example.com"
    user, event = ids["user"], ids["event"]
    out: list[tuple[str, str, dict[str, Any]]] = []
    bodies: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/signup", {"email": p, "password": PASSWORD}),
        ("POST", "/v1/signup", {"email": as_email, "password": PASSWORD}),
        ("POST", "/v1/signup", {"email": "new@example.com", "password": p}),
        ("POST", "/v1/login", {"email": p, "password": PASSWORD}),
        ("POST", "/v1/login", {"email": as_email, "password": PASSWORD}),
        ("POST", "/v1/login", {"email": "ana@example.com", "password": p}),
        ("POST", "/v1/login/mfa", {"mfa_token": p, "code": "123456"}),
        ("POST", "/v1/login/mfa", {"mfa_token": "x", "code": p}),
        ("POST", "/v1/setup", {"token": p, "email": "z@example.com", "password": PASSWORD}),
        ("POST", "/v1/setup", {"token": "t", "email": as_email, "password": PASSWORD}),
        ("POST", "/v1/email-verification/confirm", {"token": p}),
        ("POST", "/v1/email-verification/resend", {"email": as_email}),
        ("POST", "/v1/password-reset", {"email": p}),
        ("POST", "/v1/password-reset", {"email": as_email}),
        ("POST", "/v1/password-reset/confirm", {"token": p, "new_password": PASSWORD + "!"}),
        ("POST", "/v1/password-reset/confirm", {"token": "t", "new_password": p}),
        ("POST", "/v1/me/password", {"current_password": p, "new_password": PASSWORD + "!"}),
        ("POST", "/v1/me/password", {"current_password": "wrong one", "new_password": p}),
        ("POST", "/v1/me/mfa/totp/confirm", {"code": p}),
        ("DELETE", "/v1/me/mfa/totp", {"password": p}),
        ("DELETE", "/v1/me/mfa/totp", {"code": p}),
        ("PUT", f"/v1/admin/users/{user}/roles", {"roles": [p]}),
    ]
    out += [(m, u, {"json": b}) for m, u, b in bodies]
    out += [
        ("DELETE", f"/v1/me/sessions/{path}", {}),
        ("GET", f"/v1/admin/users/{path}", {}),
        ("POST", f"/v1/admin/users/{path}/disable", {}),
        ("POST", f"/v1/admin/users/{path}/enable", {}),
        ("POST", f"/v1/admin/users/{path}/unlock", {}),
        ("PUT", f"/v1/admin/users/{path}/roles", {"json": {"roles": ["user"]}}),
        ("DELETE", f"/v1/admin/users/{path}/sessions", {}),
        ("GET", f"/v1/audit/events/{path}", {}),
        ("GET", f"/v1/audit/events/{event}", {"params": {"ignored": p}}),
    ]
    for name in ("q", "cursor"):
        out.append(("GET", "/v1/admin/users", {"params": {name: p}}))
    for name in ("actor", "action", "target", "outcome", "ip", "since", "until", "q", "cursor"):
        out.append(("GET", "/v1/audit/events", {"params": {name: p}}))
    for name in ("format", "actor", "action", "target", "outcome", "ip", "since", "until", "q"):
        out.append(("GET", "/v1/audit/export", {"params": {name: p}}))
    return out


@pytest.mark.slow
def test_sql_metacharacters_and_nul_in_every_field(client: TestClient, runtime: Runtime) -> None:
    ana_id = make_user(runtime, "ana@example.com")
    make_user(runtime, "root@example.com", "admin", "auditor")
    admin = login(client, "root@example.com")
    ana = login(client, "ana@example.com")
    deliver(runtime)
    event_id = stored_events(runtime)[0]["event_id"]
    before = snapshot(runtime)
    answered: dict[int, int] = {}

    for payload in SQL:
        for method, url, kwargs in _requests(payload, {"user": ana_id, "event": event_id}):
            r = client.request(method, url, headers=bearer(admin), **kwargs)
            answered[r.status_code] = answered.get(r.status_code, 0) + 1
            assert r.status_code < 500, (method, url, kwargs, r.status_code, r.text[:300])
            if r.status_code >= 400:
                assert_problem(r)
        for name in ("User-Agent", "X-Request-ID", "X-Forwarded-For", "Origin", "Accept"):
            if payload in HEADER_SQL:
                r = client.get("/v1/me", headers={**bearer(ana), name: payload})
                assert r.status_code == 200, (name, payload, r.text)
        if payload in HEADER_SQL:
            for cookie in ("echo_session", "echo_device", "echo_csrf"):
                client.cookies.clear()
                client.cookies.set(cookie, payload)
                r = client.post(
                    "/v1/login", json={"email": "ana@example.com", "password": "x" * 12}
                )
                assert r.status_code in (401, 429), r.text
                assert_problem(client.get("/v1/me", headers={"Cookie": f"{cookie}={payload}"}), 401)
            client.cookies.clear()
            assert_problem(client.get("/v1/me", headers=bearer(payload)), 401)
    assert answered.get(200, 0) > 20 and answered.get(422, 0) > 20, answered

    # Nothing that existed changed, nothing vanished; the tables are all still there.
    assert_unchanged(before, snapshot(runtime))
    assert client.get("/v1/me", headers=bearer(ana)).json()["roles"] == ["user"]
    # The guesses above locked ana's address and this client's IP (that is the throttle
    # working); an admin lifts the lock, and from elsewhere her password still works.
    r = client.post(f"/v1/admin/users/{ana_id}/unlock", headers=bearer(admin))
    assert r.status_code == 204, r.text
    elsewhere = TestClient(client.app, base_url=BASE_URL, client=("198.51.100.9", 40000))
    login(elsewhere, "ana@example.com")
    # Wildcards are literal: "%" and "_" match only themselves, in login, reset and search.
    for wildcard in ("%", "_"):
        r = elsewhere.post(
            "/v1/login", json={"email": f"{wildcard}@example.com", "password": PASSWORD}
        )
        # The literal account of that name (made above), never ana's.
        assert r.status_code == 200 and r.json()["user"]["email"] == f"{wildcard}@example.com"
        elsewhere.cookies.clear()
        found = client.get("/v1/admin/users", params={"q": wildcard}, headers=bearer(admin))
        assert found.json()["users"], wildcard
        assert all(wildcard in u["email"] for u in found.json()["users"]), found.json()
    # Patterns that would match only ana if a LIKE were used: nobody has these addresses.
    for pattern in ("an_@example.com", "a%@example.com", "%a@example.com"):
        r = elsewhere.post("/v1/login", json={"email": pattern, "password": PASSWORD})
        assert_problem(r, 401)
        assert elsewhere.post("/v1/password-reset", json={"email": pattern}).status_code == 202
    assert "ana@example.com" not in [m["To"] for m in mails(runtime)]
    # The addresses that are valid were stored literally.
    with transaction(runtime.identity, write=False) as conn:
        emails = set(conn.execute(select(users.c.email)).scalars())
    assert {"%@example.com", "_@example.com"} <= emails
    deliver(runtime)
    with transaction(runtime.audit, write=False) as conn:
        report = verify_audit_log(
            conn, public_key=runtime.checkpoint_public_key, sink=runtime.checkpoint_sink
        )
    assert report.intact, report.as_dict()


# -- limit and cursor ---------------------------------------------------------------------------

BAD_LIMITS = ["-1", "0", "-9223372036854775809", "9223372036854775808", str(10**30), "1e3", "", "x"]
BAD_CURSORS = [
    "-1",
    "0",
    "A" * 10_000,
    "dTAxOTA=",  # base64 of a short "u..." cursor
    "czk5OTk5OTk5OTk5OTk5OTk5OTk5OQ",  # base64 of "s" and 23 nines
    "../../etc/passwd",
    "%00",
    "' OR 1=1 --",
]


def test_negative_and_enormous_limit_and_cursor_values(
    client: TestClient, runtime: Runtime
) -> None:
    make_user(runtime, "root@example.com", "admin", "auditor")
    admin = bearer(login(client, "root@example.com"))
    deliver(runtime)
    for route in ("/v1/admin/users", "/v1/audit/events"):
        for limit in BAD_LIMITS:
            r = client.get(route, params={"limit": limit}, headers=admin)
            if limit == "":
                assert r.status_code in (200, 422), (route, r.text)  # empty: the default
            else:
                assert_problem(r, 422)
        for cursor in BAD_CURSORS:
            r = client.get(route, params={"cursor": cursor}, headers=admin)
            assert_problem(r, 422)
        # The bounds themselves work.
        assert client.get(route, params={"limit": "1"}, headers=admin).status_code == 200
        biggest = "200" if "admin" in route else "500"
        assert client.get(route, params={"limit": biggest}, headers=admin).status_code == 200
        r = client.get(route, params={"limit": str(int(biggest) + 1)}, headers=admin)
        assert_problem(r, 422)

    # The pages that page: a forged cursor is a form error, never a 5xx.
    r = client.post(
        "/login",
        data={
            "csrf_token": _page_token(client, "/login"),
            "email": "root@example.com",
            "password": PASSWORD,
        },
        follow_redirects=False,
    )
    assert r.status_code == 303
    for page in ("/admin/users", "/admin/audit"):
        for cursor in BAD_CURSORS:
            r = client.get(page, params={"cursor": cursor}, headers=HTML)
            assert r.status_code in (200, 422), (page, cursor, r.status_code)
            assert r.headers["content-type"].startswith("text/html")


# -- the CLI: a bad argument to every command ---------------------------------------------------

# Arguments that are wrong in a way only the command can tell (the rest get an unknown option).
CLI_BAD: dict[str, list[list[str]]] = {
    "serve": [["--port", "0"], ["--workers", "-1"]],
    "user create": [["--email", "not-an-address"], ["--email", "a@example.com", "--role", "god"]],
    "user disable": [["nobody@example.com"]],
    "user enable": [["' OR 1=1 --"]],
    "user roles": [["ana@example.com", "superuser"]],
    "user unlock": [["x" * 5000]],
    "audit search": [["--limit", "-1"], ["--limit", str(10**30)], ["--cursor", "' OR 1=1 --"]],
    "audit export": [["--format", "xml"], ["--since", "yesterday"]],
    "audit migrate": [["--to", "postgres://x/y"], ["--to", "x", "--batch-size", "0"]],
    "audit ingest-db-log": [["--tz", "Mars/Olympus_Mons", "/dev/null"]],
    "backup verify": [["/no/such/backup.tar"]],
    "backup restore": [["/no/such/backup.tar"]],
    "backup list": [["--dir", "/etc/passwd"]],  # a file, not a directory
    "db grants": [["--admin-url", "not a url", "--apply"]],
}


def _every_command() -> list[str]:
    """Every leaf command, as click finds them (loading lazily registered groups too)."""
    found: list[str] = []

    def walk(command: click.Command, path: list[str], ctx: click.Context) -> None:
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None, name
                walk(sub, [*path, name], click.Context(sub, parent=ctx, info_name=name))
        else:
            found.append(" ".join(path))

    walk(cli_group, [], click.Context(cli_group, info_name="echo-auth"))
    return sorted(found)


_DRIVER = r"""
import contextlib, io, json, sys
from echo_auth.cli.main import main
results = []
for argv in json.loads(sys.stdin.read()):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["echo-auth", *argv]
    sys.stdin = io.StringIO("correct horse battery staple\n")
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:
            code = "raised " + type(exc).__name__
    results.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue()})
sys.__stdout__.write(json.dumps(results))
"""


@pytest.mark.slow
def test_every_cli_command_refuses_a_bad_argument_in_one_line(
    settings: Settings, runtime: Runtime, tmp_path: Path
) -> None:
    make_user(runtime, "ana@example.com")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_")}
    env.update(
        {
            "ECHO_ENV": "test",
            "ECHO_DATA_DIR": str(settings.data_dir),
            "ECHO_IDENTITY_DB_URL": settings.identity_db_url,
            "ECHO_AUDIT_DB_URL": settings.audit_db_url,
            "ECHO_ARGON2_TIME_COST": "1",
            "ECHO_ARGON2_MEMORY_KIB": "1024",
            "ECHO_ARGON2_PARALLELISM": "1",
        }
    )
    commands = _every_command()
    assert len(commands) >= 20, commands
    calls: list[list[str]] = []
    for command in commands:
        words = command.split()
        calls.append([*words, "--no-such-option"])
        calls += [[*words, *bad] for bad in CLI_BAD.get(command, [])]
    # In one process, each call through main() as the console script makes it.
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER],
        input=json.dumps(calls),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    problems = []
    for result in results:
        lines = result["err"].strip().splitlines()
        if (
            result["code"] != 2
            or len(lines) != 1
            or not lines[0].startswith("echo-auth: ")
            or "Traceback" in result["err"]
            or result["out"]
        ):
            problems.append(result)
    assert not problems, json.dumps(problems, indent=1)[:6000]

    # And through the real console script, a few at once (each costs a process start).
    script = str(Path(sys.executable).with_name("echo-auth"))
    procs = [
        subprocess.Popen(
            [script, *argv],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in (["serve", "--port", "0"], ["audit", "search", "--since", "yesterday"])
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (out, err)
        assert out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith("echo-auth: ") and "Traceback" not in err
