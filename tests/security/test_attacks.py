"""Attacks, each as an attacker would try it, that the other suites do not already try.

JWT forgeries beyond ``tests/e2e/test_jwt.py``; session fixation, revocation on the very
next request by every path that revokes, and a scan of both databases for every raw
secret the test saw; 20 parallel uses of one reset and one verification token (the
recovery-code race is in ``test_mfa.py``, parallel wrong passwords in ``test_throttle.py``);
account enumeration by answer and by timing, with the real argon2 parameters; CSRF on
every cookie-authenticated write of the API and every page form; open redirects;
clickjacking headers on every answer; and no secret in any log line or stored event
after a whole realistic run.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import html
import json
import logging
import os
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import jwt
import pyotp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from httpx2 import Response
from jwt.algorithms import OKPAlgorithm
from sqlalchemy import select

from echo_auth.app import create_app
from echo_auth.audit.events import Source
from echo_auth.config import Settings
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import audit_dead_letters, audit_outbox
from echo_auth.identity import mfa
from echo_auth.identity.access_tokens import InvalidAccessToken
from echo_auth.identity.provisioning import issue_bootstrap_token
from echo_auth.identity.users import find_by_id
from echo_auth.observability import JsonFormatter
from echo_auth.runtime import Runtime
from tests.fixtures.app import PASSWORD, deliver
from tests.fixtures.db import Databases, make_settings
from tests.security._support import (
    BASE_URL,
    assert_problem,
    bearer,
    endpoints,
    last_token_to,
    login,
    make_user,
    snapshot,
    stored_events,
    text_cells,
)

HTML = {"accept": "text/html"}
T = TypeVar("T")
NEW_PASSWORD = "a brand new and long passphrase"
_CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _page_token(client: TestClient, path: str = "/login") -> str:
    page = client.get(path, headers=HTML)
    found = _CSRF_FIELD.search(page.text)
    assert found, (path, page.status_code)
    return found.group(1)


def _cookie(r: Response, name: str) -> str | None:
    for line in r.headers.get_list("set-cookie"):
        if line.startswith(f"{name}="):
            return line.split(";", 1)[0].split("=", 1)[1]
    return None


# -- JWT ------------------------------------------------------------------------------------


def test_jwt_forgeries_beyond_the_basics(client: TestClient, runtime: Runtime) -> None:
    make_user(runtime, "ana@example.com")
    session = login(client, "ana@example.com")
    r = client.post("/v1/token", headers=bearer(session))
    assert r.status_code == 200
    good = r.json()["access_token"]
    tokens = runtime.access_tokens
    key = tokens.signing_key
    claims = tokens.verify_access_token(good)
    header, payload, signature = good.split(".")

    # An access token is not a session: the API refuses it as a bearer.
    for path in ("/v1/me", "/v1/me/sessions"):
        assert_problem(client.get(path, headers=bearer(good)), 401)
    assert_problem(client.post("/v1/token", headers=bearer(good)), 401)

    def unsigned(alg: str, extra: dict[str, Any] | None = None) -> str:
        head = {"alg": alg, "typ": "at+jwt", "kid": key.kid, **(extra or {})}
        return f"{_b64(json.dumps(head).encode())}.{payload}."

    def hmac_signed(alg: str, secret: bytes) -> str:
        head = _b64(json.dumps({"alg": alg, "typ": "at+jwt", "kid": key.kid}).encode())
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
        mac = hmac.new(secret, f"{head}.{payload}".encode(), digest).digest()
        return f"{head}.{payload}.{_b64(mac)}"

    jwk_json = json.dumps(tokens.jwks()["keys"][0]).encode()
    public_pem = key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    stranger = Ed25519PrivateKey.generate()
    stranger_jwk = OKPAlgorithm.to_jwk(stranger.public_key(), as_dict=True)

    def signed_by_stranger(headers: dict[str, Any]) -> str:
        """Built by hand: PyJWT itself would refuse to write some of these headers."""
        head = _b64(json.dumps({"alg": "EdDSA", "typ": "at+jwt", **headers}).encode())
        body = _b64(json.dumps(claims).encode())
        return f"{head}.{body}.{_b64(stranger.sign(f'{head}.{body}'.encode()))}"

    forged = [
        *(unsigned(alg) for alg in ("none", "None", "NONE", "nOnE")),
        unsigned("EdDSA"),  # the right algorithm, the signature stripped
        *(hmac_signed(alg, public_pem) for alg in ("HS256", "HS384", "HS512")),
        hmac_signed("HS256", jwk_json),
        hmac_signed("HS256", b""),
        # The attacker's own key, offered in the header, or a URL to fetch it from.
        signed_by_stranger({"kid": key.kid, "jwk": stranger_jwk}),
        signed_by_stranger({"kid": key.kid, "jku": "https://evil.example/jwks.json"}),
        signed_by_stranger({"kid": key.kid, "x5u": "https://evil.example/cert.pem"}),
        # Key ids that try to escape the key directory or inject.
        *(
            signed_by_stranger({"kid": kid})
            for kid in ("../../../../etc/passwd", "' OR 1=1 --", "", "*", f"{key.kid}.pem")
        ),
        signed_by_stranger({"kid": ["a", key.kid]}),
        signed_by_stranger({"kid": {"kid": key.kid}}),
        signed_by_stranger({"kid": 7}),
        signed_by_stranger({}),  # no kid at all
        # Claims changed after signing (the payload of another user).
        ".".join([header, _b64(json.dumps({**claims, "sub": "other"}).encode()), signature]),
        # Expired one second ago, with no leeway.
        jwt.encode(
            {**claims, "exp": int(time.time()) - 1},
            key.private_key,
            algorithm="EdDSA",
            headers={"kid": key.kid},
        ),
        # Issuer spelt almost right.
        jwt.encode(
            {**claims, "iss": runtime.settings.jwt_issuer + "/"},
            key.private_key,
            algorithm="EdDSA",
            headers={"kid": key.kid},
        ),
        "A" * 100_000,
        f"{header}.{payload}",
        f"{header}.{payload}.{signature}.extra",
    ]
    for token in forged:
        with pytest.raises(InvalidAccessToken):
            tokens.verify_access_token(token)
    # The genuine one still verifies: the refusals were about the forgeries.
    assert tokens.verify_access_token(good)["sub"] == claims["sub"]


# -- sessions -------------------------------------------------------------------------------


def test_a_planted_session_cookie_is_never_adopted(client: TestClient, runtime: Runtime) -> None:
    make_user(runtime, "ana@example.com")
    make_user(runtime, "eve@example.com")
    eve_own = login(client, "eve@example.com")  # a real session, of the attacker
    eve_device = client.post(
        "/v1/login", json={"email": "eve@example.com", "password": PASSWORD}
    ).cookies.get("echo_device")
    client.cookies.clear()
    assert eve_device
    for planted in ("attacker-chosen-value-0123456789abcdefghijklmnop", eve_own):
        # Through the API.
        client.cookies.clear()
        client.cookies.set("echo_session", planted)
        client.cookies.set("echo_device", eve_device)
        r = client.post("/v1/login", json={"email": "ana@example.com", "password": PASSWORD})
        assert r.status_code == 200
        issued = _cookie(r, "echo_session")
        assert issued and issued != planted and issued == r.json()["session_token"]
        device = _cookie(r, "echo_device")
        assert device and device != eve_device  # eve's device is not ana's
        who = client.get("/v1/me", headers={"Cookie": f"echo_session={issued}"}).json()
        assert who["email"] == "ana@example.com"
        r = client.get("/v1/me", headers={"Cookie": f"echo_session={planted}"})
        if planted == eve_own:
            assert r.json()["email"] == "eve@example.com"  # still only eve's
        else:
            assert_problem(r, 401)

        # Through the login form, which also rotates the CSRF nonce.
        client.cookies.clear()
        client.cookies.set("echo_session", planted)
        client.cookies.set("echo_csrf", "attacker-nonce-0123456789")
        token = _page_token(client)
        data = {"csrf_token": token, "email": "ana@example.com", "password": PASSWORD}
        r = client.post("/login", data=data, follow_redirects=False)
        assert r.status_code == 303, r.text
        issued = _cookie(r, "echo_session")
        assert issued and issued != planted
        assert _cookie(r, "echo_csrf") not in (None, "attacker-nonce-0123456789")
        who = client.get("/v1/me", headers={"Cookie": f"echo_session={issued}"}).json()
        assert who["email"] == "ana@example.com"
    client.cookies.clear()


def _fresh(client: TestClient, address: str, n: int = 1) -> list[str]:
    return [login(client, address) for _ in range(n)]


def test_every_revocation_takes_effect_on_the_next_request(
    client: TestClient, runtime: Runtime
) -> None:
    ana_id = make_user(runtime, "ana@example.com")
    make_user(runtime, "root@example.com", "admin")
    admin = bearer(login(client, "root@example.com"))

    def dead(token: str) -> None:
        assert_problem(client.get("/v1/me", headers=bearer(token)), 401)
        assert_problem(client.post("/v1/token", headers=bearer(token)), 401)
        r = client.get(
            "/account", headers={**HTML, "Cookie": f"echo_session={token}"}, follow_redirects=False
        )
        assert r.status_code == 303 and r.headers["location"].startswith("/login")

    def alive(token: str) -> None:
        assert client.get("/v1/me", headers=bearer(token)).status_code == 200

    # Logout (API, bearer and cookie) and the logout form.
    [a] = _fresh(client, "ana@example.com")
    assert client.post("/v1/logout", headers=bearer(a)).status_code == 204
    dead(a)
    [a] = _fresh(client, "ana@example.com")
    r = client.post("/v1/logout", headers={"Cookie": f"echo_session={a}", "Origin": BASE_URL})
    assert r.status_code == 204
    dead(a)
    [a] = _fresh(client, "ana@example.com")
    client.cookies.set("echo_session", a)
    r = client.post(
        "/logout", data={"csrf_token": _page_token(client, "/account")}, follow_redirects=False
    )
    assert r.status_code == 303
    client.cookies.clear()
    dead(a)
    # One session revoked by id, the others by "revoke others".
    a, b, c = _fresh(client, "ana@example.com", 3)
    listed = client.get("/v1/me/sessions", headers=bearer(a)).json()["sessions"]
    b_id = next(s["id"] for s in listed if not s["current"])
    assert client.delete(f"/v1/me/sessions/{b_id}", headers=bearer(a)).status_code == 204
    gone = [t for t in (b, c) if client.get("/v1/me", headers=bearer(t)).status_code == 401]
    assert len(gone) == 1
    assert client.post("/v1/me/sessions/revoke-others", headers=bearer(a)).status_code == 200
    dead(b)
    dead(c)
    alive(a)
    # Revoking the session in use ends it at once too.
    own = next(
        s["id"]
        for s in client.get("/v1/me/sessions", headers=bearer(a)).json()["sessions"]
        if s["current"]
    )
    assert client.delete(f"/v1/me/sessions/{own}", headers=bearer(a)).status_code == 204
    dead(a)
    # A password change ends every other session.
    a, b = _fresh(client, "ana@example.com", 2)
    body = {"current_password": PASSWORD, "new_password": NEW_PASSWORD}
    assert client.post("/v1/me/password", json=body, headers=bearer(a)).status_code == 204
    dead(b)
    alive(a)
    # A reset ends all of them.
    assert client.post("/v1/password-reset", json={"email": "ana@example.com"}).status_code == 202
    token = last_token_to(runtime, "ana@example.com")
    r = client.post("/v1/password-reset/confirm", json={"token": token, "new_password": PASSWORD})
    assert r.status_code == 204
    dead(a)
    # An admin revokes them; an admin disables the account.
    a, b = _fresh(client, "ana@example.com", 2)
    r = client.delete(f"/v1/admin/users/{ana_id}/sessions", headers=admin)
    assert r.status_code == 200 and r.json()["revoked"] == 2
    dead(a)
    dead(b)
    [a] = _fresh(client, "ana@example.com")
    assert client.post(f"/v1/admin/users/{ana_id}/disable", headers=admin).status_code == 200
    dead(a)
    # Enabling the account again does not bring an old session back.
    assert client.post(f"/v1/admin/users/{ana_id}/enable", headers=admin).status_code == 204
    dead(a)


def test_tokens_are_stored_only_as_hashes(client: TestClient, runtime: Runtime) -> None:
    """Collect every raw secret handed out, then look for it in every text cell of both DBs."""
    seen: dict[str, str] = {}
    with transaction(runtime.identity) as conn:
        setup = issue_bootstrap_token(conn, timedelta(hours=1))
    assert setup
    seen["setup token"] = setup
    r = client.post(
        "/v1/setup", json={"token": setup, "email": "root@example.com", "password": PASSWORD}
    )
    assert r.status_code == 201, r.text
    r = client.post("/v1/signup", json={"email": "ana@example.com", "password": PASSWORD})
    assert r.status_code == 201
    seen["verification token"] = last_token_to(runtime, "ana@example.com")
    assert (
        client.post(
            "/v1/email-verification/confirm", json={"token": seen["verification token"]}
        ).status_code
        == 204
    )
    r = client.post("/v1/login", json={"email": "ana@example.com", "password": PASSWORD})
    seen["session"] = r.json()["session_token"]
    seen["device cookie"] = r.cookies["echo_device"]
    client.cookies.clear()
    ana = bearer(seen["session"])
    seen["access token"] = client.post("/v1/token", headers=ana).json()["access_token"]
    enrol = client.post("/v1/me/mfa/totp", headers=ana).json()
    totp = pyotp.TOTP(enrol["secret"])
    r = client.post("/v1/me/mfa/totp/confirm", json={"code": totp.now()}, headers=ana)
    codes = r.json()["recovery_codes"]
    for i, code in enumerate(codes):
        seen[f"recovery code {i}"] = code
        seen[f"recovery code {i} bare"] = code.replace("-", "")
    r = client.post("/v1/login", json={"email": "ana@example.com", "password": PASSWORD})
    seen["mfa token"] = r.json()["mfa_token"]
    r = client.post("/v1/login/mfa", json={"mfa_token": seen["mfa token"], "code": codes[0]})
    assert r.status_code == 200, r.text
    seen["session after mfa"] = r.json()["session_token"]
    client.cookies.clear()
    assert client.post("/v1/password-reset", json={"email": "ana@example.com"}).status_code == 202
    seen["reset token"] = last_token_to(runtime, "ana@example.com")
    r = client.post(
        "/v1/password-reset/confirm",
        json={"token": seen["reset token"], "new_password": NEW_PASSWORD},
    )
    assert r.status_code == 204
    seen["admin session"] = login(client, "root@example.com")
    seen["csrf token"] = _page_token(client)
    seen["csrf nonce"] = client.cookies["echo_csrf"]
    client.cookies.clear()
    seen["password"] = PASSWORD
    seen["new password"] = NEW_PASSWORD
    # Pieces of a JWT (its signature) would give it away as well.
    seen["access token signature"] = seen["access token"].split(".")[2]
    deliver(runtime)

    cells = text_cells(runtime.identity) + text_cells(runtime.audit)
    assert len({table for table, _, _ in cells}) >= 8
    leaks = [
        (what, table, column)
        for what, secret in seen.items()
        for table, column, value in cells
        if secret in value
    ]
    assert leaks == [], leaks
    # The one secret that must be kept as is: the TOTP seed (it computes the codes).
    assert any(value == enrol["secret"] for _, column, value in cells if column == "secret")


# -- races -----------------------------------------------------------------------------------


def _race(n: int, attempt: Callable[[int], T]) -> list[T]:
    start = threading.Barrier(n)

    def run(i: int) -> T:
        start.wait()
        return attempt(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(run, range(n)))


def test_twenty_parallel_uses_of_one_reset_token_succeed_once(
    client: TestClient, runtime: Runtime
) -> None:
    make_user(runtime, "ana@example.com")
    assert client.post("/v1/password-reset", json={"email": "ana@example.com"}).status_code == 202
    token = last_token_to(runtime, "ana@example.com")

    def attempt(i: int) -> int:
        body = {"token": token, "new_password": f"{NEW_PASSWORD} number {i:02d}"}
        return client.post("/v1/password-reset/confirm", json=body).status_code

    statuses = _race(20, attempt)
    assert sorted(statuses) == [204] + [400] * 19, statuses
    winner = statuses.index(204)
    login(client, "ana@example.com", f"{NEW_PASSWORD} number {winner:02d}")
    for loser in [i for i in range(20) if i != winner][:3]:
        r = client.post(
            "/v1/login",
            json={"email": "ana@example.com", "password": f"{NEW_PASSWORD} number {loser:02d}"},
        )
        assert r.status_code == 401
    done = stored_events(runtime, action="password.reset.completed")
    assert sorted(e["outcome"] for e in done) == ["failure"] * 19 + ["success"]


def test_twenty_parallel_uses_of_one_verification_token_succeed_once(
    client: TestClient, runtime: Runtime
) -> None:
    r = client.post("/v1/signup", json={"email": "ana@example.com", "password": PASSWORD})
    assert r.status_code == 201
    token = last_token_to(runtime, "ana@example.com")
    statuses = _race(
        20,
        lambda _: client.post("/v1/email-verification/confirm", json={"token": token}).status_code,
    )
    assert sorted(statuses) == [204] + [400] * 19, statuses
    verified = stored_events(runtime, action="user.email_verified")
    assert sorted(e["outcome"] for e in verified) == ["failure"] * 19 + ["success"]


# -- enumeration -----------------------------------------------------------------------------


def _same_answer(a: Response, b: Response) -> None:
    assert a.status_code == b.status_code
    strip = {"request_id", "user_id"}
    body_a, body_b = a.json(), b.json()
    assert {k: v for k, v in body_a.items() if k not in strip} == {
        k: v for k, v in body_b.items() if k not in strip
    }
    assert set(body_a) == set(body_b)
    ignore = {"x-request-id", "date", "content-length"}
    assert {k: v for k, v in a.headers.items() if k not in ignore} == {
        k: v for k, v in b.headers.items() if k not in ignore
    }


def test_known_and_unknown_addresses_get_the_same_answers(
    client: TestClient, runtime: Runtime
) -> None:
    ana_id = make_user(runtime, "ana@example.com")
    make_user(runtime, "bo@example.com")
    mfa_user = make_user(runtime, "tia@example.com")
    with transaction(runtime.identity) as conn:
        user = find_by_id(conn, mfa_user)
        assert user is not None
        secret = mfa.begin_enrolment(conn, user, "Echo", Source()).secret
        mfa.confirm_enrolment(conn, user, pyotp.TOTP(secret).now(), Source())

    def post(path: str, body: dict[str, Any]) -> Response:
        r = client.post(path, json=body)
        client.cookies.clear()
        return r

    for known in ("ana@example.com", "tia@example.com"):
        _same_answer(
            post("/v1/login", {"email": known, "password": "not the password"}),
            post("/v1/login", {"email": "ghost@example.com", "password": "not the password"}),
        )
    signup_known = post("/v1/signup", {"email": "ana@example.com", "password": PASSWORD + "!"})
    signup_new = post("/v1/signup", {"email": "newbie@example.com", "password": PASSWORD + "!"})
    _same_answer(signup_known, signup_new)
    assert signup_known.json()["user_id"] != ana_id
    assert len(signup_known.json()["user_id"]) == len(signup_new.json()["user_id"])
    for path in ("/v1/password-reset", "/v1/email-verification/resend"):
        _same_answer(
            post(path, {"email": "ana@example.com"}), post(path, {"email": "nobody@example.com"})
        )

    # The throttle answers alike too: the same count of 401s, then the same 429.
    elsewhere = TestClient(client.app, base_url=BASE_URL, client=("198.51.100.20", 1))
    sequences = []
    bodies: list[Response] = []
    for address in ("bo@example.com", "phantom@example.com"):
        answers = [
            elsewhere.post("/v1/login", json={"email": address, "password": f"guess {i}"})
            for i in range(runtime.settings.login_max_failures + 1)
        ]
        sequences.append([(r.status_code, "retry-after" in r.headers) for r in answers])
        bodies.append(answers[-1])
    assert sequences[0] == sequences[1], sequences
    assert sequences[0][-1] == (429, True)
    assert {k: v for k, v in bodies[0].json().items() if k not in ("request_id", "detail")} == {
        k: v for k, v in bodies[1].json().items() if k not in ("request_id", "detail")
    }


@contextlib.contextmanager
def real_argon2(base: Path, **overrides: object) -> Iterator[tuple[Runtime, TestClient]]:
    """The production argon2 parameters, a throttle that never gets in the way, an app.

    What is measured here is the password path (argon2 dominates), not the database,
    so these run on SQLite only.
    """
    defaults = Settings.model_fields
    dbs = Databases("sqlite", f"sqlite:///{base / 'identity.db'}", f"sqlite:///{base / 'audit.db'}")
    values: dict[str, object] = {
        "argon2_time_cost": defaults["argon2_time_cost"].default,
        "argon2_memory_kib": defaults["argon2_memory_kib"].default,
        "argon2_parallelism": defaults["argon2_parallelism"].default,
        "login_max_failures": 1000,
        "ip_max_failures": 100_000,
        **overrides,
    }
    settings = make_settings(base / "var", dbs, **values)
    assert (settings.argon2_time_cost, settings.argon2_memory_kib) == (3, 65536)
    runtime = Runtime(settings, pool_size=8)
    runtime.upgrade_databases()
    try:
        with TestClient(create_app(settings, runtime=runtime), base_url=BASE_URL) as client:
            r = client.post("/v1/signup", json={"email": "ana@example.com", "password": PASSWORD})
            assert r.status_code == 201, r.text
            yield runtime, client
    finally:
        runtime.close()


TRIES = int(os.environ.get("ECHO_TIMING_TRIES", "200"))  # fewer only for a quick look by hand


@pytest.mark.slow
def test_login_timing_does_not_tell_unknown_addresses_apart(tmp_path: Path) -> None:
    with real_argon2(tmp_path) as (_, client):

        def timed(body: dict[str, str]) -> float:
            started = time.perf_counter()
            r = client.post("/v1/login", json=body)
            elapsed = time.perf_counter() - started
            assert r.status_code == 401, r.text
            return elapsed

        for i in range(3):  # warm-up: pools, caches, first connections
            timed({"email": "ana@example.com", "password": f"warm {i}"})
            timed({"email": f"warm{i}@example.com", "password": f"warm {i}"})
        wrong: list[float] = []
        unknown: list[float] = []
        for i in range(TRIES):
            # Interleaved, in alternating order, so drift in the machine's speed cancels.
            pair = [
                (wrong, {"email": "ana@example.com", "password": f"wrong guess {i}"}),
                (unknown, {"email": f"ghost{i}@example.com", "password": f"wrong guess {i}"}),
            ]
            for into, body in pair if i % 2 == 0 else reversed(pair):
                into.append(timed(body))
    m_wrong, m_unknown = statistics.median(wrong), statistics.median(unknown)
    assert m_wrong > 0.01, "argon2 at its real cost takes tens of milliseconds"
    assert abs(m_unknown - m_wrong) / m_wrong <= 0.10, (m_wrong, m_unknown)


def test_password_hashing_never_blocks_the_event_loop(tmp_path: Path) -> None:
    """While real argon2 runs for several logins at once, other requests are answered."""
    with real_argon2(tmp_path) as (_, client):
        started = time.perf_counter()
        client.post("/v1/login", json={"email": "ana@example.com", "password": "warm up"})
        one_login = time.perf_counter() - started
        ends: list[float] = []

        def guess(i: int) -> None:
            body = {"email": "ana@example.com", "password": f"wrong guess {i}"}
            assert client.post("/v1/login", json=body).status_code == 401
            ends.append(time.perf_counter())

        latencies: list[float] = []
        with ThreadPoolExecutor(max_workers=6) as pool:
            futures = [pool.submit(guess, i) for i in range(6)]
            time.sleep(one_login / 4)  # the hashing is under way
            for _ in range(8):
                t0 = time.perf_counter()
                assert client.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - t0)
            probes_done = time.perf_counter()
            for future in futures:
                future.result()
    # Six hashes on two workers take three rounds; the probes finished well before them.
    assert max(ends) > probes_done
    assert statistics.median(latencies) < one_login / 2, (latencies, one_login)


def test_a_flood_of_password_checks_is_refused_not_queued(tmp_path: Path) -> None:
    """Past the bounded queue, a check is refused at once with 503 and Retry-After."""
    with real_argon2(tmp_path, hash_workers=1, hash_queue_limit=1) as (_, client):
        answers = _race(
            6,
            lambda i: client.post(
                "/v1/login", json={"email": "ana@example.com", "password": f"guess {i}"}
            ),
        )
    statuses = sorted(r.status_code for r in answers)
    assert 401 in statuses and 503 in statuses, statuses
    for r in answers:
        if r.status_code == 503:
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] == "overloaded" and r.headers["retry-after"] == "1"


def test_secrets_are_compared_in_constant_time(
    client: TestClient, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CSRF tokens and TOTP codes go through hmac.compare_digest; tokens are looked up by
    their SHA-256 (see test_tokens_are_stored_only_as_hashes), passwords by argon2."""
    compared: list[int] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        compared.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    make_user(runtime, "ana@example.com")
    data = {"csrf_token": _page_token(client), "email": "ana@example.com", "password": PASSWORD}
    assert client.post("/login", data=data, follow_redirects=False).status_code == 303
    assert len(compared) >= 1
    before = len(compared)
    enrol = client.post("/v1/me/mfa/totp", headers={"Origin": BASE_URL}).json()
    r = client.post(
        "/v1/me/mfa/totp/confirm",
        json={"code": pyotp.TOTP(enrol["secret"]).now()},
        headers={"Origin": BASE_URL},
    )
    assert r.status_code == 200, r.text
    assert len(compared) - before >= 3  # every step of the window, matched or not
    client.cookies.clear()


# -- CSRF ------------------------------------------------------------------------------------

_UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


def _cookie_authenticated_writes(app: Any) -> list[tuple[str, str]]:
    """Every API write that takes the session (and so the session cookie)."""
    from echo_auth.web.deps import get_current_session

    def uses_session(dependant: Any) -> bool:
        return any(d.call is get_current_session or uses_session(d) for d in dependant.dependencies)

    return sorted(
        (method, route.path)
        for route in endpoints(app)
        if route.path.startswith("/v1/") and uses_session(route.dependant)
        for method in route.methods & _UNSAFE
    )


def test_every_cookie_authenticated_api_write_refuses_other_origins(
    client: TestClient, runtime: Runtime
) -> None:
    make_user(runtime, "root@example.com", "admin", "auditor")
    ana_id = make_user(runtime, "ana@example.com")
    writes = _cookie_authenticated_writes(client.app)
    assert len(writes) >= 13, writes  # logout, sessions, password, MFA, token, admin
    cookie = login(client, "root@example.com")
    before = snapshot(runtime)

    def call(method: str, path: str, headers: dict[str, str]) -> Response:
        url = path.replace("{user_id}", ana_id).replace("{session_id}", "0" * 36)
        body = {
            "code": "123456",
            "current_password": PASSWORD,
            "new_password": NEW_PASSWORD,
            "password": PASSWORD,
            "roles": ["admin"],
        }
        return client.request(
            method, url, json=body, headers={"Cookie": f"echo_session={cookie}", **headers}
        )

    for method, path in writes:
        for hostile in (
            {"Origin": "https://evil.example"},
            {"Origin": "null"},
            {"Origin": BASE_URL + ".evil.example"},
            {"Origin": BASE_URL.replace("http:", "https:")},
            {"Sec-Fetch-Site": "cross-site"},
        ):
            body = assert_problem(call(method, path, hostile), 403)
            assert body["code"] == "forbidden", (method, path, body)
    # Nothing happened: no row changed, the session still works, ana is still a user.
    after = snapshot(runtime)
    assert after["users"] == before["users"] and after["sessions"] == before["sessions"]
    assert client.get("/v1/me", headers=bearer(cookie)).status_code == 200
    # The same cookie from our own origin gets past the check (the route answers itself).
    r = call("POST", "/v1/token", {"Origin": BASE_URL})
    assert r.status_code == 200
    r = call("POST", "/v1/token", {"Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 200
    # A bearer token is not sent by browsers on their own: no origin check applies.
    r = client.post("/v1/token", headers={**bearer(cookie), "Origin": "https://evil.example"})
    assert r.status_code == 200


def _page_posts(app: Any) -> list[str]:
    return sorted(r.path for r in endpoints(app) if "pages" in r.tags and "POST" in r.methods)


def test_every_page_form_refuses_a_missing_or_foreign_csrf_token(
    client: TestClient, runtime: Runtime
) -> None:
    ana_id = make_user(runtime, "root@example.com", "admin", "auditor")
    posts = _page_posts(client.app)
    assert len(posts) >= 15, posts
    foreign = _page_token(TestClient(client.app, base_url=BASE_URL))  # another browser's
    r = client.post(
        "/login",
        data={"csrf_token": _page_token(client), "email": "root@example.com", "password": PASSWORD},
        follow_redirects=False,
    )
    assert r.status_code == 303
    before = snapshot(runtime)
    deliver(runtime)
    fields = {
        "email": "new@example.com",
        "password": PASSWORD,
        "current_password": PASSWORD,
        "new_password": NEW_PASSWORD,
        "new_password_repeat": NEW_PASSWORD,
        "token": "t",
        "code": "123456",
        "roles": "auditor",
        "mfa_token": "t",
    }
    for path in posts:
        url = path.replace("{user_id}", ana_id).replace("{session_id}", "0" * 36)
        for token in (None, "", foreign, foreign[:-2] + "xx"):
            data = dict(fields) if token is None else {**fields, "csrf_token": token}
            r = client.post(url, data=data, headers=HTML, follow_redirects=False)
            assert r.status_code == 403, (url, token, r.status_code)
            assert "This form has expired" in r.text
    assert snapshot(runtime)["users"] == before["users"]
    assert snapshot(runtime)["sessions"] == before["sessions"]
    denied = stored_events(runtime, action="access.denied")
    assert len(denied) == 4 * len(posts)
    assert {e["reason"] for e in denied} == {"csrf"}


# -- open redirects ---------------------------------------------------------------------------

EVIL_NEXT = [
    "//evil.example",
    "///evil.example",
    "////evil.example/",
    "https://evil.example/",
    "http:evil.example",
    "https:/evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "/\\/evil.example",
    "/\t/evil.example",
    "/\n/evil.example",
    " //evil.example",
    "javascript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "/%2F%2Fevil.example",
    "//evil.example@127.0.0.1:8000",
    "/\x00//evil.example",
    "\u3002evil.example",
    "/\uff0f\uff0fevil.example",
    "/" + "a" * 600,
]


def _stays_here(location: str) -> None:
    parts = urlsplit(location)
    assert location.startswith("/") and not location.startswith("//"), location
    assert not parts.scheme and not parts.netloc, location
    assert "\\" not in location and not re.search(r"[\x00-\x20]", location), location


def test_next_and_back_never_lead_off_the_site(client: TestClient, runtime: Runtime) -> None:
    target = make_user(runtime, "ana@example.com")
    make_user(runtime, "root@example.com", "admin")
    for evil in EVIL_NEXT:
        client.cookies.clear()
        page = client.get("/login", params={"next": evil}, headers=HTML)
        hidden = re.search(r'name="next" value="([^"]*)"', page.text)
        assert hidden, page.text[:500]
        if hidden.group(1):  # kept only when it is a path on this site
            _stays_here(html.unescape(hidden.group(1)))
        data = {
            "csrf_token": _page_token(client),
            "email": "root@example.com",
            "password": PASSWORD,
            "next": evil,
        }
        r = client.post("/login", data=data, follow_redirects=False)
        assert r.status_code == 303, (evil, r.status_code)
        _stays_here(r.headers["location"])
        # Signed in, GET /login?next= redirects straight away.
        r = client.get("/login", params={"next": evil}, follow_redirects=False)
        assert r.status_code in (200, 303)
        if r.status_code == 303:
            _stays_here(r.headers["location"])
        # The admin forms' "back" field.
        token = _page_token(client, "/admin/users")
        r = client.post(
            f"/admin/users/{target}/enable",
            data={"csrf_token": token, "back": evil},
            follow_redirects=False,
        )
        assert r.status_code == 303
        _stays_here(r.headers["location"])
        assert r.headers["location"].startswith("/admin/users")


# -- clickjacking headers ---------------------------------------------------------------------


def test_every_answer_forbids_framing(client: TestClient, runtime: Runtime) -> None:
    make_user(runtime, "root@example.com", "admin", "auditor")
    token = login(client, "root@example.com")
    client.cookies.set("echo_session", token)
    answers: list[tuple[str, Response]] = []
    for route in endpoints(client.app):
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        for method in sorted(route.methods):
            answers.append(
                (
                    f"{method} {route.path}",
                    client.request(
                        method,
                        path,
                        headers={**HTML, **bearer(token), "Origin": BASE_URL},
                        follow_redirects=False,
                    ),
                )
            )
    for path in ("/docs", "/redoc", "/openapi.json", "/static/echo.css", "/nope", "/v1/nope"):
        answers.append((f"GET {path}", client.get(path, headers=HTML)))
    assert len(answers) > 60
    for label, r in answers:
        assert r.status_code < 500, (label, r.status_code, r.text[:300])
        assert r.headers.get("x-frame-options") == "DENY", label
        csp = r.headers.get("content-security-policy")
        if label not in ("GET /docs", "GET /redoc"):  # Swagger UI runs its own scripts
            assert csp and "frame-ancestors 'none'" in csp, (label, csp)
            assert "default-src 'self'" in csp and "script-src 'self'" in csp, (label, csp)
        assert r.headers.get("x-content-type-options") == "nosniff", label
    client.cookies.clear()


# -- secrets in logs and events ---------------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def all_logs() -> Iterator[_Capture]:
    """Every log record of the run, as the JSON lines Echo writes, from DEBUG up."""
    capture = _Capture()
    root = logging.getLogger()
    level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(level)


def test_no_secret_in_any_log_line_or_stored_event(
    client: TestClient, runtime: Runtime, all_logs: _Capture
) -> None:
    secrets: list[str] = [PASSWORD, NEW_PASSWORD, "yet another long passphrase"]
    codes: list[str] = []
    # Sign up, confirm the address, log in.
    r = client.post("/v1/signup", json={"email": "ana@example.com", "password": PASSWORD})
    assert r.status_code == 201
    secrets.append(last_token_to(runtime, "ana@example.com"))
    assert (
        client.post("/v1/email-verification/confirm", json={"token": secrets[-1]}).status_code
        == 204
    )
    r = client.post("/v1/login", json={"email": "ana@example.com", "password": PASSWORD})
    secrets += [r.json()["session_token"], r.cookies["echo_device"]]
    client.cookies.clear()
    ana = bearer(secrets[-2])
    # A wrong password, and a wrong one that looks like a field in a log line.
    for wrong in ("wrong password 1234", 'password="hunter2hunter2"'):
        client.post("/v1/login", json={"email": "ana@example.com", "password": wrong})
        secrets.append(wrong)
    # MFA: enrol, confirm, log in with a TOTP code and with a recovery code.
    enrol = client.post("/v1/me/mfa/totp", headers=ana).json()
    secrets += [enrol["secret"], enrol["otpauth_uri"].split("secret=")[1].split("&")[0]]
    totp = pyotp.TOTP(enrol["secret"])
    now = time.time()
    codes.append(totp.at(now))
    r = client.post("/v1/me/mfa/totp/confirm", json={"code": codes[-1]}, headers=ana)
    recovery = r.json()["recovery_codes"]
    secrets += recovery
    r = client.post("/v1/login", json={"email": "ana@example.com", "password": PASSWORD})
    secrets.append(r.json()["mfa_token"])
    codes.append(totp.at(now + 30))
    r = client.post("/v1/login/mfa", json={"mfa_token": secrets[-1], "code": codes[-1]})
    assert r.status_code == 200, r.text
    secrets.append(r.json()["session_token"])
    r = client.post("/v1/login", json={"email": "ana@example.com", "password": PASSWORD})
    secrets.append(r.json()["mfa_token"])
    r = client.post("/v1/login/mfa", json={"mfa_token": secrets[-1], "code": recovery[0]})
    assert r.status_code == 200, r.text
    secrets.append(r.json()["session_token"])
    client.cookies.clear()
    ana = bearer(secrets[-1])
    # A JWT, a password change, a reset.
    jwt_token = client.post("/v1/token", headers=ana).json()["access_token"]
    secrets += [jwt_token, jwt_token.split(".")[2]]
    body = {"current_password": PASSWORD, "new_password": NEW_PASSWORD}
    assert client.post("/v1/me/password", json=body, headers=ana).status_code == 204
    assert client.post("/v1/password-reset", json={"email": "ana@example.com"}).status_code == 202
    secrets.append(last_token_to(runtime, "ana@example.com"))
    body = {"token": secrets[-1], "new_password": "yet another long passphrase"}
    assert client.post("/v1/password-reset/confirm", json=body).status_code == 204
    # A failure that is logged on the server side: a request that hits an error path.
    client.get("/v1/me", headers=bearer("bogus-" + secrets[4]))
    deliver(runtime)

    events = stored_events(runtime)
    assert len(events) > 15
    logged = [{k: v for k, v in json.loads(line).items() if k != "time"} for line in all_logs.lines]
    assert logged, "the run logged nothing at all: the capture is not working"
    # The test client's own library logs the URLs it calls; that is not Echo's log.
    echo_lines = [
        json.dumps(entry, ensure_ascii=False)
        for entry in logged
        if not entry["logger"].startswith(("httpx", "httpcore"))
    ]
    stored = [json.dumps(e, ensure_ascii=False) for e in events]
    with transaction(runtime.identity, write=False) as conn:
        stored += [str(v) for v in conn.execute(select(audit_outbox.c.payload)).scalars()]
        stored += [str(v) for v in conn.execute(select(audit_dead_letters.c.payload)).scalars()]
    for secret in secrets:
        assert len(secret) >= 10
        assert not [line for line in echo_lines if secret in line], secret
        assert not [doc for doc in stored if secret in doc], secret
    digits = re.compile(r"(?<![0-9A-Za-z])(\d{6})(?![0-9A-Za-z])")
    for code in codes:
        for line in echo_lines + stored:
            assert code not in digits.findall(line), (code, line[:300])


# -- the promises page --------------------------------------------------------------------------


def test_the_security_page_names_only_tests_that_exist() -> None:
    """docs/security.md proves each promise with a test; a renamed test must not go unseen."""
    root = Path(__file__).resolve().parents[2]
    page = (root / "docs" / "security.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", page)
    assert len(named) > 40
    missing = [
        f"{path}::{name}"
        for path, name in named
        if not (root / path).exists() or f"def {name}(" not in (root / path).read_text()
    ]
    assert missing == [], missing
