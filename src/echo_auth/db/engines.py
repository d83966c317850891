"""Engines for the two databases, from plain URLs.

Users write ``mysql://``, ``mariadb://`` or ``sqlite:///path``; Echo picks the driver.
SQLite runs in WAL mode with a busy timeout so the API and a relay process can share a
file; write transactions start with ``BEGIN IMMEDIATE`` so two writers queue on the lock
instead of failing when a reader upgrades.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.exc import ArgumentError

from echo_auth.config import ConfigurationError

SQLITE_BUSY_TIMEOUT_MS = 10_000
_WRITE = "echo_write"


def normalize_url(raw: str) -> URL:
    """Turn a user's database URL into one with Echo's driver and options."""
    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigurationError(f"not a database URL: {_redact(raw)}") from None
    backend = url.get_backend_name()
    if backend in ("mysql", "mariadb"):
        query = dict(url.query)
        query.setdefault("charset", "utf8mb4")
        if not url.database:
            raise ConfigurationError(f"the URL names no database: {_redact(raw)}")
        return url.set(drivername="mysql+pymysql", query=query)
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise ConfigurationError("SQLite needs a file path: sqlite:///path/to/file.db")
        return url.set(drivername="sqlite+pysqlite")
    raise ConfigurationError(
        f"unsupported database {backend!r}: use mysql://, mariadb:// or sqlite:///"
    )


def _redact(raw: str) -> str:
    try:
        return make_url(raw).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable>"


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(
    raw_url: str, *, pool_size: int = 10, autocommit_reads: bool = False, **kwargs: Any
) -> Engine:
    """An engine for ``raw_url``.

    ``autocommit_reads`` makes an engine for single-statement reads on hot paths: each
    statement commits on its own and a connection goes back to the pool without a
    ROLLBACK, so a session lookup is one round trip instead of three. Never use it for
    writes that must commit together.
    """
    url = normalize_url(raw_url)
    if autocommit_reads:
        kwargs["pool_reset_on_return"] = None
        if url.get_backend_name() != "sqlite":
            kwargs["skip_autocommit_rollback"] = True
    if url.get_backend_name() == "sqlite":
        assert url.database is not None
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            pool_size=pool_size,
            max_overflow=pool_size * 2,
            **kwargs,
        )
        _configure_sqlite(engine)
        return engine
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size * 2,
        pool_pre_ping=False,
        pool_recycle=3600,
        isolation_level="AUTOCOMMIT" if autocommit_reads else "READ COMMITTED",
        connect_args={"connect_timeout": 5, "read_timeout": 30, "write_timeout": 30},
        **kwargs,
    )


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so BEGIN is ours to choose.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # FULL: a commit survives power loss. With NORMAL the two files could lose their
        # last commits independently (an outbox delete kept, its audit append lost).
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@contextmanager
def transaction(engine: Engine, *, write: bool = True) -> Iterator[Connection]:
    """One transaction: committed when the block ends, rolled back if it raises.

    ``write=False`` marks a read-only unit (a plain deferred BEGIN on SQLite).
    Exceptions that carry ``keep_work = True`` (refusals whose audit event must survive,
    such as a failed login) commit before they propagate.
    """
    with engine.connect() as conn:
        if write:
            conn = conn.execution_options(**{_WRITE: True})
        conn.begin()
        try:
            yield conn
        except BaseException as exc:
            if getattr(exc, "keep_work", False):
                conn.commit()
            else:
                conn.rollback()
            raise
        else:
            conn.commit()


@contextmanager
def single_read(engine: Engine) -> Iterator[Connection]:
    """A connection for one autocommitted read (see ``autocommit_reads``)."""
    with engine.connect() as conn:
        yield conn
