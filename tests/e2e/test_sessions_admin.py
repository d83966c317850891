"""Sessions, password change and the admin API through HTTP, with their events."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from echo_auth.identity.provisioning import create_user_by_operator
from echo_auth.runtime import Runtime, operator_actor
from tests.fixtures.app import PASSWORD, deliver
from tests.fixtures.events import all_stored_text, events_of

NEW_PASSWORD = "a different long passphrase 42"


def _login(client: TestClient, email: str, password: str = PASSWORD, ua: str = "pytest") -> str:
    r = client.post(
        "/v1/login", json={"email": email, "password": password}, headers={"User-Agent": ua}
    )
    assert r.status_code == 200, r.text
    return str(r.json()["session_token"])


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def admin_token(client: TestClient, runtime: Runtime) -> str:
    actor, source = operator_actor()
    create_user_by_operator(runtime.auth, "root@example.com", PASSWORD, ["admin"], actor, source)
    client.cookies.clear()
    return _login(client, "root@example.com")


def _signup(client: TestClient, email: str) -> str:
    r = client.post("/v1/signup", json={"email": email, "password": PASSWORD})
    assert r.status_code == 201
    return str(r.json()["user_id"])


def test_sessions_list_revoke_and_revoke_others(client: TestClient, runtime: Runtime) -> None:
    user_id = _signup(client, "sam@example.com")
    phone = _login(client, "sam@example.com", ua="Mozilla/5.0 (iPhone) Safari/605")
    laptop = _login(client, "sam@example.com", ua="Mozilla/5.0 (X11; Linux) Firefox/130.0")
    tablet = _login(client, "sam@example.com", ua="curl/8")
    client.cookies.clear()
    listed = client.get("/v1/me/sessions", headers=_bearer(laptop)).json()["sessions"]
    assert len(listed) == 3
    current = [s for s in listed if s["current"]]
    assert len(current) == 1 and current[0]["device"] == "Firefox on Linux"
    assert {s["device"] for s in listed} >= {"Safari on iOS", "curl"}
    phone_id = next(s["id"] for s in listed if s["device"] == "Safari on iOS")

    assert client.delete(f"/v1/me/sessions/{phone_id}", headers=_bearer(laptop)).status_code == 204
    assert client.get("/v1/me", headers=_bearer(phone)).status_code == 401
    # Someone else's session id is not found, not revoked.
    other = _signup(client, "eve@example.com")
    eve = _login(client, "eve@example.com")
    client.cookies.clear()
    tablet_id = next(
        s["id"]
        for s in client.get("/v1/me/sessions", headers=_bearer(tablet)).json()["sessions"]
        if s["current"]
    )
    assert client.delete(f"/v1/me/sessions/{tablet_id}", headers=_bearer(eve)).status_code == 404
    assert client.get("/v1/me", headers=_bearer(tablet)).status_code == 200

    r = client.post("/v1/me/sessions/revoke-others", headers=_bearer(laptop))
    assert r.status_code == 200 and r.json() == {"revoked": 1}
    assert client.get("/v1/me", headers=_bearer(tablet)).status_code == 401
    assert client.get("/v1/me", headers=_bearer(laptop)).status_code == 200

    deliver(runtime)
    revoked = events_of(runtime, "session.revoked")
    assert [(e["reason"], e["actor"]["id"]) for e in revoked] == [
        ("user", user_id),
        ("revoke_others", user_id),
    ]
    assert other != user_id


def test_password_change_revokes_other_sessions(client: TestClient, runtime: Runtime) -> None:
    _signup(client, "pat@example.com")
    keep = _login(client, "pat@example.com")
    other = _login(client, "pat@example.com")
    client.cookies.clear()
    wrong = client.post(
        "/v1/me/password",
        json={"current_password": "not it at all", "new_password": NEW_PASSWORD},
        headers=_bearer(keep),
    )
    assert wrong.status_code == 401 and wrong.json()["code"] == "invalid_credentials"
    weak = client.post(
        "/v1/me/password",
        json={"current_password": PASSWORD, "new_password": "short"},
        headers=_bearer(keep),
    )
    assert weak.status_code == 422 and weak.json()["code"] == "weak_password"
    ok = client.post(
        "/v1/me/password",
        json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
        headers=_bearer(keep),
    )
    assert ok.status_code == 204
    assert client.get("/v1/me", headers=_bearer(keep)).status_code == 200
    assert client.get("/v1/me", headers=_bearer(other)).status_code == 401
    assert (
        client.post(
            "/v1/login", json={"email": "pat@example.com", "password": PASSWORD}
        ).status_code
        == 401
    )
    _login(client, "pat@example.com", NEW_PASSWORD)
    deliver(runtime)
    changed = events_of(runtime, "password.changed")
    assert [(e["outcome"], e["reason"]) for e in changed] == [
        ("failure", "bad_password"),
        ("success", None),
    ]
    assert changed[1]["metadata"]["other_sessions_revoked"] == 1
    stored = all_stored_text(runtime)
    assert NEW_PASSWORD not in stored and PASSWORD not in stored and keep not in stored


def test_admin_api(client: TestClient, runtime: Runtime, admin_token: str) -> None:
    admin = _bearer(admin_token)
    ids = [_signup(client, f"user{i}@example.com") for i in range(5)]
    victim = _login(client, "user1@example.com")
    client.cookies.clear()

    page1 = client.get("/v1/admin/users?limit=4", headers=admin).json()
    assert len(page1["users"]) == 4 and page1["next_cursor"]
    page2 = client.get(f"/v1/admin/users?limit=4&cursor={page1['next_cursor']}", headers=admin)
    emails = [u["email"] for u in page1["users"] + page2.json()["users"]]
    assert len(emails) == len(set(emails)) == 6
    found = client.get("/v1/admin/users?q=USER3", headers=admin).json()["users"]
    assert [u["email"] for u in found] == ["user3@example.com"]
    assert client.get("/v1/admin/users?cursor=forged", headers=admin).status_code == 422
    assert client.get("/v1/admin/users?limit=0", headers=admin).status_code == 422

    detail = client.get(f"/v1/admin/users/{ids[1]}", headers=admin).json()
    assert detail["live_sessions"] == 1 and detail["disabled"] is False
    assert client.get("/v1/admin/users/nope", headers=admin).status_code == 404

    r = client.post(f"/v1/admin/users/{ids[1]}/disable", headers=admin)
    assert r.status_code == 200 and r.json() == {"revoked": 1}
    assert client.get("/v1/me", headers=_bearer(victim)).status_code == 401
    refused = client.post("/v1/login", json={"email": "user1@example.com", "password": PASSWORD})
    assert refused.status_code == 403 and refused.json()["code"] == "account_disabled"
    assert client.post(f"/v1/admin/users/{ids[1]}/enable", headers=admin).status_code == 204
    _login(client, "user1@example.com")
    client.cookies.clear()

    r = client.put(f"/v1/admin/users/{ids[2]}/roles", json={"roles": ["auditor"]}, headers=admin)
    assert r.status_code == 200 and r.json()["roles"] == ["auditor", "user"]
    bad = client.put(f"/v1/admin/users/{ids[2]}/roles", json={"roles": ["root"]}, headers=admin)
    assert bad.status_code == 422
    r = client.delete(f"/v1/admin/users/{ids[1]}/sessions", headers=admin)
    assert r.status_code == 200 and r.json()["revoked"] == 1

    # The last admin cannot be disabled or demoted.
    me = client.get("/v1/me", headers=admin).json()["id"]
    assert client.post(f"/v1/admin/users/{me}/disable", headers=admin).json()["code"] == (
        "last_admin"
    )
    demote = client.put(f"/v1/admin/users/{me}/roles", json={"roles": []}, headers=admin)
    assert demote.status_code == 409 and demote.json()["code"] == "last_admin"

    # A non-admin (an auditor included) gets 403, and the refusal is recorded.
    auditor = _login(client, "user2@example.com")
    client.cookies.clear()
    assert client.get("/v1/admin/users", headers=_bearer(auditor)).status_code == 403

    deliver(runtime)
    actions = [e["action"] for e in events_of(runtime) if e["action"].startswith("admin.")]
    for expected in (
        "admin.user.listed",
        "admin.user.viewed",
        "admin.user.disabled",
        "admin.user.enabled",
        "admin.user.roles_changed",
        "admin.user.sessions_revoked",
    ):
        assert expected in actions
    disabled = events_of(runtime, "admin.user.disabled")[0]
    assert disabled["actor"]["type"] == "admin" and disabled["actor"]["id"] == me
    assert disabled["target"] == {"type": "user", "id": ids[1]}
    denied = events_of(runtime, "access.denied")
    assert denied and denied[-1]["actor"]["id"] == ids[2]


def test_cli_user_disable_roles_are_audited(runtime: Runtime, client: TestClient) -> None:
    _signup(client, "cli@example.com")
    s = runtime.settings
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
        "ECHO_DATA_DIR": str(s.data_dir),
        "ECHO_IDENTITY_DB_URL": s.identity_db_url,
        "ECHO_AUDIT_DB_URL": s.audit_db_url,
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "echo_auth", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert run("user", "roles", "cli@example.com", "auditor").returncode == 0
    assert run("user", "disable", "cli@example.com").returncode == 0
    missing = run("user", "disable", "ghost@example.com")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert run("user", "enable", "cli@example.com").returncode == 0
    deliver(runtime)
    for action in ("admin.user.roles_changed", "admin.user.disabled", "admin.user.enabled"):
        event = events_of(runtime, action)[0]
        assert event["actor"]["type"] == "admin" and "@" in event["actor"]["id"]
