"""The per-request session lookup: the event-loop path (asyncmy on MariaDB, a worker
thread on SQLite) must answer exactly as the synchronous one, and survive a dropped
connection or a database that is gone."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from echo_auth.audit.events import Source
from echo_auth.db.async_reads import AsyncReader, make_async_reader
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import sessions, users
from echo_auth.identity.sessions import CurrentSession, resolve_session_async
from echo_auth.runtime import Runtime
from tests.fixtures.app import PASSWORD, deliver
from tests.fixtures.db import MySQLServer
from tests.fixtures.events import events_of

SOURCE = Source(ip="198.51.100.9", user_agent="pytest")


def _login(runtime: Runtime, email: str = "someone@example.com") -> tuple[str, str]:
    runtime.auth.signup(email, PASSWORD, SOURCE)
    result = runtime.auth.login(email, PASSWORD, SOURCE)
    assert not isinstance(result, str) and hasattr(result, "session")
    return result.session.token, result.session.id


@pytest.fixture
def loop(runtime: Runtime) -> Iterator[asyncio.Runner]:
    """One event loop for the test, as a server worker has; its pool is closed after."""
    with asyncio.Runner() as runner:
        yield runner
        runner.run(runtime.aclose())


def _both(
    runtime: Runtime, loop: asyncio.Runner, token: str
) -> tuple[CurrentSession | None, CurrentSession | None]:
    sync = runtime.auth.authenticate(token)
    async_ = loop.run(runtime.auth.authenticate_async(token))
    return sync, async_


def _set_session(runtime: Runtime, session_id: str, **values: object) -> None:
    with transaction(runtime.identity) as conn:
        conn.execute(update(sessions).where(sessions.c.id == session_id).values(**values))


def test_event_loop_lookup_answers_as_the_synchronous_one(
    runtime: Runtime, loop: asyncio.Runner
) -> None:
    token, session_id = _login(runtime)
    sync, async_ = _both(runtime, loop, token)
    assert sync is not None and async_ is not None
    assert async_.id == sync.id == session_id
    assert async_.user == sync.user
    assert async_.expires_at == sync.expires_at and async_.expires_at.tzinfo is UTC
    assert _both(runtime, loop, token + "x") == (None, None)
    assert _both(runtime, loop, "") == (None, None)
    assert _both(runtime, loop, "t" * 5000) == (None, None)

    # Idle for longer than the touch interval: the lookup records activity once.
    stale = datetime.now(UTC) - timedelta(minutes=10)
    _set_session(runtime, session_id, last_seen_at=stale)
    touched = loop.run(runtime.auth.authenticate_async(token))
    assert touched is not None and touched.needs_touch
    again = runtime.auth.authenticate(token)
    assert again is not None and not again.needs_touch and again.last_seen_at > stale

    # Expired, then revoked, then the user disabled: both paths refuse alike.
    # The first path to see it ended ends it, once, with a session.expired event.
    _set_session(runtime, session_id, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    assert _both(runtime, loop, token) == (None, None)
    assert _both(runtime, loop, token) == (None, None)
    _set_session(runtime, session_id, last_seen_at=datetime.now(UTC) - timedelta(days=8))
    assert loop.run(runtime.auth.authenticate_async(token)) is None
    deliver(runtime)
    expired = events_of(runtime, "session.expired")
    assert [(e["target"]["id"], e["reason"]) for e in expired] == [(session_id, "absolute_timeout")]
    _set_session(
        runtime,
        session_id,
        expires_at=datetime.now(UTC) + timedelta(days=1),
        last_seen_at=datetime.now(UTC),
        revoked_at=None,
        revoked_reason=None,
    )
    assert all(_both(runtime, loop, token))
    # Idle past the idle timeout, seen first on the event loop this time.
    _set_session(runtime, session_id, last_seen_at=datetime.now(UTC) - timedelta(days=8))
    assert loop.run(runtime.auth.authenticate_async(token)) is None
    deliver(runtime)
    assert [e["reason"] for e in events_of(runtime, "session.expired")] == [
        "absolute_timeout",
        "idle_timeout",
    ]
    _set_session(
        runtime, session_id, last_seen_at=datetime.now(UTC), revoked_at=None, revoked_reason=None
    )
    assert all(_both(runtime, loop, token))
    _set_session(runtime, session_id, revoked_at=datetime.now(UTC), revoked_reason="logout")
    assert _both(runtime, loop, token) == (None, None)

    token2, _ = _login(runtime, "other@example.com")
    assert all(_both(runtime, loop, token2))
    with transaction(runtime.identity) as conn:
        conn.execute(
            update(users)
            .where(users.c.email == "other@example.com")
            .values(disabled_at=datetime.now(UTC))
        )
    assert _both(runtime, loop, token2) == (None, None)


@pytest.mark.mysql
def test_mysql_lookups_run_on_the_event_loop_and_survive_a_killed_connection(
    runtime: Runtime, mysql_server: MySQLServer
) -> None:
    reader = runtime.auth.async_reads
    assert reader is not None, "MariaDB lookups must not take the thread path"
    token, _ = _login(runtime)

    async def scenario() -> None:
        assert await runtime.auth.authenticate_async(token) is not None
        # Kill every pooled connection from the server side, as a restart would.
        pool = await reader._get_pool()
        with mysql_server.connect() as admin, admin.cursor() as cur:
            cur.execute(
                "SELECT id FROM information_schema.processlist WHERE db = %s AND id <> "
                "CONNECTION_ID()",
                (runtime.identity.url.database,),
            )
            for (thread_id,) in cur.fetchall():
                cur.execute(f"KILL CONNECTION {int(thread_id)}")
        assert pool.size >= 1
        # The dead pooled connection is noticed, dropped, and the read retried once.
        assert await runtime.auth.authenticate_async(token) is not None
        assert await runtime.auth.authenticate_async(token) is not None

    with asyncio.Runner() as first:
        first.run(scenario())
        # While that loop owns the pool, another loop (a second test client, say) takes
        # the synchronous path instead of borrowing connections it cannot use.
        with asyncio.Runner() as second:
            assert second.run(_bound_elsewhere(reader))
            assert second.run(runtime.auth.authenticate_async(token)) is not None
        first.run(runtime.aclose())
    # Closed on its own loop, the reader serves the next loop with a new pool.
    with asyncio.Runner() as third:
        third.run(scenario())
        third.run(runtime.aclose())


async def _bound_elsewhere(reader: AsyncReader) -> bool:
    return reader.bound_elsewhere()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.mysql
def test_an_unreachable_database_is_an_operational_error_at_once(runtime: Runtime) -> None:
    url = f"mysql://nobody@127.0.0.1:{_closed_port()}/nowhere"
    reader = make_async_reader(url, runtime.identity_reads.dialect, pool_size=2)
    assert reader is not None
    started = time.monotonic()
    with asyncio.Runner() as runner, pytest.raises(OperationalError):
        try:
            runner.run(resolve_session_async(reader, "a-token", runtime.session_policy))
        finally:
            runner.run(reader.close())
    assert time.monotonic() - started < 5  # refused, not waited out


def test_urls_the_pool_cannot_honour_keep_the_synchronous_path(runtime: Runtime) -> None:
    dialect = runtime.identity_reads.dialect
    assert make_async_reader("sqlite:////tmp/x.db", dialect, pool_size=2) is None
    tls = "mysql://u:p@db.example.com/echo?ssl_ca=/etc/ca.pem"
    assert make_async_reader(tls, dialect, pool_size=2) is None
    plain = make_async_reader("mysql://u:p@db.example.com/echo", dialect, pool_size=2)
    assert plain is not None
