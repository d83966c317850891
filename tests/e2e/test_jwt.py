"""JWT access tokens as a relying service sees them: fetched from ``POST /v1/token``,
verified with PyJWT against ``/.well-known/jwks.json``; key rotation by the CLI (its own
runtime and key cache); and the forgeries a verifier must refuse."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import time
from typing import Any

import jwt
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from sqlalchemy import select

import echo_auth.cli.keys  # noqa: F401 - registers `keys rotate-jwt`
from echo_auth.audit.search import EventFilter, search_events
from echo_auth.cli.main import cli
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import sessions
from echo_auth.identity.access_tokens import InvalidAccessToken
from echo_auth.identity.tokens import token_hash
from echo_auth.runtime import Runtime
from tests.fixtures.app import PASSWORD, deliver

AUDIENCE = "echo"


def _login(client: TestClient, email: str = "ana@example.com") -> tuple[dict[str, str], str]:
    r = client.post("/v1/signup", json={"email": email, "password": PASSWORD})
    assert r.status_code == 201, r.text
    r = client.post("/v1/login", json={"email": email, "password": PASSWORD})
    assert r.status_code == 200, r.text
    token = r.json()["session_token"]
    return {"Authorization": f"Bearer {token}"}, token


def _access_token(client: TestClient, auth: dict[str, str]) -> str:
    r = client.post("/v1/token", headers=auth)
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def _verify_like_a_relying_service(client: TestClient, token: str, issuer: str) -> dict[str, Any]:
    """What another service does: fetch the JWKS, pick the key by kid, pin the algorithm."""
    r = client.get("/.well-known/jwks.json")
    assert r.status_code == 200
    keys = {k["kid"]: k for k in r.json()["keys"]}
    kid = jwt.get_unverified_header(token)["kid"]
    if kid not in keys:
        raise jwt.InvalidKeyError(f"unknown kid {kid}")
    return jwt.decode(
        token,
        jwt.PyJWK(keys[kid]),
        algorithms=["EdDSA"],
        audience=AUDIENCE,
        issuer=issuer,
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(runtime: Runtime, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": runtime.settings.jwt_issuer,
        "sub": "someone",
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "j",
        "sid": "s",
    }
    claims.update(changes)
    return claims


def test_token_verifies_with_the_published_keys(client: TestClient, runtime: Runtime) -> None:
    auth, session_token = _login(client)
    r = client.post("/v1/token", headers=auth)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 300
    token = body["access_token"]

    r = client.get("/.well-known/jwks.json")
    jwks = r.json()
    assert len(jwks["keys"]) == 1
    (jwk,) = jwks["keys"]
    assert {k: jwk[k] for k in ("kty", "crv", "use", "alg")} == {
        "kty": "OKP",
        "crv": "Ed25519",
        "use": "sig",
        "alg": "EdDSA",
    }
    assert set(jwk) == {"kty", "crv", "x", "kid", "use", "alg"}  # nothing private
    raw = base64.urlsafe_b64decode(jwk["x"] + "=")
    assert jwk["kid"] == hashlib.sha256(raw).hexdigest()[:16]

    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "kid": jwk["kid"], "typ": "at+jwt"}
    claims = _verify_like_a_relying_service(client, token, runtime.settings.base_url)
    me = client.get("/v1/me", headers=auth).json()
    with transaction(runtime.identity, write=False) as conn:
        session_id = conn.execute(
            select(sessions.c.id).where(sessions.c.token_hash == token_hash(session_token))
        ).scalar_one()
    assert claims["iss"] == "http://127.0.0.1:8000"
    assert claims["sub"] == me["id"] and claims["sid"] == session_id
    assert claims["aud"] == AUDIENCE
    assert claims["email"] == "ana@example.com" and claims["roles"] == ["user"]
    assert claims["exp"] - claims["iat"] == 300 and claims["nbf"] == claims["iat"]
    assert abs(claims["iat"] - time.time()) < 60
    assert runtime.access_tokens.verify_access_token(token) == claims
    assert _access_token(client, auth) != token  # a fresh jti each time

    # The key file: <kid>.pem, mode 0600, in $ECHO_DATA_DIR/keys/jwt.
    path = runtime.settings.keys_dir / "jwt" / f"{jwk['kid']}.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    deliver(runtime)
    with transaction(runtime.audit, write=False) as conn:
        events = search_events(conn, EventFilter(action="token.issued"), limit=10).events
    assert len(events) == 2
    issued = next(e for e in events if e["metadata"]["jti"] == claims["jti"])
    assert issued["actor"]["id"] == me["id"] and issued["outcome"] == "success"
    assert issued["metadata"]["session_id"] == session_id
    assert issued["metadata"]["kid"] == jwk["kid"]
    assert token not in json.dumps(events) and token.split(".")[2] not in json.dumps(events)

    # A revoked session gets no more tokens.
    assert client.post("/v1/logout", headers=auth).status_code == 204
    r = client.post("/v1/token", headers=auth)
    assert (r.status_code, r.json()["code"]) == (401, "not_authenticated")
    assert client.post("/v1/token").status_code == 401


def test_rotation_keeps_old_tokens_valid_until_retired(
    client: TestClient, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth, _ = _login(client)
    old_token = _access_token(client, auth)
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    issuer = runtime.settings.base_url

    # The operator rotates with the CLI, which builds its own runtime from the environment:
    # another key cache, as in another process.
    s = runtime.settings
    for name in [k for k in os.environ if k.startswith("ECHO_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(s.data_dir)  # no stray .env file
    env = {
        "ECHO_ENV": "test",
        "ECHO_DATA_DIR": str(s.data_dir),
        "ECHO_IDENTITY_DB_URL": s.identity_db_url,
        "ECHO_AUDIT_DB_URL": s.audit_db_url,
    }
    done = CliRunner().invoke(cli, ["keys", "rotate-jwt"], env=env, catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert "new signing key" in done.output

    kids = [k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]]
    assert len(kids) == 2 and old_kid in kids
    new_kid = next(k for k in kids if k != old_kid)
    assert _verify_like_a_relying_service(client, old_token, issuer)["sub"]
    new_token = _access_token(client, auth)
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    assert _verify_like_a_relying_service(client, new_token, issuer)["sub"]

    deliver(runtime)
    with transaction(runtime.audit, write=False) as conn:
        (event,) = search_events(conn, EventFilter(action="system.jwt_key.rotated")).events
    assert event["actor"]["type"] == "admin"
    assert (event["metadata"]["kid"], event["metadata"]["previous_kid"]) == (new_kid, old_kid)

    # Once the new key is older than the token TTL + 5 minutes, the old key is retired:
    # moved aside (kept), no longer published, and its tokens no longer verify.
    key_dir = runtime.settings.keys_dir / "jwt"
    long_ago = time.time() - runtime.settings.jwt_ttl_s - 301
    os.utime(key_dir / f"{old_kid}.pem", (long_ago - 1, long_ago - 1))
    os.utime(key_dir / f"{new_kid}.pem", (long_ago, long_ago))
    os.utime(key_dir)  # a change another process would make
    kids = [k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]]
    assert kids == [new_kid]
    assert (key_dir / "retired" / f"{old_kid}.pem").exists()
    assert not (key_dir / f"{old_kid}.pem").exists()
    with pytest.raises(jwt.InvalidKeyError):
        _verify_like_a_relying_service(client, old_token, issuer)
    with pytest.raises(InvalidAccessToken):
        runtime.access_tokens.verify_access_token(old_token)
    assert runtime.access_tokens.verify_access_token(new_token)["sub"]


def test_forged_and_foreign_tokens_are_refused(client: TestClient, runtime: Runtime) -> None:
    auth, _ = _login(client)
    good = _access_token(client, auth)
    tokens = runtime.access_tokens
    key = tokens.signing_key
    issuer = runtime.settings.base_url

    def sign(claims: dict[str, Any], private_key: Any = key.private_key, kid: str = key.kid) -> str:
        return jwt.encode(claims, private_key, algorithm="EdDSA", headers={"kid": kid})

    assert tokens.verify_access_token(sign(_claims(runtime)))["sub"] == "someone"

    # Expired: PyJWT itself (a relying service) and our helper both refuse it.
    expired = sign(_claims(runtime, iat=int(time.time()) - 600, exp=int(time.time()) - 300))
    with pytest.raises(jwt.ExpiredSignatureError):
        _verify_like_a_relying_service(client, expired, issuer)
    with pytest.raises(InvalidAccessToken):
        tokens.verify_access_token(expired)

    header, payload, _ = good.split(".")
    unsigned = jwt.encode(_claims(runtime), None, algorithm="none", headers={"kid": key.kid})
    # HS256 with the public key as the HMAC secret (the classic algorithm confusion).
    public_pem = key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs_header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    signing_input = f"{hs_header}.{payload}".encode()
    confused = [
        f"{hs_header}.{payload}.{_b64(hmac.new(secret, signing_input, 'sha256').digest())}"
        for secret in (public_pem, base64.urlsafe_b64decode(tokens.jwks()["keys"][0]["x"] + "="))
    ]
    stranger = Ed25519PrivateKey.generate()
    forged = [
        unsigned,
        *confused,
        sign(_claims(runtime, aud="another-service")),
        sign(_claims(runtime, iss="https://evil.example")),
        sign(_claims(runtime, nbf=int(time.time()) + 600)),
        sign({k: v for k, v in _claims(runtime).items() if k != "exp"}),
        sign(_claims(runtime), stranger, "deadbeefdeadbeef"),  # unknown kid
        sign(_claims(runtime), stranger, key.kid),  # known kid, wrong key
        f"{header}.{payload}.{_b64(b'x' * 64)}",  # tampered signature
        "not.a.jwt",
        "",
    ]
    for token in forged:
        with pytest.raises(InvalidAccessToken):
            tokens.verify_access_token(token)
    # A relying service that pins EdDSA refuses the algorithm confusion too.
    for token in [unsigned, *confused]:
        with pytest.raises(jwt.InvalidTokenError):
            _verify_like_a_relying_service(client, token, issuer)
