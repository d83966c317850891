"""TOTP enrolment, codes, recovery codes and removal, through HTTP and the service, on both
backends; and the events they leave (catalogued, never holding a secret or a code)."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pyotp
from fastapi.testclient import TestClient
from sqlalchemy import select

from echo_auth.audit.events import CATALOG, Source
from echo_auth.audit.search import EventFilter, search_events
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import mfa_totp, recovery_codes
from echo_auth.identity import mfa
from echo_auth.identity.users import find_by_id, format_roles, insert_user
from echo_auth.runtime import Runtime
from tests.fixtures.app import PASSWORD, deliver

RECOVERY_SHAPE = re.compile(r"[a-hjkmnp-z2-9]{5}-[a-hjkmnp-z2-9]{5}")


def _login(client: TestClient, email: str) -> dict[str, str]:
    r = client.post("/v1/signup", json={"email": email, "password": PASSWORD})
    assert r.status_code == 201, r.text
    r = client.post("/v1/login", json={"email": email, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['session_token']}"}


def _wrong_code(secret: str, at: float) -> str:
    totp = pyotp.TOTP(secret)
    near = {totp.at(at + d) for d in (-60, -30, 0, 30, 60)}
    return next(c for c in (f"{n:06d}" for n in range(1_000_000)) if c not in near)


def _events(runtime: Runtime) -> list[dict[str, Any]]:
    deliver(runtime)
    with transaction(runtime.audit, write=False) as conn:
        return search_events(conn, EventFilter(), limit=500).events


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _assert_no_secrets(events: list[dict[str, Any]], secrets: list[str], codes: list[str]) -> None:
    assert {e["action"] for e in events} <= set(CATALOG)
    leaves = [s for e in events for s in _strings(e)]
    for secret in secrets:
        variants = {secret, secret.replace("-", ""), secret.upper()}
        assert not [s for s in leaves if any(v in s for v in variants)], secret
    for code in codes:  # six digits: compared whole, as a value, not as a substring
        assert code not in leaves


def _enrolled_user(runtime: Runtime, email: str) -> tuple[str, str, list[str]]:
    """A user with a confirmed TOTP factor: (user id, secret, recovery codes)."""
    with transaction(runtime.identity) as conn:
        user = insert_user(
            conn, email=email, password_hash="x", roles=format_roles(["user"]), verified=True
        )
        enrolment = mfa.begin_enrolment(conn, user, "Echo", Source())
        codes = mfa.confirm_enrolment(
            conn, user, pyotp.TOTP(enrolment.secret).at(time.time()), Source()
        )
    return user.id, enrolment.secret, codes


def test_enrol_confirm_and_the_events(client: TestClient, runtime: Runtime) -> None:
    auth = _login(client, "ana@example.com")

    r = client.post("/v1/me/mfa/totp", headers=auth)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    secret = body["secret"]
    assert re.fullmatch(r"[A-Z2-7]{32}", secret)
    assert body["otpauth_uri"].startswith("otpauth://totp/Echo:ana%40example.com?")
    assert f"secret={secret}" in body["otpauth_uri"] and "issuer=Echo" in body["otpauth_uri"]
    assert body["qr_svg"].startswith('<svg xmlns="http://www.w3.org/2000/svg"')
    assert body["qr_svg"].endswith("</svg>")

    # Restarting replaces the pending secret: only the newest one can be confirmed.
    r = client.post("/v1/me/mfa/totp", headers=auth)
    stale, secret = secret, r.json()["secret"]
    assert secret != stale

    wrong = _wrong_code(secret, time.time())
    r = client.post("/v1/me/mfa/totp/confirm", json={"code": wrong}, headers=auth)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_mfa_code"
    assert client.get("/v1/me", headers=auth).json()["mfa_enabled"] is False

    code = pyotp.TOTP(secret).now()
    r = client.post("/v1/me/mfa/totp/confirm", json={"code": code}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    recovery = r.json()["recovery_codes"]
    assert len(recovery) == len(set(recovery)) == 10
    assert all(RECOVERY_SHAPE.fullmatch(c) for c in recovery)
    me = client.get("/v1/me", headers=auth).json()
    assert me["mfa_enabled"] is True

    # Enabled: enrolling again or confirming again is refused.
    r = client.post("/v1/me/mfa/totp", headers=auth)
    assert (r.status_code, r.json()["code"]) == (409, "mfa_already_enabled")
    r = client.post("/v1/me/mfa/totp/confirm", json={"code": code}, headers=auth)
    assert (r.status_code, r.json()["code"]) == (409, "mfa_already_enabled")

    # The confirming code counts as used; the database keeps only hashes of recovery codes.
    with transaction(runtime.identity) as conn:
        assert mfa.check_code(conn, me["id"], code) is None
        hashes = (
            conn.execute(
                select(recovery_codes.c.code_hash).where(recovery_codes.c.user_id == me["id"])
            )
            .scalars()
            .all()
        )
    assert sorted(hashes) == sorted(mfa.recovery_code_hash(me["id"], c) for c in recovery)

    events = _events(runtime)
    by_action = {e["action"]: e for e in events}
    failed = by_action["auth.mfa.failed"]
    assert (failed["outcome"], failed["reason"]) == ("failure", "invalid_code")
    assert failed["actor"]["id"] == me["id"] and failed["source"]["ip"] == "testclient"
    enrolled = by_action["mfa.totp.enrolled"]
    assert enrolled["outcome"] == "success" and enrolled["target"]["id"] == me["id"]
    assert enrolled["metadata"]["recovery_count"] == 10
    assert sum(e["action"] == "mfa.totp.enrolment_started" for e in events) == 2
    _assert_no_secrets(events, [secret, stale, *recovery], [code, wrong])


def test_totp_window_single_use_and_recovery_codes(runtime: Runtime) -> None:
    user_id, secret, _ = _enrolled_user(runtime, "bo@example.com")
    totp = pyotp.TOTP(secret)
    # A clock well past the enrolment, in the middle of a step: no boundary to race.
    t = (int(time.time()) // 30 + 10) * 30 + 15

    def check(code: str) -> str | None:
        with transaction(runtime.identity) as conn:
            return mfa.check_code(conn, user_id, code, now=t)

    assert check(totp.at(t + 60)) is None  # two steps ahead
    assert check(totp.at(t - 60)) is None  # two steps behind
    assert check(totp.at(t - 30)) == "totp"  # one step behind
    assert check(totp.at(t - 30)) is None  # replayed
    assert check(totp.at(t)) == "totp"
    assert check(totp.at(t)) is None
    assert check(totp.at(t + 30)) == "totp"  # one step ahead
    assert check(totp.at(t)) is None  # earlier steps are spent once a later one is used
    assert check("12345") is None and check("1234567") is None and check("") is None

    # On the real clock: the next step's code works once.
    user_id, secret, _ = _enrolled_user(runtime, "cy@example.com")
    code = pyotp.TOTP(secret).at(time.time() + 30)
    with transaction(runtime.identity) as conn:
        assert mfa.check_code(conn, user_id, code) == "totp"
    with transaction(runtime.identity) as conn:
        assert mfa.check_code(conn, user_id, code) is None

    # A recovery code works once.
    user_id, secret, codes = _enrolled_user(runtime, "di@example.com")
    _, _, other_codes = _enrolled_user(runtime, "ed@example.com")
    source = Source(ip="203.0.113.9", user_agent="pytest")
    with transaction(runtime.identity) as conn:
        # Case, spaces and the hyphen do not matter.
        typed = " " + codes[3].upper().replace("-", " ") + " "
        assert mfa.check_code(conn, user_id, typed, source=source) == "recovery"
    with transaction(runtime.identity) as conn:
        assert mfa.check_code(conn, user_id, codes[3]) is None
        assert mfa.check_code(conn, user_id, "abcde-fghjk") is None
        # Another user's code is not this user's.
        assert mfa.check_code(conn, user_id, other_codes[0]) is None
    events = _events(runtime)
    used = [e for e in events if e["action"] == "mfa.recovery_code.used"]
    assert len(used) == 1
    assert used[0]["actor"] == {"type": "user", "id": user_id, "label": "di@example.com"}
    assert used[0]["source"] == {"ip": "203.0.113.9", "user_agent": "pytest"}
    assert used[0]["metadata"] == {"remaining": 9}
    _assert_no_secrets(events, [secret, *codes, *other_codes], [])


def _race(runtime: Runtime, user_id: str, code: str, n: int = 20) -> list[str | None]:
    barrier = threading.Barrier(n)
    results: list[str | None] = []
    errors: list[BaseException] = []

    def attempt() -> None:
        try:
            barrier.wait(timeout=10)
            with transaction(runtime.identity) as conn:
                results.append(mfa.check_code(conn, user_id, code))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return results


def test_parallel_uses_of_one_code_succeed_once(runtime: Runtime) -> None:
    user_id, secret, codes = _enrolled_user(runtime, "fa@example.com")
    results = _race(runtime, user_id, codes[0])
    assert (results.count("recovery"), results.count(None)) == (1, 19)

    totp_results = _race(runtime, user_id, pyotp.TOTP(secret).at(time.time() + 30))
    assert (totp_results.count("totp"), totp_results.count(None)) == (1, 19)

    deliver(runtime)
    used = [e for e in _events(runtime) if e["action"] == "mfa.recovery_code.used"]
    assert len(used) == 1


def test_remove_needs_the_password_or_a_code(client: TestClient, runtime: Runtime) -> None:
    auth = _login(client, "gu@example.com")
    secret = client.post("/v1/me/mfa/totp", headers=auth).json()["secret"]
    r = client.post(
        "/v1/me/mfa/totp/confirm", json={"code": pyotp.TOTP(secret).now()}, headers=auth
    )
    recovery = r.json()["recovery_codes"]

    def remove(**body: str) -> Any:
        return client.request("DELETE", "/v1/me/mfa/totp", json=body, headers=auth)

    r = remove(password="not the password at all")
    assert (r.status_code, r.json()["code"]) == (401, "invalid_credentials")
    r = remove(code="000000" if pyotp.TOTP(secret).now() != "000000" else "000001")
    assert (r.status_code, r.json()["code"]) == (400, "invalid_mfa_code")
    assert remove().status_code == 422
    assert remove(password=PASSWORD, code="123456").status_code == 422
    assert client.get("/v1/me", headers=auth).json()["mfa_enabled"] is True

    r = remove(password=PASSWORD)
    assert r.status_code == 204, r.text
    me = client.get("/v1/me", headers=auth).json()
    assert me["mfa_enabled"] is False
    with transaction(runtime.identity, write=False) as conn:
        assert conn.execute(select(mfa_totp).where(mfa_totp.c.user_id == me["id"])).first() is None
        assert not conn.execute(
            select(recovery_codes).where(recovery_codes.c.user_id == me["id"])
        ).all()
        user = find_by_id(conn, me["id"])
    assert user is not None and user.mfa_enabled is False
    r = remove(password=PASSWORD)
    assert (r.status_code, r.json()["code"]) == (409, "mfa_not_enabled")

    # Enrol again and remove with a recovery code.
    secret2 = client.post("/v1/me/mfa/totp", headers=auth).json()["secret"]
    r = client.post(
        "/v1/me/mfa/totp/confirm", json={"code": pyotp.TOTP(secret2).now()}, headers=auth
    )
    recovery2 = r.json()["recovery_codes"]
    assert remove(code=recovery[0]).status_code == 400  # the old set is gone
    assert remove(code=recovery2[0]).status_code == 204
    assert client.get("/v1/me", headers=auth).json()["mfa_enabled"] is False

    events = _events(runtime)
    removed = [
        (e["outcome"], e["reason"], e["metadata"].get("verified_by"))
        for e in events
        if e["action"] == "mfa.totp.removed"
    ]
    assert sorted(removed, key=str) == sorted(
        [
            ("failure", "bad_password", None),
            ("failure", "invalid_code", None),
            ("failure", "invalid_code", None),
            ("success", None, "password"),
            ("success", None, "recovery"),
        ],
        key=str,
    )
    _assert_no_secrets(events, [secret, secret2, PASSWORD, *recovery, *recovery2], [])

    # Removal attempts are throttled: a stolen session cannot guess without limit.
    auth = _login(client, "ha@example.com")
    secret = client.post("/v1/me/mfa/totp", headers=auth).json()["secret"]
    client.post("/v1/me/mfa/totp/confirm", json={"code": pyotp.TOTP(secret).now()}, headers=auth)
    limit = runtime.throttle.policy.mfa.attempts
    for _ in range(limit):
        r = client.request("DELETE", "/v1/me/mfa/totp", json={"password": "x" * 12}, headers=auth)
        assert r.status_code == 401
    r = client.request("DELETE", "/v1/me/mfa/totp", json={"password": PASSWORD}, headers=auth)
    assert (r.status_code, r.json()["code"]) == (429, "rate_limited")
    assert int(r.headers["retry-after"]) >= 1
    assert client.get("/v1/me", headers=auth).json()["mfa_enabled"] is True
    actions = [e["action"] for e in _events(runtime)]
    assert "account.locked" in actions and "auth.throttled" in actions
