"""Sign-up, login, me and logout through HTTP, and the events they leave in the chain."""

from __future__ import annotations

from fastapi.testclient import TestClient

from echo_auth.audit.search import EventFilter, search_events
from echo_auth.audit.verify import verify_chain
from echo_auth.db.engines import transaction
from echo_auth.runtime import Runtime
from tests.fixtures.app import PASSWORD, deliver


def _events(runtime: Runtime, **filters: str) -> list[dict]:
    with transaction(runtime.audit, write=False) as conn:
        return search_events(conn, EventFilter(**filters), limit=500).events


def test_signup_login_me_logout_are_audited(client: TestClient, runtime: Runtime) -> None:
    r = client.post("/v1/signup", json={"email": "Ana@Example.com", "password": PASSWORD})
    assert r.status_code == 201, r.text
    user_id = r.json()["user_id"]

    r = client.post("/v1/login", json={"email": "ana@example.com", "password": PASSWORD})
    assert r.status_code == 200, r.text
    body = r.json()
    token = body["session_token"]
    assert body["user"]["id"] == user_id
    assert body["user"]["email"] == "ana@example.com"
    assert "echo_session" in r.cookies

    r = client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    me = r.json()
    assert me["roles"] == ["user"] and me["email_verified"] is False and me["mfa_enabled"] is False
    assert set(me) == {"id", "email", "email_verified", "roles", "mfa_enabled", "created_at"}

    r = client.post("/v1/logout", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 204
    r = client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"

    assert deliver(runtime) >= 3
    signed_up = _events(runtime, action="user.signed_up")
    assert [(e["actor"]["id"], e["target"]["id"], e["outcome"]) for e in signed_up] == [
        (user_id, user_id, "success")
    ]
    login = _events(runtime, action="auth.login.succeeded")
    assert login[0]["actor"] == {"type": "user", "id": user_id, "label": "ana@example.com"}
    assert login[0]["source"]["ip"] == "testclient"
    assert login[0]["request_id"]
    logout = _events(runtime, action="auth.logout")
    assert logout[0]["outcome"] == "success" and logout[0]["target"]["type"] == "session"

    with transaction(runtime.audit, write=False) as conn:
        report = verify_chain(conn)
    assert report.intact, report.as_dict()
    # No secret in any stored event.
    with transaction(runtime.audit, write=False) as conn:
        everything = search_events(conn, EventFilter(), limit=500).events
    blob = repr(everything)
    assert PASSWORD not in blob and token not in blob


def test_unknown_email_and_wrong_password_answer_alike(
    client: TestClient, runtime: Runtime
) -> None:
    client.post("/v1/signup", json={"email": "bo@example.com", "password": PASSWORD})
    wrong = client.post(
        "/v1/login", json={"email": "bo@example.com", "password": "not the password"}
    )
    unknown = client.post("/v1/login", json={"email": "nobody@example.com", "password": "x" * 20})
    assert wrong.status_code == unknown.status_code == 401
    strip = lambda r: {k: v for k, v in r.json().items() if k != "request_id"}  # noqa: E731
    assert strip(wrong) == strip(unknown)
    assert wrong.headers["content-type"] == unknown.headers["content-type"]

    deliver(runtime)
    failed = _events(runtime, action="auth.login.failed")
    reasons = sorted(e["reason"] for e in failed)
    assert reasons == ["bad_password", "unknown_user"]
    assert {e["outcome"] for e in failed} == {"failure"}


def test_signup_with_taken_email_looks_like_success(client: TestClient, runtime: Runtime) -> None:
    first = client.post("/v1/signup", json={"email": "cy@example.com", "password": PASSWORD})
    again = client.post("/v1/signup", json={"email": "CY@example.com", "password": PASSWORD + "!"})
    assert first.status_code == again.status_code == 201
    assert first.json()["user_id"] != again.json()["user_id"]
    deliver(runtime)
    outcomes = sorted(
        (e["outcome"], e["reason"]) for e in _events(runtime, action="user.signed_up")
    )
    assert outcomes == [("failure", "email_taken"), ("success", None)]
