"""The HTML pages over plain HTTP (no JavaScript), on SQLite and MariaDB.

What the pages promise: they render as plain HTML forms with labelled inputs and no
script; every POST needs the CSRF token of its browser and session (a refusal is a 403
page and an ``access.denied`` event); ``next`` never leads off the site; admin pages need
their roles; page actions leave the same audit events as the API; unknown pages get a
friendly 404 while the API keeps its problem details; the CSRF key is mode 0600.
"""

from __future__ import annotations

import email
import email.policy
import re
import stat
from datetime import timedelta
from typing import Any

import pyotp
from fastapi.testclient import TestClient
from httpx2 import Response

from echo_auth.audit.search import EventFilter, search_events
from echo_auth.db.engines import transaction
from echo_auth.identity.provisioning import create_user_by_operator, issue_bootstrap_token
from echo_auth.runtime import Runtime, operator_actor
from echo_auth.web.pages.csrf import KEY_FILE_NAME
from tests.fixtures.app import PASSWORD, deliver

HTML = {"accept": "text/html,application/xhtml+xml"}
_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


def token_of(page: Response) -> str:
    match = _TOKEN.search(page.text)
    assert match, page.text[:500]
    return match.group(1)


def fresh_token(client: TestClient, path: str = "/login") -> str:
    return token_of(client.get(path, headers=HTML))


def events(runtime: Runtime, **filters: str) -> list[dict[str, Any]]:
    deliver(runtime)
    with transaction(runtime.audit, write=False) as conn:
        return search_events(conn, EventFilter(**filters), limit=500).events


def make_user(runtime: Runtime, address: str, *roles: str) -> str:
    actor, source = operator_actor()
    return create_user_by_operator(runtime.auth, address, PASSWORD, list(roles), actor, source).id


def sign_in(client: TestClient, address: str, next_url: str = "") -> Response:
    data = {"csrf_token": fresh_token(client), "email": address, "password": PASSWORD}
    if next_url:
        data["next"] = next_url
    return client.post("/login", data=data, follow_redirects=False)


def test_pages_render_as_plain_accessible_html(client: TestClient, runtime: Runtime) -> None:
    # An unknown page is a friendly 404 for browsers; the API keeps its problem details.
    r = client.get("/no/such/page", headers=HTML)
    assert r.status_code == 404 and "Page not found" in r.text
    assert "Traceback" not in r.text
    r = client.get("/v1/no/such/route", headers=HTML)
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert client.get("/no/such/page").headers["content-type"] == "application/problem+json"

    key = runtime.settings.keys_dir / KEY_FILE_NAME
    assert not key.exists()  # made on first use, not when the app is built
    fresh_token(client)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32

    for path in (
        "/login",
        "/signup",
        "/forgot-password",
        "/reset-password?token=abc",
        "/verify-email",
        "/setup?token=abc",
    ):
        r = client.get(path, headers=HTML)
        assert r.status_code == 200, (path, r.text)
        assert r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-frame-options"] == "DENY"
        body = r.text
        assert "<script" not in body and " style=" not in body and "onclick" not in body
        assert '<link rel="stylesheet" href="/static/echo.css">' in body
        for form in re.findall(r'<form method="post".*?</form>', body, re.S):
            assert 'name="csrf_token"' in form, (path, form)
        for input_id in re.findall(r'<input id="([^"]+)"', body):
            assert f'<label for="{input_id}">' in body, (path, input_id)
    css = client.get("/static/echo.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert ":focus-visible" in css.text


def test_sign_up_confirm_and_sign_in_through_the_forms(
    client: TestClient, runtime: Runtime
) -> None:
    r = client.post(
        "/signup",
        data={
            "csrf_token": fresh_token(client, "/signup"),
            "email": "Lea@Example.com",
            "password": "short",
        },
    )
    assert r.status_code == 422
    assert 'aria-invalid="true"' in r.text and "at least 12 characters" in r.text

    r = client.post(
        "/signup",
        data={"csrf_token": fresh_token(client), "email": "Lea@Example.com", "password": PASSWORD},
    )
    assert r.status_code == 200 and "Check your mail" in r.text
    (mail,) = runtime.settings.mail_dir.glob("*.eml")
    message = email.message_from_bytes(mail.read_bytes(), policy=email.policy.default)
    text = message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[attr-defined]
    link = re.search(r"http://127\.0\.0\.1:8000(/verify-email\?token=[\w-]+)", text)
    assert link, text
    r = client.get(link.group(1), headers=HTML)
    assert r.status_code == 200 and "Email address confirmed" in r.text
    assert client.get(link.group(1), headers=HTML).status_code == 400  # single use

    r = sign_in(client, "lea@example.com")
    assert r.status_code == 303 and r.headers["location"] == "/account"
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("echo_session="))
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
    r = client.get("/account", headers=HTML)
    assert r.status_code == 200 and "lea@example.com" in r.text and "confirmed" in r.text

    # A wrong current password is shown next to its field, never as a stack trace.
    r = client.post(
        "/account/password",
        data={
            "csrf_token": token_of(r),
            "current_password": "not my password at all",
            "new_password": "another long passphrase",
            "new_password_repeat": "another long passphrase",
        },
    )
    assert r.status_code == 422
    assert 'id="f-current_password-error"' in r.text and "not your current password" in r.text

    user_id = events(runtime, action="user.signed_up")[0]["target"]["id"]
    verified = events(runtime, action="user.email_verified")
    # Newest first: the reused link was refused after the first use confirmed.
    assert [(e["outcome"], e["actor"]["id"]) for e in verified] == [
        ("failure", None),
        ("success", user_id),
    ]
    login = events(runtime, action="auth.login.succeeded")[0]
    assert login["actor"] == {"type": "user", "id": user_id, "label": "lea@example.com"}
    assert login["source"]["ip"] == "testclient" and login["request_id"]
    changed = events(runtime, action="password.changed")[0]
    assert (changed["outcome"], changed["reason"]) == ("failure", "bad_password")


def test_posts_without_the_right_csrf_token_are_refused(
    client: TestClient, runtime: Runtime
) -> None:
    make_user(runtime, "max@example.com")
    login = {"email": "max@example.com", "password": PASSWORD}
    r = client.post("/login", data=login, headers=HTML)
    assert r.status_code == 403 and "This form has expired" in r.text
    assert r.headers["content-type"].startswith("text/html")
    assert client.post("/login", data={**login, "csrf_token": "forged"}).status_code == 403

    # A token is bound to its browser's nonce cookie: another browser's token fails.
    other = TestClient(client.app, base_url="http://127.0.0.1:8000")
    stolen = fresh_token(other)
    fresh_token(client)
    assert client.post("/login", data={**login, "csrf_token": stolen}).status_code == 403

    # ... and, once signed in, to the session: the anonymous token no longer works.
    anonymous = fresh_token(client)
    assert sign_in(client, "max@example.com").status_code == 303
    r = client.post("/logout", data={"csrf_token": anonymous}, follow_redirects=False)
    assert r.status_code == 403
    assert client.get("/account", headers=HTML).status_code == 200  # still signed in
    r = client.post(
        "/logout", data={"csrf_token": fresh_token(client, "/account")}, follow_redirects=False
    )
    assert r.status_code == 303 and r.headers["location"] == "/login"

    denied = events(runtime, action="access.denied")
    assert len(denied) == 4
    assert {e["reason"] for e in denied} == {"csrf"}
    assert {e["metadata"]["route"] for e in denied} == {"/login", "/logout"}
    assert denied[0]["actor"]["label"] == "max@example.com"  # the signed-in refusal
    assert len(events(runtime, action="auth.login.succeeded")) == 1


def test_next_never_leads_off_the_site(client: TestClient, runtime: Runtime) -> None:
    make_user(runtime, "ivo@example.com")
    r = client.get("/account", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Faccount"
    r = client.get("/admin/audit?action=auth.%2A", follow_redirects=False)
    assert r.headers["location"] == "/login?next=%2Fadmin%2Faudit%3Faction%3Dauth.%252A"

    for evil in ("//evil.example", "https://evil.example/", "/\\evil.example", "/\t/evil"):
        r = client.get("/login", params={"next": evil}, headers=HTML)
        assert 'name="next" value=""' in r.text, evil
        r = sign_in(client, "ivo@example.com", next_url=evil)
        assert r.status_code == 303 and r.headers["location"] == "/account", evil
        client.cookies.clear()
    r = sign_in(client, "ivo@example.com", next_url="/account?tab=1#password")
    assert r.headers["location"] == "/account?tab=1#password"


def test_admin_pages_need_their_roles(client: TestClient, runtime: Runtime) -> None:
    target = make_user(runtime, "plain@example.com")
    make_user(runtime, "auditor@example.com", "auditor")
    make_user(runtime, "admin@example.com", "admin")
    expected = {
        "plain@example.com": {"/admin/users": 403, "/admin/audit": 403},
        "auditor@example.com": {"/admin/users": 403, "/admin/audit": 200},
        # As GET /v1/audit/events: the audit pages take auditor or admin.
        "admin@example.com": {"/admin/users": 200, "/admin/audit": 200},
    }
    for address, answers in expected.items():
        client.cookies.clear()
        assert sign_in(client, address).status_code == 303
        for path, status in answers.items():
            r = client.get(path, headers=HTML)
            assert r.status_code == status, (address, path)
            if status == 403:
                assert "This page needs the role" in r.text
        r = client.post(
            f"/admin/users/{target}/disable",
            data={"csrf_token": fresh_token(client, "/account")},
            follow_redirects=False,
        )
        assert r.status_code == (303 if address.startswith("admin") else 403), address
    denied = events(runtime, action="access.denied")
    assert {(e["actor"]["label"], e["metadata"]["route"]) for e in denied} == {
        ("plain@example.com", "/admin/users"),
        ("plain@example.com", "/admin/audit"),
        ("plain@example.com", f"/admin/users/{target}/disable"),
        ("auditor@example.com", "/admin/users"),
        ("auditor@example.com", f"/admin/users/{target}/disable"),
    }
    assert {e["reason"] for e in denied} == {"missing_role"}


def test_admin_and_audit_pages_record_what_the_api_records(
    client: TestClient, runtime: Runtime
) -> None:
    target = make_user(runtime, "rosa@example.com")
    admin_id = make_user(runtime, "boss@example.com", "admin", "auditor")
    assert sign_in(client, "boss@example.com").status_code == 303

    page = client.get("/admin/users", params={"q": "rosa"}, headers=HTML)
    assert page.status_code == 200 and "rosa@example.com" in page.text
    token = token_of(page)
    r = client.post(
        f"/admin/users/{target}/disable",
        data={"csrf_token": token, "back": "/admin/users?q=rosa"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/admin/users?q=rosa"
    r = client.post(
        f"/admin/users/{target}/roles",
        data={"csrf_token": token, "roles": ["auditor"], "back": "https://evil.example/"},
        follow_redirects=False,
    )
    assert r.headers["location"] == "/admin/users"
    page = client.get("/admin/users", params={"q": "rosa"}, headers=HTML)
    assert "disabled" in page.text and "now has the roles auditor, user" in page.text

    deliver(runtime)
    page = client.get("/admin/audit", params={"action": "admin.user.*", "since": "2000-01-01"})
    assert page.status_code == 200
    assert page.text.count("<tr>") == 1 + 4  # header + listed, listed, disabled, roles_changed
    assert "/v1/audit/export?format=csv&amp;action=admin.user.%2A&amp;since=2000-01-01" in page.text
    bad = client.get("/admin/audit", params={"since": "yesterday"}, headers=HTML)
    assert bad.status_code == 422 and 'id="f-since-error"' in bad.text

    disabled = events(runtime, action="admin.user.disabled")[0]
    detail = client.get(f"/admin/audit/events/{disabled['event_id']}", headers=HTML)
    assert detail.status_code == 200
    for value in (disabled["hash"], disabled["prev_hash"], str(disabled["seq"])):
        assert value in detail.text
    assert f"matches event {disabled['seq'] - 1}" in detail.text
    assert client.get("/admin/audit/events/no-such-event", headers=HTML).status_code == 404

    r = client.post("/admin/audit/verify", data={"csrf_token": token_of(detail)})
    assert r.status_code == 200 and "Intact." in r.text

    assert disabled["actor"] == {"type": "admin", "id": admin_id, "label": "boss@example.com"}
    assert disabled["target"] == {"type": "user", "id": target}
    roles = events(runtime, action="admin.user.roles_changed")[0]
    assert roles["metadata"] == {"before": ["user"], "after": ["auditor", "user"]}
    assert len(events(runtime, action="admin.user.listed")) == 2
    searched = events(runtime, action="audit.searched")
    assert [e["metadata"] for e in searched][::-1] == [
        {
            "filters": {"action": "admin.user.*", "since": "2000-01-01T00:00:00+00:00"},
            "returned": 4,
        },
        {"event_id": disabled["event_id"]},
        {"event_id": "no-such-event"},
    ]
    # Both audit page views read the pipeline; the refused filter searched nothing.
    assert len(events(runtime, action="audit.pipeline.viewed")) == 2
    (verified,) = events(runtime, action="audit.verified")
    assert verified["metadata"]["intact"] is True


def test_totp_through_the_account_page(client: TestClient, runtime: Runtime) -> None:
    make_user(runtime, "tia@example.com")
    assert sign_in(client, "tia@example.com").status_code == 303
    page = client.post("/account/mfa/totp", data={"csrf_token": fresh_token(client, "/account")})
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    assert 'src="data:image/svg+xml;base64,' in page.text
    secret = re.search(r'id="totp-secret">([A-Z2-7]+)<', page.text)
    assert secret
    totp = pyotp.TOTP(secret.group(1))
    wrong = "000000" if totp.now() != "000000" else "111111"
    r = client.post("/account/mfa/totp/confirm", data={"csrf_token": token_of(page), "code": wrong})
    assert r.status_code == 400 and 'id="f-code-error"' in r.text
    r = client.post(
        "/account/mfa/totp/confirm", data={"csrf_token": token_of(page), "code": totp.now()}
    )
    assert r.status_code == 200 and "shown only this once" in r.text
    codes = re.findall(r"<li><code>([a-z2-9]{5}-[a-z2-9]{5})</code></li>", r.text)
    assert len(codes) == 10

    client.cookies.clear()
    r = sign_in(client, "tia@example.com")
    assert r.status_code == 200 and 'action="/login/mfa"' in r.text
    mfa_token = re.search(r'name="mfa_token" value="([^"]+)"', r.text)
    assert mfa_token
    r = client.post(
        "/login/mfa",
        data={"csrf_token": token_of(r), "mfa_token": mfa_token.group(1), "code": codes[0]},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/account"
    assert "on</span>" in client.get("/account").text
    assert [e["metadata"]["method"] for e in events(runtime, action="auth.mfa.succeeded")] == [
        "recovery"
    ]
    assert len(events(runtime, action="mfa.totp.enrolled")) == 1


def test_first_admin_setup_and_password_reset_pages(client: TestClient, runtime: Runtime) -> None:
    with transaction(runtime.identity) as conn:
        token = issue_bootstrap_token(conn, timedelta(hours=1))
    assert token is not None
    page = client.get("/setup", params={"token": token}, headers=HTML)
    assert page.status_code == 200 and f'value="{token}"' in page.text
    form = {"csrf_token": token_of(page), "token": token, "email": "First@Example.com"}
    r = client.post("/setup", data={**form, "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert "administrator account is ready" in client.get("/login").text  # the flash, once
    assert "administrator account is ready" not in client.get("/login").text
    r = client.post("/setup", data={**form, "password": PASSWORD})
    assert r.status_code == 400 and 'id="f-token-error"' in r.text

    # Forgotten password: the mailed link leads to the page that sets a new one.
    r = client.post(
        "/forgot-password",
        data={"csrf_token": fresh_token(client), "email": "first@example.com"},
    )
    assert r.status_code == 200 and "a mail is on its way" in r.text
    (mail,) = runtime.settings.mail_dir.glob("*.eml")
    message = email.message_from_bytes(mail.read_bytes(), policy=email.policy.default)
    text = message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[attr-defined]
    link = re.search(r"http://127\.0\.0\.1:8000(/reset-password\?token=[\w-]+)", text)
    assert link, text
    page = client.get(link.group(1), headers=HTML)
    reset_token = re.search(r'name="token" value="([^"]+)"', page.text)
    assert page.status_code == 200 and reset_token
    new = {"csrf_token": token_of(page), "token": reset_token.group(1)}
    r = client.post(
        "/reset-password",
        data={**new, "new_password": "a new long passphrase", "new_password_repeat": "other"},
    )
    assert r.status_code == 422 and 'id="f-new_password_repeat-error"' in r.text
    fresh = "a new long passphrase"
    r = client.post(
        "/reset-password",
        data={**new, "new_password": fresh, "new_password_repeat": fresh},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/login"
    login = {"csrf_token": fresh_token(client), "email": "first@example.com", "password": fresh}
    r = client.post("/login", data=login, follow_redirects=False)
    assert r.status_code == 303
    assert client.get("/admin/users", headers=HTML).status_code == 200

    assert [e["metadata"]["via"] for e in events(runtime, action="user.signed_up")] == ["bootstrap"]
    assert len(events(runtime, action="password.reset.completed")) == 1
