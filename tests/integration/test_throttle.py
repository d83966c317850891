"""Brute-force protection against the real databases: atomic counting, growing locks,
device cookies that keep the owner in, and the events each step records."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import update

from echo_auth.audit.events import Source
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import login_throttles
from echo_auth.identity.auth import LoginResult
from echo_auth.identity.errors import InvalidCredentials
from echo_auth.identity.throttle import Key, RateLimited
from echo_auth.runtime import Runtime, operator_actor
from tests.fixtures.app import PASSWORD, deliver
from tests.fixtures.events import events_of

ATTACKER = Source(ip="203.0.113.66", user_agent="attacker")
OWNER = Source(ip="198.51.100.7", user_agent="owner")


@pytest.fixture
def victim(runtime: Runtime) -> str:
    return runtime.auth.signup("victim@example.com", PASSWORD, OWNER)


def test_parallel_wrong_guesses_never_exceed_the_limit(runtime: Runtime, victim: str) -> None:
    limit = runtime.settings.login_max_failures
    start = threading.Barrier(50)

    def guess(i: int) -> str:
        start.wait()
        try:
            runtime.auth.login("victim@example.com", f"wrong guess {i:04d}", ATTACKER)
        except InvalidCredentials:
            return "checked"
        except RateLimited:
            return "throttled"
        return "in"

    with ThreadPoolExecutor(max_workers=50) as pool:
        outcomes = list(pool.map(guess, range(50)))
    assert outcomes.count("checked") == limit
    assert outcomes.count("throttled") == 50 - limit
    deliver(runtime)
    assert len(events_of(runtime, "auth.login.failed")) == limit
    assert len(events_of(runtime, "auth.throttled")) == 50 - limit
    locked = events_of(runtime, "account.locked")
    assert len(locked) == 1 and locked[0]["target"]["id"] == victim


def test_lock_grows_and_a_success_resets(runtime: Runtime, victim: str) -> None:
    limit = runtime.settings.login_max_failures
    for i in range(limit):
        with pytest.raises(InvalidCredentials):
            runtime.auth.login("victim@example.com", f"nope {i}", ATTACKER)
    with pytest.raises(RateLimited) as first:
        runtime.auth.login("victim@example.com", PASSWORD, ATTACKER)
    assert 0 < first.value.retry_after <= runtime.settings.login_lock_s
    # The lock runs out (moved into the past here); the next lock is twice as long.
    key = Key.email("victim@example.com").name
    with transaction(runtime.identity) as conn:
        conn.execute(
            update(login_throttles)
            .where(login_throttles.c.key == key)
            .values(locked_until=login_throttles.c.updated_at)
        )
    for i in range(limit):
        with pytest.raises(InvalidCredentials):
            runtime.auth.login("victim@example.com", f"again {i}", ATTACKER)
    with pytest.raises(RateLimited) as second:
        runtime.auth.login("victim@example.com", PASSWORD, ATTACKER)
    assert second.value.retry_after > runtime.settings.login_lock_s
    # An admin lifts the lock; the right password then works and resets the count.
    actor, source = operator_actor()
    assert runtime.admin.unlock(actor, source, victim)
    assert isinstance(runtime.auth.login("victim@example.com", PASSWORD, OWNER), LoginResult)
    deliver(runtime)
    assert events_of(runtime, "account.unlocked")[0]["reason"] == "admin"


def test_known_device_is_not_locked_out_by_failures_elsewhere(
    runtime: Runtime, victim: str
) -> None:
    first = runtime.auth.login("victim@example.com", PASSWORD, OWNER)
    assert isinstance(first, LoginResult) and first.device_token
    for i in range(runtime.settings.login_max_failures):
        with pytest.raises(InvalidCredentials):
            runtime.auth.login("victim@example.com", f"attack {i}", ATTACKER)
    with pytest.raises(RateLimited):
        runtime.auth.login("victim@example.com", PASSWORD, ATTACKER)
    # Without the cookie even the owner waits; with it, the owner gets in.
    with pytest.raises(RateLimited):
        runtime.auth.login("victim@example.com", PASSWORD, OWNER)
    again = runtime.auth.login("victim@example.com", PASSWORD, OWNER, first.device_token)
    assert isinstance(again, LoginResult) and again.device_token is None
    # A device cookie of another account does not help an attacker.
    runtime.auth.signup("mallory@example.com", PASSWORD, ATTACKER)
    theirs = runtime.auth.login("mallory@example.com", PASSWORD, ATTACKER)
    assert isinstance(theirs, LoginResult)
    with pytest.raises(RateLimited):
        runtime.auth.login("victim@example.com", "guess", ATTACKER, theirs.device_token)


def test_ip_limit_spans_accounts(runtime: Runtime) -> None:
    runtime.settings.ip_max_failures = 3  # a fresh runtime reads it when the throttle is built
    rt = Runtime(runtime.settings, pool_size=2)
    try:
        for i in range(3):
            with pytest.raises(InvalidCredentials):
                rt.auth.login(f"nobody{i}@example.com", "whatever-password", ATTACKER)
        with pytest.raises(RateLimited) as caught:
            rt.auth.login("someone-else@example.com", "whatever-password", ATTACKER)
        assert caught.value.scope == "ip"
        # Another address is not affected.
        with pytest.raises(InvalidCredentials):
            rt.auth.login("someone-else@example.com", "whatever-password", OWNER)
    finally:
        rt.close()


def test_password_change_guesses_spend_the_accounts_login_budget(
    runtime: Runtime, victim: str
) -> None:
    """A stolen session must not become an unthrottled password oracle."""
    result = runtime.auth.login("victim@example.com", PASSWORD, OWNER)
    assert isinstance(result, LoginResult)
    current = runtime.auth.authenticate(result.session.token)
    assert current is not None
    limit = runtime.settings.login_max_failures
    for i in range(limit):
        with pytest.raises(InvalidCredentials):
            runtime.account.change_password(
                current, f"wrong guess {i}", "a new passphrase 77", ATTACKER
            )
    # The budget is spent: even the right password is refused now, here and at login.
    with pytest.raises(RateLimited):
        runtime.account.change_password(current, PASSWORD, "a new passphrase 77", ATTACKER)
    with pytest.raises(RateLimited):
        runtime.auth.login("victim@example.com", PASSWORD, OWNER)
    deliver(runtime)
    actions = [e["action"] for e in events_of(runtime)]
    assert actions.count("password.changed") == limit  # every failure, no success
    assert "account.locked" in actions and "auth.throttled" in actions
