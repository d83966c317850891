"""One-statement reads on the event loop, for the hottest path: the per-request session lookup.

Every authenticated request resolves its session, so that lookup decides how many
requests a worker serves. With a synchronous driver it costs a hop to a worker thread
and back, a pooled SQLAlchemy connection and a pure-Python protocol; under load the hop
and the GIL dominate. On MySQL/MariaDB this module runs the same SQLAlchemy Core
``SELECT`` (compiled once, parameters bound by the driver, never interpolated) on a small
asyncmy pool owned by the worker process, without leaving the event loop.

SQLite has no network round trip to hide: :func:`make_async_reader` returns None there,
and callers use the synchronous engine in a worker thread.

Failures surface as SQLAlchemy's :class:`~sqlalchemy.exc.OperationalError`, like every
other database error, so the API answers 503 ``service_unavailable`` for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncmy
from asyncmy import errors as asyncmy_errors
from sqlalchemy import Dialect, Select
from sqlalchemy.engine.url import URL
from sqlalchemy.exc import OperationalError

from echo_auth.db.engines import normalize_url

# URL options the asyncmy pool understands; a URL with any other (TLS files, say) keeps
# the synchronous path, which honours them all.
_SUPPORTED_QUERY = frozenset({"charset", "unix_socket"})
# Errors that mean "the database (or the way to it) is in trouble", not "bad SQL".
_UNAVAILABLE = (
    asyncmy_errors.OperationalError,
    asyncmy_errors.InterfaceError,
    asyncmy_errors.InternalError,
    OSError,
    TimeoutError,
    EOFError,
)


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    row_type: Callable[..., Any]
    processors: tuple[Callable[[Any], Any] | None, ...]


class AsyncReader:
    """Runs compiled single-row SELECTs on an asyncmy pool (autocommit).

    The pool belongs to the first event loop that uses it (a server worker's one loop)
    until :meth:`close` is awaited there.
    """

    def __init__(
        self,
        url: URL,
        dialect: Dialect,
        *,
        pool_size: int = 10,
        connect_timeout_s: float = 5.0,
        query_timeout_s: float = 10.0,
    ) -> None:
        self._url = url
        self._dialect = dialect
        self._pool_size = pool_size
        self._connect_timeout_s = connect_timeout_s
        self._query_timeout_s = query_timeout_s
        self._pool: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool_lock = asyncio.Lock()
        # Requests queue here, first come first served, for one of the pool's
        # connections. (The pool's own fast path lets a newcomer take a connection that
        # was freed while older requests waited: under load some waited for a second.)
        self._slots = asyncio.Semaphore(pool_size)
        self._compiled: dict[int, tuple[Select[Any], _Compiled]] = {}

    def _compile(self, statement: Select[Any]) -> _Compiled:
        cached = self._compiled.get(id(statement))
        if cached is not None and cached[0] is statement:
            return cached[1]
        compiled = statement.compile(dialect=self._dialect)
        for bind in compiled.binds.values():
            if bind.type.bind_processor(self._dialect) is not None:
                raise ValueError(
                    f"parameter {bind.key!r} needs conversion; AsyncReader binds plain values"
                )
        columns = list(statement.selected_columns)
        keys = [c.key for c in columns]
        row_type = NamedTuple("AsyncRow", [(k, Any) for k in keys])  # type: ignore[misc]
        processors = tuple(
            c.type.dialect_impl(self._dialect).result_processor(self._dialect, None)
            for c in columns
        )
        entry = _Compiled(compiled.string, row_type, processors)
        self._compiled[id(statement)] = (statement, entry)
        return entry

    def bound_elsewhere(self) -> bool:
        """True when another, still open event loop owns the pool (callers then take the
        synchronous path: a connection cannot move between loops)."""
        loop = asyncio.get_running_loop()
        if self._loop is None or self._loop is loop:
            return False
        if self._loop.is_closed():
            # Its owner ended without close(); nothing can be awaited on it any more.
            self._pool, self._loop = None, None
            return False
        return True

    async def _get_pool(self) -> Any:
        if self._pool is not None:
            return self._pool
        if self._loop is None:
            self._loop, self._pool_lock = asyncio.get_running_loop(), asyncio.Lock()
            self._slots = asyncio.Semaphore(self._pool_size)
        async with self._pool_lock:
            if self._pool is None:
                url = self._url
                query = dict(url.query)
                options: dict[str, Any] = {
                    "user": url.username or "",
                    "password": url.password or "",
                    "db": url.database,
                    "charset": str(query.get("charset", "utf8mb4")),
                    "autocommit": True,
                    "connect_timeout": self._connect_timeout_s,
                }
                if "unix_socket" in query:
                    options["unix_socket"] = str(query["unix_socket"])
                else:
                    options["host"] = url.host or "localhost"
                    options["port"] = url.port or 3306
                self._pool = await asyncmy.create_pool(
                    minsize=1, maxsize=self._pool_size, pool_recycle=3600, **options
                )
        return self._pool

    async def first(self, statement: Select[Any], params: Mapping[str, Any]) -> Any | None:
        """The first row of ``statement`` (attribute access by column key), or None.

        A pooled connection may have died since it was last used (a server restart): the
        read is retried once on another connection before the error is raised.
        """
        compiled = self._compile(statement)
        for attempt in (1, 2):
            try:
                # asyncio.timeout, not wait_for: no extra task per query.
                async with asyncio.timeout(self._query_timeout_s):
                    raw = await self._fetch_one(compiled.sql, params)
                break
            except _UNAVAILABLE as exc:
                if attempt == 2:
                    raise OperationalError(
                        compiled.sql, None, exc, hide_parameters=True, connection_invalidated=True
                    ) from None
        if raw is None:
            return None
        values = [
            value if processor is None else processor(value)
            for processor, value in zip(compiled.processors, raw, strict=True)
        ]
        return compiled.row_type(*values)

    async def _fetch_one(self, sql: str, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        pool = await self._get_pool()
        async with self._slots:
            return await self._fetch_on(pool, sql, params)

    async def _fetch_on(
        self, pool: Any, sql: str, params: Mapping[str, Any]
    ) -> tuple[Any, ...] | None:
        conn = await pool.acquire()
        try:
            async with conn.cursor() as cursor:
                await cursor.execute(sql, dict(params))
                row: tuple[Any, ...] | None = await cursor.fetchone()
                return row
        except BaseException:
            # Never hand a connection in an unknown state back to the pool.
            conn.close()
            raise
        finally:
            pool.release(conn)

    async def close(self) -> None:
        """Close the pool; call it on the loop that uses it (a no-op on any other)."""
        if self._loop is not asyncio.get_running_loop():
            return
        pool, self._pool, self._loop = self._pool, None, None
        if pool is not None:
            pool.close()
            await pool.wait_closed()


def make_async_reader(raw_url: str, dialect: Dialect, *, pool_size: int) -> AsyncReader | None:
    """An :class:`AsyncReader` for a MySQL/MariaDB URL, or None where it does not apply."""
    url = normalize_url(raw_url)
    if url.get_backend_name() not in ("mysql", "mariadb"):
        return None
    if set(url.query) - _SUPPORTED_QUERY:
        return None
    return AsyncReader(url, dialect, pool_size=pool_size)
