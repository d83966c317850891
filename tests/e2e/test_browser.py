"""The pages in a real browser: Playwright driving Debian's Chromium, JavaScript off.

The real server (``echo-auth serve`` on fresh SQLite files, relay in-process) and the real
mail folder. A new user signs up, confirms their address from the mail, signs in, turns on
TOTP with a code computed from the secret on the page, signs out and back in with the
second factor; then an admin finds those events in the audit viewer by filter and opens
one. Every step leaves a screenshot in ``test-artifacts/browser/``.

Chromium is never downloaded: ``make test`` installs Debian's package when it is missing
(``scripts/ensure-chromium``). Without it the test is skipped, except under ``CI=true``.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pyotp
import pytest

from tests.e2e.test_serve import Output, free_port, wait_for
from tests.fixtures.app import PASSWORD

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("ECHO_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
USER = "mira@example.com"
ADMIN = "root@example.com"
TIMEOUT_S = 60


def _skip_or_fail(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: the browser tests must run)")
    pytest.skip(message)


@dataclass(frozen=True)
class Server:
    base: str
    data_dir: Path


def _echo(args: list[str], env: dict[str, str], cwd: Path, stdin: str = "") -> None:
    done = subprocess.run(
        [sys.executable, "-m", "echo_auth", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, f"echo-auth {' '.join(args)}: {done.stderr}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ECHO_")},
        "ECHO_DATA_DIR": str(tmp_path / "var"),
        "ECHO_BASE_URL": base,
        "ECHO_ARGON2_TIME_COST": "1",
        "ECHO_ARGON2_MEMORY_KIB": "1024",
        "ECHO_ARGON2_PARALLELISM": "1",
        "ECHO_RELAY_IDLE_SLEEP_S": "0.05",
    }
    _echo(["db", "upgrade"], env, tmp_path)
    _echo(
        ["user", "create", "--email", ADMIN, "--role", "admin", "--role", "auditor"],
        env,
        tmp_path,
        stdin=PASSWORD + "\n",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "echo_auth", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = Output(proc.stdout), Output(proc.stderr)

    def up() -> bool:
        assert proc.poll() is None, err.text()
        try:
            return httpx2.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx2.HTTPError:
            return False

    try:
        wait_for(up, TIMEOUT_S, "echo-auth serve to answer")
        yield Server(base, tmp_path / "var")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        out.join()
        err.join()
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        _skip_or_fail(f"no Chromium at {CHROMIUM} (run scripts/ensure-chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip_or_fail("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as pw:
        instance = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield instance
        finally:
            instance.close()


def _mail_link(mail_dir: Path, path: str) -> str:
    """The link to ``path`` in the newest mail of the folder."""
    found: list[str] = []

    def arrived() -> bool:
        for eml in sorted(mail_dir.glob("*.eml"), reverse=True):
            message = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
            body = message.get_body(preferencelist=("plain",))  # type: ignore[attr-defined]
            match = re.search(rf"https?://\S+{re.escape(path)}\?token=[\w-]+", body.get_content())
            if match:
                found.append(match.group(0))
                return True
        return False

    wait_for(arrived, 10, f"a mail with a {path} link")
    return found[0]


def test_sign_up_verify_mfa_and_audit_in_a_browser(server: Server, browser: object) -> None:
    from playwright.sync_api import Browser, Page, expect

    assert isinstance(browser, Browser)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    base = server.base

    def shot(page: Page, name: str) -> None:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    # Plain HTML forms only: the whole journey runs with JavaScript off.
    context = browser.new_context(
        java_script_enabled=False, viewport={"width": 1280, "height": 860}
    )
    context.set_default_timeout(10_000)
    page = context.new_page()

    # 1. Sign up.
    page.goto(f"{base}/signup")
    page.get_by_label("Email address").fill(USER)
    page.get_by_label("Password").fill(PASSWORD)
    shot(page, "01-signup")
    page.get_by_role("button", name="Create account").click()
    expect(page.get_by_role("heading", name="Check your mail")).to_be_visible()
    shot(page, "02-signup-sent")

    # 2. The verification mail, from the mail folder; following its link confirms.
    page.goto(_mail_link(server.data_dir / "mail", "/verify-email"))
    expect(page.get_by_role("heading", name="Email address confirmed")).to_be_visible()
    shot(page, "03-email-confirmed")

    # 3. Sign in.
    page.goto(f"{base}/login")
    page.get_by_label("Email address").fill(USER)
    page.get_by_label("Password").fill(PASSWORD)
    shot(page, "04-login")
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{base}/account")
    expect(page.get_by_text("confirmed", exact=True)).to_be_visible()
    shot(page, "05-account")

    # 4. Turn on TOTP: the secret is read off the page, the code computed with pyotp.
    page.get_by_role("button", name="Set up an authenticator app").click()
    expect(page.get_by_role("img", name="QR code for your authenticator app")).to_be_visible()
    totp = pyotp.TOTP(page.locator("#totp-secret").inner_text().strip())
    shot(page, "06-totp-enrol")
    enrolled_step = int(time.time()) // 30
    page.get_by_label("Code from the app").fill(totp.at(enrolled_step * 30))
    page.get_by_role("button", name="Turn on two-step sign-in").click()
    expect(page.get_by_text("Save these recovery codes now.")).to_be_visible()
    assert page.locator("ul.codes li").count() == 10
    shot(page, "07-recovery-codes")

    # 5. Sign out.
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(f"{base}/login")
    expect(page.get_by_text("You are signed out.")).to_be_visible()
    shot(page, "08-signed-out")

    # 6. Sign in again: password, then the TOTP code. The enrolment used up its step, so
    # the code is for a later step: the current one, or the next (accepted, like a phone
    # whose clock runs a little ahead) rather than waiting up to 30 s for it.
    page.get_by_label("Email address").fill(USER)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Two-step sign-in")).to_be_visible()
    shot(page, "09-mfa-step")
    step = max(int(time.time()) // 30, enrolled_step + 1)
    page.get_by_label("Authentication code").fill(totp.at(step * 30))
    page.get_by_role("button", name="Verify and sign in").click()
    expect(page).to_have_url(f"{base}/account")
    expect(page.locator("#mfa").get_by_text("on", exact=True)).to_be_visible()
    shot(page, "10-signed-in-with-mfa")
    context.close()

    # 7. An admin (created with `echo-auth user create`) finds those events by filter.
    context = browser.new_context(
        java_script_enabled=False, viewport={"width": 1400, "height": 900}
    )
    context.set_default_timeout(10_000)
    page = context.new_page()
    page.goto(f"{base}/admin/audit")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Fadmin%2Faudit$"))
    page.get_by_label("Email address").fill(ADMIN)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{base}/admin/audit")

    page.get_by_label("Actor (email or id)").fill(USER)
    page.get_by_role("button", name="Search").click()
    expect(page).to_have_url(re.compile(r"actor=mira%40example.com"))
    wanted = [
        "user.signed_up",
        "user.email_verified",
        "auth.login.succeeded",
        "mfa.totp.enrolled",
        "auth.logout",
        "auth.mfa.succeeded",
    ]

    def all_delivered() -> bool:
        page.reload()
        table = page.locator("table.events").all_inner_texts()
        return bool(table) and all(action in table[0] for action in wanted)

    wait_for(all_delivered, 15, "the user's events in the audit viewer")
    shot(page, "11-admin-audit-by-actor")

    page.get_by_label("Action", exact=True).fill("auth.mfa.succeeded")
    page.get_by_role("button", name="Search").click()
    rows = page.locator("table.events tbody tr")
    expect(rows).to_have_count(1)
    export = page.get_by_role("link", name="CSV")
    assert "format=csv" in (export.get_attribute("href") or "")
    assert "action=auth.mfa.succeeded" in (export.get_attribute("href") or "")
    shot(page, "12-admin-audit-filtered")

    rows.first.get_by_role("link", name="auth.mfa.succeeded").click()
    expect(
        page.get_by_role("heading", name=re.compile(r"^Event \d+: auth.mfa.succeeded"))
    ).to_be_visible()
    expect(page.get_by_text("Previous hash")).to_be_visible()
    expect(page.get_by_text(re.compile(r"^matches event \d+$"))).to_be_visible()
    shot(page, "13-audit-event")
    page.get_by_role("link", name=re.compile(r"Previous event")).click()
    expect(page.get_by_role("heading", name=re.compile(r"^Event \d+:"))).to_be_visible()

    # The rest of the admin pages, for the record.
    page.goto(f"{base}/admin/audit")
    page.get_by_role("button", name="Verify the chain now").click()
    expect(page.get_by_text("Intact.")).to_be_visible()
    shot(page, "14-audit-verify")
    page.goto(f"{base}/admin/users")
    expect(page.locator("table.users")).to_contain_text(USER)
    shot(page, "15-admin-users")
    page.goto(f"{base}/no/such/page")
    expect(page.get_by_role("heading", name="Page not found")).to_be_visible()
    shot(page, "16-not-found")
    context.close()
