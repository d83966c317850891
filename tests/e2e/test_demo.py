"""``echo-auth demo seed`` on fresh SQLite databases, as ``make demo`` runs it.

The demo must leave a story in the audit log (every kind of event the pages show), an
intact chain with a signed checkpoint, an empty outbox, and printed credentials that
work. A second run refuses: exit code 2 and one line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from echo_auth.audit.events import Source
from echo_auth.audit.pipeline import pipeline_status
from echo_auth.audit.verify import verify_audit_log
from echo_auth.db.engines import transaction
from echo_auth.identity.auth import LoginResult, MfaChallenge
from echo_auth.runtime import Runtime
from tests.fixtures.db import Databases, make_settings
from tests.fixtures.events import all_stored_text, events_of

CHEAP_ARGON2 = {
    "ECHO_ARGON2_TIME_COST": "1",
    "ECHO_ARGON2_MEMORY_KIB": "1024",
    "ECHO_ARGON2_PARALLELISM": "1",
}
EXPECTED = {
    "user.signed_up",
    "user.email_verification.sent",
    "user.email_verified",
    "auth.login.succeeded",
    "auth.login.failed",
    "auth.logout",
    "account.locked",
    "auth.throttled",
    "account.unlocked",
    "mfa.totp.enrolment_started",
    "mfa.totp.enrolled",
    "auth.mfa.challenged",
    "auth.mfa.failed",
    "auth.mfa.succeeded",
    "password.reset.requested",
    "password.reset.completed",
    "password.changed",
    "session.revoked",
    "admin.user.listed",
    "admin.user.viewed",
    "admin.user.roles_changed",
    "admin.user.disabled",
    "audit.searched",
    "audit.verified",
    "system.checkpoint.signed",
}
ACCOUNT_LINE = re.compile(r"^  (\S+@example\.com)\s+(\S{16})\s+(.*?)\s*$")


def _demo(data_dir: Path, dbs: Databases, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_")}
    env.update(
        CHEAP_ARGON2,
        ECHO_ENV="test",
        ECHO_DATA_DIR=str(data_dir),
        ECHO_IDENTITY_DB_URL=dbs.identity_url,
        ECHO_AUDIT_DB_URL=dbs.audit_url,
    )
    return subprocess.run(
        [sys.executable, "-m", "echo_auth", "demo", "seed", *args],
        cwd=data_dir.parent,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_demo_seed_tells_the_story_and_refuses_a_second_time(tmp_path: Path) -> None:
    dbs = Databases(
        "sqlite", f"sqlite:///{tmp_path / 'identity.db'}", f"sqlite:///{tmp_path / 'audit.db'}"
    )
    data_dir = tmp_path / "var"
    runtime = Runtime(make_settings(data_dir, dbs), pool_size=2)
    try:
        runtime.upgrade_databases()
        done = _demo(data_dir, dbs, "--users", "12")
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr

        accounts = {
            m.group(1): (m.group(2), m.group(3))
            for m in map(ACCOUNT_LINE.match, done.stdout.splitlines())
            if m
        }
        assert len(accounts) == 14, done.stdout
        assert accounts["admin@example.com"][1].startswith("admin auditor")
        assert accounts["auditor@example.com"][1].startswith("auditor")
        assert "verify: intact" in done.stdout

        actions = {e["action"] for e in events_of(runtime)}
        assert actions >= EXPECTED, EXPECTED - actions
        stored = all_stored_text(runtime)
        for password, _ in accounts.values():
            assert password not in stored

        with transaction(runtime.audit_reader, write=False) as conn:
            report = verify_audit_log(
                conn, public_key=runtime.checkpoint_public_key, sink=runtime.checkpoint_sink
            )
        assert report.intact and report.events_checked > 60
        assert list(runtime.checkpoint_sink.directory.glob("*.sig"))
        with (
            transaction(runtime.identity, write=False) as iconn,
            transaction(runtime.audit_reader, write=False) as aconn,
        ):
            assert pipeline_status(iconn, aconn).outbox_depth == 0

        # The printed passwords are the current ones: after the reset and the change too.
        for email in ("admin@example.com", "ben@example.com", "chloe@example.com"):
            outcome = runtime.auth.login(email, accounts[email][0], Source("192.0.2.99"))
            assert isinstance(outcome, LoginResult), email
        ana = runtime.auth.login("ana@example.com", accounts["ana@example.com"][0], Source())
        assert isinstance(ana, MfaChallenge)  # TOTP is on for ana
        assert "TOTP on" in accounts["ana@example.com"][1]

        again = _demo(data_dir, dbs)
        assert again.returncode == 2, again.stderr
        assert again.stdout == ""
        [line] = again.stderr.strip().splitlines()
        assert line.startswith("echo-auth: the database already has 14 users")
    finally:
        runtime.close()
