"""The HTTP surface's promises, end to end over the real databases.

Every error is ``application/problem+json`` with ``status``, ``code``, ``detail`` and the
``request_id`` that the ``X-Request-ID`` header carries; bodies are capped; sessions work
by bearer token or by the HttpOnly cookie, and cookie writes refuse foreign origins; the
audit log can be searched (filters, newest first, cursor pages) by admins and auditors
only, and every read of it, like every refusal, is itself an audit event.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx2 import Response

from echo_auth.app import create_app
from echo_auth.audit.search import EventFilter, search_events
from echo_auth.db.engines import transaction
from echo_auth.identity.provisioning import create_user_by_operator
from echo_auth.runtime import Runtime, operator_actor
from tests.fixtures.app import PASSWORD, deliver

BASE_URL = "http://127.0.0.1:8000"
PROBLEM_JSON = "application/problem+json"
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
PIPELINE_FIELDS = {
    "outbox_depth",
    "oldest_undelivered_age_s",
    "delivered",
    "chain_head_seq",
    "dead_letters",
    "audit_db_reachable",
}


# -- helpers ------------------------------------------------------------------------------


def assert_problem(r: Response, status: int, code: str | None = None) -> dict[str, Any]:
    """``r`` is an RFC 9457 problem with the given status (and code) and its request id."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].split(";")[0].strip() == PROBLEM_JSON, r.headers
    body = r.json()
    assert body["status"] == status
    assert isinstance(body["code"], str) and body["code"]
    if code is not None:
        assert body["code"] == code, body
    assert isinstance(body["detail"], str) and body["detail"].strip()
    assert body["request_id"] == r.headers["x-request-id"]
    assert REQUEST_ID.match(body["request_id"])
    assert "Traceback" not in r.text
    return body


def assert_security_headers(r: Response) -> None:
    h = r.headers
    assert h["x-frame-options"] == "DENY"
    assert h["x-content-type-options"] == "nosniff"
    assert "no-store" in h["cache-control"]
    assert "frame-ancestors 'none'" in h["content-security-policy"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def login(client: TestClient, email: str, password: str = PASSWORD) -> str:
    """Log in and return the session token; the client keeps no cookie afterwards."""
    r = client.post("/v1/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    client.cookies.clear()
    return str(r.json()["session_token"])


def make_operator_user(runtime: Runtime, email: str, roles: list[str]) -> str:
    actor, source = operator_actor()
    return create_user_by_operator(runtime.auth, email, PASSWORD, roles, actor, source).id


def make_admin(client: TestClient, runtime: Runtime, email: str = "root@example.com") -> str:
    make_operator_user(runtime, email, ["admin"])
    return login(client, email)


def signup(client: TestClient, email: str) -> str:
    r = client.post("/v1/signup", json={"email": email, "password": PASSWORD})
    assert r.status_code == 201, r.text
    return str(r.json()["user_id"])


def stored_events(runtime: Runtime, **filters: str) -> list[dict[str, Any]]:
    """Straight from the audit database, independent of the HTTP layer under test."""
    with transaction(runtime.audit, write=False) as conn:
        return search_events(conn, EventFilter(**filters), limit=500).events


def login_works(client: TestClient, email: str, password: str) -> bool:
    r = client.post("/v1/login", json={"email": email, "password": password})
    client.cookies.clear()
    return r.status_code == 200


def utc_stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- malformed input ----------------------------------------------------------------------


def test_malformed_bodies_are_validation_errors(client: TestClient) -> None:
    for raw in (b"{bad", b'{"email": "a@example.com", "password": ', b"{}}", b"nul\x00"):
        r = client.post("/v1/signup", content=raw, headers={"content-type": "application/json"})
        assert_problem(r, 422, "validation_error")

    # Missing fields are named.
    body = assert_problem(client.post("/v1/signup", json={}), 422, "validation_error")
    assert {e["field"] for e in body["errors"]} == {"email", "password"}
    body = assert_problem(
        client.post("/v1/login", json={"email": "a@example.com"}), 422, "validation_error"
    )
    assert [e["field"] for e in body["errors"]] == ["password"]
    # A JSON value that is not an object, and an empty body.
    assert_problem(client.post("/v1/signup", json=["a@example.com", PASSWORD]), 422)
    assert_problem(client.post("/v1/signup", json=None), 422)
    r = client.post("/v1/signup", content=b"", headers={"content-type": "application/json"})
    assert_problem(r, 422, "validation_error")

    # A body that is JSON but not declared so.
    email = "ctype@example.com"
    payload = json.dumps({"email": email, "password": PASSWORD}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        r = client.post("/v1/signup", content=payload, headers={"content-type": ctype})
        assert r.status_code in (415, 422), r.text
        assert_problem(r, r.status_code)
    # Nothing was created by any of them.
    assert not login_works(client, email, PASSWORD)


def test_body_that_is_not_utf8_is_validation_error(client: TestClient) -> None:
    r = client.post(
        "/v1/signup", content=b'{"email": "\xff\xfe"}', headers={"content-type": "application/json"}
    )
    assert_problem(r, 422, "validation_error")


def test_body_over_the_limit_is_413_and_at_the_limit_is_not(
    client: TestClient, runtime: Runtime
) -> None:
    limit = runtime.settings.max_body_bytes
    email = "big@example.com"
    prefix = json.dumps({"email": email, "password": PASSWORD})[:-1] + ', "pad": "'
    over = (prefix + "x" * (limit + 1 - len(prefix) - 2) + '"}').encode()
    assert len(over) == limit + 1
    r = client.post("/v1/signup", content=over, headers={"content-type": "application/json"})
    assert r.request.headers["content-length"] == str(limit + 1)
    body = assert_problem(r, 413, "payload_too_large")
    assert str(limit) in body["detail"]
    assert_security_headers(r)
    assert not login_works(client, email, PASSWORD)

    # Exactly at the limit passes the gate (and the sign-up goes through).
    at = (prefix + "x" * (limit - len(prefix) - 2) + '"}').encode()
    assert len(at) == limit
    r = client.post("/v1/signup", content=at, headers={"content-type": "application/json"})
    assert r.status_code == 201, r.text
    assert login_works(client, email, PASSWORD)

    # A streamed body (no Content-Length) under the limit is fine too.
    email = "chunked@example.com"
    payload = json.dumps({"email": email, "password": PASSWORD}).encode()
    r = client.post(
        "/v1/signup", content=_chunks(payload, 16), headers={"content-type": "application/json"}
    )
    assert "content-length" not in r.request.headers
    assert r.status_code == 201, r.text
    assert login_works(client, email, PASSWORD)


def _chunks(data: bytes, size: int = 8192) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_streamed_body_over_the_limit_is_413(client: TestClient, runtime: Runtime) -> None:
    limit = runtime.settings.max_body_bytes
    payload = b'{"email": "s@example.com", "password": "' + b"x" * (limit + 10) + b'"}'
    r = client.post(
        "/v1/signup", content=_chunks(payload), headers={"content-type": "application/json"}
    )
    assert "content-length" not in r.request.headers
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert_problem(r, 413, "payload_too_large")


def test_weak_password_on_signup(client: TestClient) -> None:
    for short in ("", "x" * 11, "correct hor"):
        r = client.post("/v1/signup", json={"email": "weak@example.com", "password": short})
        assert r.status_code == 422, r.text
        assert_problem(r, 422)
    body = assert_problem(
        client.post("/v1/signup", json={"email": "weak@example.com", "password": "x" * 11}),
        422,
        "weak_password",
    )
    assert body["errors"][0]["field"] == "password"
    assert not login_works(client, "weak@example.com", "x" * 11)
    # Twelve characters is enough.
    r = client.post("/v1/signup", json={"email": "weak@example.com", "password": "y" * 12})
    assert r.status_code == 201, r.text
    assert login_works(client, "weak@example.com", "y" * 12)


def test_invalid_email_and_nul_bytes_are_refused(client: TestClient, runtime: Runtime) -> None:
    for email in ("not-an-email", "a@", "@example.com", "a b@example.com", " ", "a" * 400):
        r = client.post("/v1/signup", json={"email": email, "password": PASSWORD})
        body = assert_problem(r, 422, "validation_error")
        assert any(e["field"] == "email" for e in body["errors"]), body

    for email in ("ana\x00@example.com", "ana@example.com\x00", "\x00"):
        r = client.post("/v1/signup", json={"email": email, "password": PASSWORD})
        body = assert_problem(r, 422, "validation_error")
        assert body["errors"][0]["field"] == "email"
        r = client.post("/v1/login", json={"email": email, "password": PASSWORD})
        assert r.status_code in (401, 422), r.text
        assert_problem(r, r.status_code)
    r = client.post("/v1/signup", json={"email": "nul@example.com", "password": PASSWORD + "\x00"})
    assert_problem(r, 422, "weak_password")
    assert not login_works(client, "ana@example.com", PASSWORD)
    deliver(runtime)
    assert stored_events(runtime, action="user.signed_up") == []


def test_huge_passwords_never_cause_a_5xx(client: TestClient) -> None:
    signup(client, "huge@example.com")
    for length in (100_000, 5_000, 2_000):
        for path in ("/v1/signup", "/v1/login"):
            r = client.post(path, json={"email": "huge@example.com", "password": "p" * length})
            assert r.status_code < 500, (path, length, r.status_code)
            if path == "/v1/signup" or length > 4096:
                assert r.status_code in (413, 422), (path, length, r.text)
            else:
                # Within the body limit and the field limit: an ordinary wrong password.
                assert r.status_code == 401, r.text
            assert_problem(r, r.status_code)
    assert login_works(client, "huge@example.com", PASSWORD)


# -- routing and authentication -----------------------------------------------------------


def test_unknown_route_and_wrong_method_are_problems(client: TestClient) -> None:
    for path in ("/nope", "/v1/nope", "/v1/audit/nope/deeper"):
        assert_problem(client.get(path), 404, "not_found")
    r = client.delete("/v1/me")
    assert_problem(r, 405, "method_not_allowed")
    assert "GET" in r.headers["allow"]
    r = client.get("/v1/login")
    assert_problem(r, 405, "method_not_allowed")
    assert "POST" in r.headers["allow"]
    assert_security_headers(r)


def test_me_without_or_with_a_bogus_token_is_401(client: TestClient) -> None:
    signup(client, "me@example.com")
    real = login(client, "me@example.com")
    attempts: list[dict[str, str]] = [
        {},
        bearer("bogus"),
        bearer("x" * 5000),
        bearer(real + "x"),
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {real}"},
        {"Authorization": real},
        {"Cookie": "echo_session=bogus"},
    ]
    for headers in attempts:
        r = client.get("/v1/me", headers=headers)
        assert_problem(r, 401, "not_authenticated")
        assert r.headers["www-authenticate"].lower().startswith("bearer"), headers
        assert_security_headers(r)
    assert client.get("/v1/me", headers=bearer(real)).status_code == 200


def test_plain_user_is_forbidden_from_the_audit_log_and_it_is_recorded(
    client: TestClient, runtime: Runtime
) -> None:
    user_id = signup(client, "plain@example.com")
    token = login(client, "plain@example.com")
    paths = [
        "/v1/audit/events",
        "/v1/audit/events?action=auth.*",
        "/v1/audit/pipeline",
        "/v1/audit/events/0190b5c3-0000-7000-8000-000000000000",
    ]
    request_ids = []
    for path in paths:
        r = client.get(path, headers=bearer(token))
        assert_problem(r, 403, "forbidden")
        request_ids.append(r.headers["x-request-id"])

    # A user with only the auditor role may read; that is the positive control.
    make_operator_user(runtime, "auditor@example.com", ["auditor"])
    auditor = login(client, "auditor@example.com")
    assert client.get("/v1/audit/events", headers=bearer(auditor)).status_code == 200
    assert client.get("/v1/audit/pipeline", headers=bearer(auditor)).status_code == 200

    deliver(runtime)
    denied = stored_events(runtime, action="access.denied")
    assert len(denied) == len(paths)
    assert sorted(e["request_id"] for e in denied) == sorted(request_ids)
    for event in denied:
        assert event["outcome"] == "denied"
        assert event["actor"]["type"] == "user" and event["actor"]["id"] == user_id
        assert event["metadata"]["route"].startswith("/v1/audit/")
        assert set(event["metadata"]["needs"]) == {"auditor", "admin"}
    # The refused reads were not recorded as searches.
    assert stored_events(runtime, action="audit.searched", actor=user_id) == []


def test_request_id_is_echoed_when_valid_and_replaced_when_junk(
    client: TestClient, runtime: Runtime
) -> None:
    for good in ("abc-123", "trace.id:42_x", "A" * 64):
        r = client.get("/healthz", headers={"X-Request-ID": good})
        assert r.headers["x-request-id"] == good
        r = client.get("/nope", headers={"X-Request-ID": good})
        assert assert_problem(r, 404)["request_id"] == good
    generated = set()
    for junk in ("", "has space", "<script>", "A" * 65, "semi;colon", "é"):
        r = client.get("/nope", headers={"X-Request-ID": junk.encode("utf-8")})
        rid = assert_problem(r, 404)["request_id"]
        assert rid != junk and REQUEST_ID.match(rid)
        generated.add(rid)
    r = client.get("/healthz")
    assert REQUEST_ID.match(r.headers["x-request-id"])
    generated.add(r.headers["x-request-id"])
    assert len(generated) == 7  # fresh each time

    # The id a client sends is the one its audit event carries.
    signup(client, "rid@example.com")
    r = client.post(
        "/v1/login",
        json={"email": "rid@example.com", "password": PASSWORD},
        headers={"X-Request-ID": "client-trace-7"},
    )
    assert r.status_code == 200
    deliver(runtime)
    [event] = stored_events(runtime, action="auth.login.succeeded")
    assert event["request_id"] == "client-trace-7"


def test_security_headers_on_every_kind_of_answer(client: TestClient, runtime: Runtime) -> None:
    big = b"x" * (runtime.settings.max_body_bytes + 1)
    answers = [
        client.get("/healthz"),
        client.get("/readyz"),
        client.get("/nope"),
        client.get("/v1/me"),
        client.post("/v1/signup", json={}),
        client.post("/v1/signup", content=big, headers={"content-type": "application/json"}),
    ]
    assert [r.status_code for r in answers] == [200, 200, 404, 401, 422, 413]
    for r in answers:
        assert_security_headers(r)


# -- cookies ------------------------------------------------------------------------------


def _cookie_attributes(r: Response) -> tuple[str, list[str]]:
    [line] = [c for c in r.headers.get_list("set-cookie") if c.startswith("echo_session=")]
    value, *attrs = [part.strip() for part in line.split(";")]
    return value.split("=", 1)[1], [a.lower() for a in attrs]


def test_login_cookie_is_httponly_lax_and_alone_authenticates(
    client: TestClient, runtime: Runtime
) -> None:
    user_id = signup(client, "cookie@example.com")
    r = client.post("/v1/login", json={"email": "cookie@example.com", "password": PASSWORD})
    assert r.status_code == 200
    value, attrs = _cookie_attributes(r)
    assert value == r.json()["session_token"]
    assert "httponly" in attrs
    assert "samesite=lax" in attrs
    assert "path=/" in attrs
    assert "secure" not in attrs  # the base URL is http
    client.cookies.clear()

    # The cookie alone, no Authorization header.
    r = client.get("/v1/me", headers={"Cookie": f"echo_session={value}"})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == user_id

    # Behind an https base URL the cookie is Secure as well.
    https = Runtime(runtime.settings.model_copy(update={"base_url": "https://id.example.com"}))
    try:
        with TestClient(create_app(https.settings, runtime=https), base_url=BASE_URL) as tls:
            r = tls.post("/v1/login", json={"email": "cookie@example.com", "password": PASSWORD})
            assert r.status_code == 200
            _, attrs = _cookie_attributes(r)
            assert "secure" in attrs and "httponly" in attrs and "samesite=lax" in attrs
    finally:
        https.close()


def test_cookie_logout_refuses_a_foreign_origin(client: TestClient, runtime: Runtime) -> None:
    signup(client, "csrf@example.com")
    r = client.post("/v1/login", json={"email": "csrf@example.com", "password": PASSWORD})
    value, _ = _cookie_attributes(r)
    client.cookies.clear()
    cookie = {"Cookie": f"echo_session={value}"}

    for hostile in (
        {"Origin": "https://evil.example"},
        {"Origin": "http://127.0.0.1:8001"},
        {"Origin": "https://127.0.0.1:8000"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        r = client.post("/v1/logout", headers={**cookie, **hostile})
        assert_problem(r, 403, "forbidden")
        # The session survived the attempt.
        assert client.get("/v1/me", headers=cookie).status_code == 200, hostile

    r = client.post("/v1/logout", headers={**cookie, "Origin": BASE_URL})
    assert r.status_code == 204, r.text
    assert client.get("/v1/me", headers=cookie).status_code == 401

    deliver(runtime)
    assert len(stored_events(runtime, action="auth.logout")) == 1


# -- audit search over HTTP ---------------------------------------------------------------


@pytest.fixture
def admin(client: TestClient, runtime: Runtime) -> dict[str, str]:
    """An admin logged in over HTTP; returns its bearer header."""
    return bearer(make_admin(client, runtime))


def search(client: TestClient, headers: dict[str, str], **params: Any) -> dict[str, Any]:
    r = client.get("/v1/audit/events", params={"limit": 500, **params}, headers=headers)
    assert r.status_code == 200, r.text
    page: dict[str, Any] = r.json()
    seqs = [e["seq"] for e in page["events"]]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == len(seqs), "newest first"
    return page


def test_audit_search_filters(client: TestClient, runtime: Runtime, admin: dict[str, str]) -> None:
    elsewhere = TestClient(client.app, base_url=BASE_URL, client=("198.51.100.7", 40000))
    ana = signup(client, "ana@example.com")
    bo = signup(elsewhere, "bo@example.org")
    login(client, "ana@example.com")
    for _ in range(2):
        r = elsewhere.post("/v1/login", json={"email": "bo@example.org", "password": "wrong" * 3})
        assert r.status_code == 401
    r = client.post("/v1/login", json={"email": "ghost@example.net", "password": "w" * 12})
    assert r.status_code == 401
    assert deliver(runtime) > 0
    time.sleep(0.01)
    middle = datetime.now(UTC)
    time.sleep(0.01)
    login(elsewhere, "bo@example.org")
    r = client.post("/v1/login", json={"email": "ana@example.com", "password": "wrong" * 3})
    assert r.status_code == 401
    assert deliver(runtime) > 0

    everything = search(client, admin)["events"]
    assert len(everything) >= 10
    assert everything == stored_events(runtime)

    def check(params: dict[str, str], keep: Callable[[dict[str, Any]], bool]) -> None:
        expected = [e["event_id"] for e in everything if keep(e)]
        assert expected and len(expected) < len(everything), f"weak case {params}"
        got = [e["event_id"] for e in search(client, admin, **params)["events"]]
        assert got == expected, params

    stamp = utc_stamp(middle)
    check({"actor": ana}, lambda e: e["actor"]["id"] == ana)
    check({"actor": "bo@example.org"}, lambda e: e["actor"]["label"] == "bo@example.org")
    check({"actor": "ghost@example.net"}, lambda e: e["actor"]["label"] == "ghost@example.net")
    check({"action": "auth.login.failed"}, lambda e: e["action"] == "auth.login.failed")
    check({"action": "auth.*"}, lambda e: e["action"].startswith("auth."))
    check({"action": "user.*"}, lambda e: e["action"].startswith("user."))
    check({"target": bo}, lambda e: (e["target"] or {}).get("id") == bo)
    check({"outcome": "failure"}, lambda e: e["outcome"] == "failure")
    check({"outcome": "success"}, lambda e: e["outcome"] == "success")
    check({"ip": "198.51.100.7"}, lambda e: e["source"]["ip"] == "198.51.100.7")
    check({"since": stamp}, lambda e: e["occurred_at"] >= stamp)
    check({"until": stamp}, lambda e: e["occurred_at"] < stamp)
    check({"q": "example.org"}, lambda e: "example.org" in json.dumps(e))
    check(
        {"action": "auth.login.*", "outcome": "failure", "ip": "198.51.100.7"},
        lambda e: (
            e["action"].startswith("auth.login.")
            and e["outcome"] == "failure"
            and e["source"]["ip"] == "198.51.100.7"
        ),
    )
    check(
        {"actor": ana, "since": stamp},
        lambda e: e["actor"]["id"] == ana and e["occurred_at"] >= stamp,
    )
    # Exact action means exact; LIKE wildcards in a prefix are literal.
    for params in ({"action": "auth.login"}, {"action": "user%*"}, {"action": "auth_*"}):
        assert search(client, admin, **params)["events"] == [], params
    assert search(client, admin, q="%")["events"] == []
    assert search(client, admin, actor="nobody@example.com")["events"] == []


def test_audit_cursor_pagination(
    client: TestClient, runtime: Runtime, admin: dict[str, str]
) -> None:
    signup(client, "pages@example.com")
    # Each address fails once, so no per-account throttle kicks in.
    for i in range(11):
        r = client.post("/v1/login", json={"email": f"nobody{i}@example.com", "password": "x" * 15})
        assert r.status_code == 401, r.text
    deliver(runtime)
    everything = search(client, admin)["events"]
    assert len(everything) >= 14

    def walk(limit: int, **params: str) -> tuple[list[int], int]:
        seqs: list[int] = []
        cursor: str | None = None
        pages = 0
        while True:
            extra = {"cursor": cursor} if cursor else {}
            page = search(client, admin, limit=limit, **params, **extra)
            assert len(page["events"]) <= limit
            seqs += [e["seq"] for e in page["events"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                return seqs, pages
            assert len(page["events"]) == limit
            assert pages < 100

    full = [e["seq"] for e in everything]
    for limit in (1, 4, 5, 7):
        seqs, pages = walk(limit)
        assert seqs == full, limit  # no duplicates, no gaps, same order
        assert pages == -(-len(full) // limit)

    failed = [e["seq"] for e in everything if e["action"] == "auth.login.failed"]
    assert len(failed) == 11
    assert walk(4, action="auth.login.failed") == (failed, 3)
    # A page exactly the size of the rest says there is nothing more.
    assert search(client, admin, action="auth.login.failed", limit=11)["next_cursor"] is None
    page = search(client, admin, action="auth.login.failed", limit=10)
    rest = search(client, admin, action="auth.login.failed", limit=10, cursor=page["next_cursor"])
    assert [e["seq"] for e in rest["events"]] == failed[10:] and rest["next_cursor"] is None

    # New events arriving while paging do not shift the pages already handed out.
    first = search(client, admin, limit=5)
    for i in range(3):
        signup(client, f"late{i}@example.com")
    deliver(runtime)
    second = search(client, admin, limit=5, cursor=first["next_cursor"])
    assert [e["seq"] for e in first["events"] + second["events"]] == full[:10]


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def test_audit_bad_limit_and_forged_cursor_are_422(
    client: TestClient, runtime: Runtime, admin: dict[str, str]
) -> None:
    deliver(runtime)
    for limit in ("0", "-1", str(10**9), str(10**30), "abc", "1.5"):
        r = client.get("/v1/audit/events", params={"limit": limit}, headers=admin)
        assert_problem(r, 422, "validation_error")
    forged = [
        "garbage!",
        "%%%",
        _b64("s0"),
        _b64("s-1"),
        _b64("x5"),
        _b64("s1 "),
        _b64("s"),
        "A" * 65,
    ]
    for cursor in forged:
        r = client.get("/v1/audit/events", params={"cursor": cursor}, headers=admin)
        assert_problem(r, 422, "validation_error")
    for params in ({"since": "yesterday"}, {"until": "2026-13-01"}, {"outcome": "maybe"}):
        assert_problem(client.get("/v1/audit/events", params=params, headers=admin), 422)


def test_audit_cursor_beyond_bigint_is_422(runtime: Runtime) -> None:
    app = create_app(runtime.settings, runtime=runtime)
    with TestClient(app, base_url=BASE_URL, raise_server_exceptions=False) as client:
        headers = bearer(make_admin(client, runtime))
        deliver(runtime)
        for cursor in (_b64("s" + "9" * 19), _b64("s" + "9" * 23)):
            r = client.get("/v1/audit/events", params={"cursor": cursor}, headers=headers)
            assert_problem(r, 422, "validation_error")


def test_audit_event_by_id(client: TestClient, runtime: Runtime, admin: dict[str, str]) -> None:
    signup(client, "one@example.com")
    deliver(runtime)
    everything = search(client, admin)["events"]
    for listed in everything:
        r = client.get(f"/v1/audit/events/{listed['event_id']}", headers=admin)
        assert r.status_code == 200, r.text
        event = r.json()
        assert event == listed
        assert isinstance(event["seq"], int) and re.fullmatch(r"[0-9a-f]{64}", event["hash"])
    by_seq = {e["seq"]: e for e in everything}
    for seq, event in by_seq.items():
        if seq > 1:
            assert event["prev_hash"] == by_seq[seq - 1]["hash"]

    unknown = "0190b5c3-0000-7000-8000-000000000000"
    assert_problem(client.get(f"/v1/audit/events/{unknown}", headers=admin), 404, "not_found")
    assert_problem(client.get(f"/v1/audit/events/{'x' * 37}", headers=admin), 422)


def test_audit_pipeline_fields(client: TestClient, runtime: Runtime, admin: dict[str, str]) -> None:
    delivered = deliver(runtime)
    assert delivered > 0
    r = client.get("/v1/audit/pipeline", headers=admin)
    assert r.status_code == 200, r.text
    status = r.json()
    assert set(status) == PIPELINE_FIELDS
    head = stored_events(runtime)[0]["seq"]
    assert status == {
        "outbox_depth": 0,
        "oldest_undelivered_age_s": None,
        "delivered": head,
        "chain_head_seq": head,
        "dead_letters": 0,
        "audit_db_reachable": True,
    }
    # That read is itself queued: the next read sees it waiting.
    status = client.get("/v1/audit/pipeline", headers=admin).json()
    assert status["outbox_depth"] == 1 and status["delivered"] == head
    assert isinstance(status["oldest_undelivered_age_s"], float)
    assert 0 <= status["oldest_undelivered_age_s"] < 60


def test_every_audit_read_is_recorded(
    client: TestClient, runtime: Runtime, admin: dict[str, str]
) -> None:
    deliver(runtime)
    admin_id = client.get("/v1/me", headers=admin).json()["id"]
    some_id = stored_events(runtime)[0]["event_id"]
    unknown = "0190b5c3-0000-7000-8000-000000000000"
    reads = {
        "search": client.get(
            "/v1/audit/events", params={"action": "auth.*", "limit": 3}, headers=admin
        ),
        "search-all": client.get("/v1/audit/events", headers=admin),
        "one": client.get(f"/v1/audit/events/{some_id}", headers=admin),
        "missing": client.get(f"/v1/audit/events/{unknown}", headers=admin),
        "pipeline": client.get("/v1/audit/pipeline", headers=admin),
    }
    assert [r.status_code for r in reads.values()] == [200, 200, 200, 404, 200]
    deliver(runtime)

    def recorded(name: str, action: str) -> dict[str, Any]:
        rid = reads[name].headers["x-request-id"]
        [event] = [e for e in stored_events(runtime, action=action) if e["request_id"] == rid]
        assert event["actor"] == {"type": "user", "id": admin_id, "label": "root@example.com"}
        assert event["outcome"] == "success"
        return event

    searched = stored_events(runtime, action="audit.searched", actor=admin_id)
    assert len(searched) == 4
    event = recorded("search", "audit.searched")
    returned = len(reads["search"].json()["events"])
    assert returned >= 1
    assert event["metadata"] == {"filters": {"action": "auth.*"}, "returned": returned}
    event = recorded("search-all", "audit.searched")
    assert event["metadata"]["returned"] == len(reads["search-all"].json()["events"])
    assert recorded("one", "audit.searched")["target"] == {"type": "audit_event", "id": some_id}
    assert recorded("missing", "audit.searched")["target"] == {"type": "audit_event", "id": unknown}
    recorded("pipeline", "audit.pipeline.viewed")
