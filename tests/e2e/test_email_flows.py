"""Email verification, password reset and the password policy, through HTTP.

Mail goes to ``settings.mail_dir`` as .eml files (no SMTP URL in tests); the tests read
the links out of them as a user would. Every action is checked against the event it
must leave in the chain, and no token or password may appear in any stored event or
any log line.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import logging
import re
import secrets
import smtplib
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from echo_auth.audit.events import Source
from echo_auth.audit.search import EventFilter, search_events
from echo_auth.db.audit_schema import audit_events
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import one_time_tokens
from echo_auth.identity.errors import InvalidToken
from echo_auth.identity.tokens import token_hash
from echo_auth.runtime import Runtime
from tests.fixtures.app import PASSWORD, deliver

NEW_PASSWORD = "a brand new and long passphrase"
BASE_URL = "http://127.0.0.1:8000"
TOKEN_IN_LINK = re.compile(r"token=([A-Za-z0-9_-]+)")
SOURCE = Source(ip="192.0.2.7", user_agent="pytest")


# -- helpers ------------------------------------------------------------------------------


def mails(runtime: Runtime) -> list[EmailMessage]:
    """Every mail written so far, oldest first (the file names start with the time)."""
    folder = runtime.settings.mail_dir
    if not folder.exists():
        return []
    out = []
    for path in sorted(folder.glob("*.eml")):
        parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        out.append(parsed)
    return out


def text_of(message: EmailMessage) -> str:
    plain = message.get_body(("plain",))
    assert plain is not None
    return str(plain.get_content())


def html_of(message: EmailMessage) -> str:
    html = message.get_body(("html",))
    assert html is not None
    return str(html.get_content())


def link_token(message: EmailMessage, path: str) -> str:
    """The token of the ``{base_url}{path}?token=...`` link, checked in both bodies."""
    text = text_of(message)
    match = re.search(re.escape(f"{BASE_URL}{path}?") + TOKEN_IN_LINK.pattern, text)
    assert match, text
    token = match.group(1)
    assert f"{BASE_URL}{path}?token={token}" in html_of(message)
    return token


def signup(client: TestClient, address: str, password: str = PASSWORD) -> str:
    r = client.post("/v1/signup", json={"email": address, "password": password})
    assert r.status_code == 201, r.text
    return str(r.json()["user_id"])


def login(client: TestClient, address: str, password: str = PASSWORD) -> str:
    r = client.post("/v1/login", json={"email": address, "password": password})
    assert r.status_code == 200, r.text
    client.cookies.clear()
    return str(r.json()["session_token"])


def me(client: TestClient, session: str) -> dict[str, Any]:
    r = client.get("/v1/me", headers={"Authorization": f"Bearer {session}"})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def assert_problem(r: Any, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == code, r.json()


def events(runtime: Runtime, **filters: str) -> list[dict[str, Any]]:
    """Delivered events, oldest first."""
    deliver(runtime)
    with transaction(runtime.audit, write=False) as conn:
        found = search_events(conn, EventFilter(**filters), limit=500).events
    return list(reversed(found))


def assert_no_secrets(runtime: Runtime, caplog: pytest.LogCaptureFixture, *secrets_: str) -> None:
    """None of ``secrets_`` in any stored audit row (every column) nor in any log record."""
    deliver(runtime)
    with transaction(runtime.audit, write=False) as conn:
        rows = conn.execute(select(audit_events)).all()
    assert rows
    stored = repr([tuple(row) for row in rows])
    logged = caplog.text + repr([r.args for r in caplog.records])
    for secret in secrets_:
        assert secret not in stored
        assert secret not in logged


def expire(runtime: Runtime, token: str) -> None:
    with transaction(runtime.identity) as conn:
        result = conn.execute(
            update(one_time_tokens)
            .where(one_time_tokens.c.token_hash == token_hash(token))
            .values(expires_at=datetime.now(UTC) - timedelta(minutes=1))
        )
        assert result.rowcount == 1


@pytest.fixture(autouse=True)
def _capture_all_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)


# -- email verification -------------------------------------------------------------------


def test_signup_mails_a_link_that_verifies_the_address(
    client: TestClient, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    user_id = signup(client, "Ana@Example.com")
    [mail] = mails(runtime)
    assert mail["To"] == "ana@example.com"
    assert mail["From"] == runtime.settings.mail_from
    assert mail["Subject"] == "Confirm your email address"
    token = link_token(mail, "/verify-email")
    assert token in text_of(mail) and "24 hours" in text_of(mail)

    session = login(client, "ana@example.com")
    assert me(client, session)["email_verified"] is False
    r = client.post("/v1/email-verification/confirm", json={"token": token})
    assert r.status_code == 204, r.text
    assert me(client, session)["email_verified"] is True

    # Single use.
    again = client.post("/v1/email-verification/confirm", json={"token": token})
    assert_problem(again, 400, "invalid_token")

    sent = events(runtime, action="user.email_verification.sent")
    assert [
        (e["outcome"], e["actor"]["type"], e["actor"]["id"], e["target"]["id"]) for e in sent
    ] == [("success", "user", user_id, user_id)]
    assert sent[0]["metadata"]["via"] == "signup"
    verified = events(runtime, action="user.email_verified")
    assert [(e["outcome"], e["reason"], e["actor"]["type"]) for e in verified] == [
        ("success", None, "user"),
        ("failure", "invalid_token", "anonymous"),
    ]
    assert verified[0]["actor"]["id"] == verified[0]["target"]["id"] == user_id
    assert verified[0]["source"]["ip"] == "testclient" and verified[0]["request_id"]
    assert_no_secrets(runtime, caplog, token, PASSWORD, session)


def test_expired_forged_and_replaced_verification_tokens_are_refused(
    client: TestClient, runtime: Runtime
) -> None:
    signup(client, "bo@example.com")
    first = link_token(mails(runtime)[0], "/verify-email")

    r = client.post("/v1/email-verification/resend", json={"email": "BO@example.com"})
    assert r.status_code == 202, r.text
    assert len(mails(runtime)) == 2
    second = link_token(mails(runtime)[1], "/verify-email")
    assert second != first
    # A new link replaces the old one.
    assert_problem(
        client.post("/v1/email-verification/confirm", json={"token": first}), 400, "invalid_token"
    )
    expire(runtime, second)
    assert_problem(
        client.post("/v1/email-verification/confirm", json={"token": second}),
        400,
        "invalid_token",
    )
    forged = secrets.token_urlsafe(32)
    assert_problem(
        client.post("/v1/email-verification/confirm", json={"token": forged}), 400, "invalid_token"
    )
    for bad in ("", "x" * 257):
        r = client.post("/v1/email-verification/confirm", json={"token": bad})
        assert_problem(r, 422, "validation_error")

    session = login(client, "bo@example.com")
    assert me(client, session)["email_verified"] is False
    verified = events(runtime, action="user.email_verified")
    assert [(e["outcome"], e["reason"]) for e in verified] == [("failure", "invalid_token")] * 3


def test_resend_answers_alike_and_mails_only_unverified_accounts(
    client: TestClient, runtime: Runtime
) -> None:
    ana = signup(client, "ana@example.com")
    token = link_token(mails(runtime)[0], "/verify-email")
    assert client.post("/v1/email-verification/confirm", json={"token": token}).status_code == 204
    bo = signup(client, "bo@example.com")
    assert len(mails(runtime)) == 2

    answers = [
        client.post("/v1/email-verification/resend", json={"email": address})
        for address in ("nobody@example.com", "ana@example.com", "bo@example.com")
    ]
    assert {r.status_code for r in answers} == {202}
    assert answers[0].json() == answers[1].json() == answers[2].json()
    assert answers[0].headers["content-type"] == answers[2].headers["content-type"]
    # Only the unverified account got a mail.
    new = mails(runtime)[2:]
    assert [m["To"] for m in new] == ["bo@example.com"]

    r = client.post("/v1/email-verification/resend", json={"email": "not-an-address"})
    assert_problem(r, 422, "validation_error")

    sent = events(runtime, action="user.email_verification.sent")
    summary = [
        (e["outcome"], e["reason"], e["actor"]["type"], e["actor"]["label"], e["target"]["id"])
        for e in sent
        if e["metadata"]["via"] == "resend"
    ]
    assert summary == [
        ("failure", "unknown_user", "anonymous", "nobody@example.com", None),
        ("failure", "already_verified", "anonymous", "ana@example.com", ana),
        ("success", None, "anonymous", "bo@example.com", bo),
    ]


def test_signup_with_a_taken_address_mails_its_owner_not_the_caller(
    client: TestClient, runtime: Runtime
) -> None:
    signup(client, "ana@example.com")
    token = link_token(mails(runtime)[0], "/verify-email")
    assert client.post("/v1/email-verification/confirm", json={"token": token}).status_code == 204
    signup(client, "ANA@example.com", PASSWORD + " again")
    notice = mails(runtime)[1]
    assert notice["To"] == "ana@example.com"
    assert notice["Subject"] == "Someone tried to sign up with your email address"
    assert f"{BASE_URL}/login" in text_of(notice) and "token" not in text_of(notice)

    # An unverified account: the repeated sign-up mails a fresh link, which replaces the first.
    bo = signup(client, "bo@example.com")
    first = link_token(mails(runtime)[2], "/verify-email")
    signup(client, "bo@example.com")
    second = link_token(mails(runtime)[3], "/verify-email")
    assert_problem(
        client.post("/v1/email-verification/confirm", json={"token": first}), 400, "invalid_token"
    )
    assert client.post("/v1/email-verification/confirm", json={"token": second}).status_code == 204
    sent = [
        (e["metadata"]["via"], e["actor"]["type"], e["target"]["id"])
        for e in events(runtime, action="user.email_verification.sent")
        if e["target"]["id"] == bo
    ]
    assert sent == [("signup", "user", bo), ("signup_repeat", "anonymous", bo)]


# -- password reset -----------------------------------------------------------------------


def test_password_reset_end_to_end(
    client: TestClient, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    user_id = signup(client, "anabel@example.com")
    sessions = [login(client, "anabel@example.com") for _ in range(2)]
    assert len(mails(runtime)) == 1

    known = client.post("/v1/password-reset", json={"email": "Anabel@example.com"})
    unknown = client.post("/v1/password-reset", json={"email": "ghost@example.com"})
    assert known.status_code == unknown.status_code == 202
    assert known.content == unknown.content
    assert known.headers["content-type"] == unknown.headers["content-type"]
    [mail] = mails(runtime)[1:]
    assert mail["To"] == "anabel@example.com" and mail["Subject"] == "Reset your password"
    token = link_token(mail, "/reset-password")
    assert "1 hour" in text_of(mail)

    weak_attempts = ["password1234", "Anabel likes long walks"]
    for weak in weak_attempts:
        r = client.post("/v1/password-reset/confirm", json={"token": token, "new_password": weak})
        assert_problem(r, 422, "weak_password")
    # A refused password leaves the token usable.
    r = client.post(
        "/v1/password-reset/confirm", json={"token": token, "new_password": NEW_PASSWORD}
    )
    assert r.status_code == 204, r.text

    for session in sessions:
        r = client.get("/v1/me", headers={"Authorization": f"Bearer {session}"})
        assert_problem(r, 401, "not_authenticated")
    r = client.post("/v1/login", json={"email": "anabel@example.com", "password": PASSWORD})
    assert_problem(r, 401, "invalid_credentials")
    fresh = login(client, "anabel@example.com", NEW_PASSWORD)
    # Following the mailed link proved the address too.
    assert me(client, fresh)["email_verified"] is True

    again = client.post(
        "/v1/password-reset/confirm", json={"token": token, "new_password": NEW_PASSWORD + "!"}
    )
    assert_problem(again, 400, "invalid_token")
    login(client, "anabel@example.com", NEW_PASSWORD)

    requested = events(runtime, action="password.reset.requested")
    assert [
        (e["outcome"], e["reason"], e["actor"]["type"], e["actor"]["label"], e["target"]["id"])
        for e in requested
    ] == [
        ("success", None, "anonymous", "anabel@example.com", user_id),
        ("failure", "unknown_user", "anonymous", "ghost@example.com", None),
    ]
    completed = events(runtime, action="password.reset.completed")
    assert [(e["outcome"], e["reason"], e["actor"]["type"]) for e in completed] == [
        ("success", None, "user"),
        ("failure", "invalid_token", "anonymous"),
    ]
    assert completed[0]["actor"]["id"] == completed[0]["target"]["id"] == user_id
    assert completed[0]["metadata"] == {"sessions_revoked": 2}
    revoked = events(runtime, action="session.revoked")
    assert [(e["reason"], e["target"]["id"], e["metadata"]) for e in revoked] == [
        ("password_reset", user_id, {"count": 2})
    ]
    verified = events(runtime, action="user.email_verified")
    assert [(e["outcome"], e["metadata"]["via"]) for e in verified] == [
        ("success", "password_reset")
    ]
    assert_no_secrets(
        runtime, caplog, token, PASSWORD, NEW_PASSWORD, *weak_attempts, *sessions, fresh
    )


def test_expired_and_replaced_reset_tokens_are_refused(
    client: TestClient, runtime: Runtime
) -> None:
    signup(client, "cy@example.com")
    verification = link_token(mails(runtime)[-1], "/verify-email")
    client.post("/v1/password-reset", json={"email": "cy@example.com"})
    first = link_token(mails(runtime)[-1], "/reset-password")
    client.post("/v1/password-reset", json={"email": "cy@example.com"})
    second = link_token(mails(runtime)[-1], "/reset-password")
    expire(runtime, second)
    forged = secrets.token_urlsafe(32)
    # Replaced, expired, forged, and a live token of another purpose.
    for token in (first, second, forged, verification):
        r = client.post(
            "/v1/password-reset/confirm", json={"token": token, "new_password": NEW_PASSWORD}
        )
        assert_problem(r, 400, "invalid_token")
    login(client, "cy@example.com")  # the password did not change
    failed = events(runtime, action="password.reset.completed")
    assert [(e["outcome"], e["reason"]) for e in failed] == [("failure", "invalid_token")] * 4
    # The verification token was not used up by the attempt.
    r = client.post("/v1/email-verification/confirm", json={"token": verification})
    assert r.status_code == 204, r.text


def test_reset_token_is_used_once_under_concurrency(runtime: Runtime) -> None:
    runtime.auth.signup("dee@example.com", PASSWORD, SOURCE)
    runtime.email_flows.request_reset("dee@example.com", SOURCE)
    token = link_token(mails(runtime)[-1], "/reset-password")

    def attempt(n: int) -> str:
        try:
            runtime.email_flows.complete_reset(token, f"{NEW_PASSWORD} number {n}", SOURCE)
        except InvalidToken:
            return "refused"
        return "reset"

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(attempt, range(4)))
    assert sorted(results) == ["refused"] * 3 + ["reset"]
    completed = events(runtime, action="password.reset.completed")
    assert sorted(e["outcome"] for e in completed) == ["failure"] * 3 + ["success"]


def test_reset_mails_per_user_are_capped(runtime: Runtime) -> None:
    runtime.auth.signup("eve@example.com", PASSWORD, SOURCE)
    limit = runtime.email_flows.mails_per_hour
    before = len(mails(runtime))
    for _ in range(limit + 2):
        runtime.email_flows.request_reset("eve@example.com", SOURCE)
    assert len(mails(runtime)) - before == limit
    requested = events(runtime, action="password.reset.requested")
    assert [(e["outcome"], e["reason"]) for e in requested] == [("success", None)] * limit + [
        ("denied", "too_many_mails")
    ] * 2


class BrokenMailer:
    """A mail server that hangs up; keeps what it was given."""

    def __init__(self) -> None:
        self.given: list[EmailMessage] = []

    def send(self, message: EmailMessage) -> None:
        self.given.append(message)
        raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")


def test_a_failed_mail_is_logged_and_recorded_but_the_request_stands(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    user_id = runtime.auth.signup("fay@example.com", PASSWORD, SOURCE)
    broken = BrokenMailer()
    flows = dataclasses.replace(runtime.email_flows, mailer=broken)
    flows.request_reset("fay@example.com", SOURCE)  # does not raise
    [message] = broken.given
    token = link_token(message, "/reset-password")

    [warning] = [r for r in caplog.records if r.name == "echo_auth.mail"]
    assert warning.levelno == logging.WARNING
    assert "reset_password" in warning.getMessage() and user_id in warning.getMessage()
    assert "fay@example.com" not in warning.getMessage()

    [requested] = events(runtime, action="password.reset.requested")
    [failed] = events(runtime, action="mail.delivery.failed")
    assert requested["outcome"] == "success"
    assert (failed["outcome"], failed["reason"], failed["target"]["id"]) == (
        "failure",
        "SMTPServerDisconnected",
        user_id,
    )
    assert failed["metadata"] == {"template": "reset_password", "for_event": requested["event_id"]}
    # The token that was issued is real: the user may still use it, or simply ask again.
    flows.complete_reset(token, NEW_PASSWORD, SOURCE)
    assert_no_secrets(runtime, caplog, token, PASSWORD, NEW_PASSWORD)


# -- password policy ----------------------------------------------------------------------


def test_common_passwords_are_refused_on_signup(client: TestClient, runtime: Runtime) -> None:
    for password in (
        "password1234",
        "PASSWORD1234",
        "qwerty123456",
        "1qaz2wsx3edc",
        "international",
    ):
        r = client.post("/v1/signup", json={"email": "gus@example.com", "password": password})
        assert_problem(r, 422, "weak_password")
        assert "common" in r.json()["detail"]
        assert r.json()["errors"][0]["field"] == "password"
    assert mails(runtime) == []
    assert events(runtime, action="user.signed_up") == []
