"""Backups of the embedded SQLite databases, with SQLite's online backup API.

``sqlite3.Connection.backup`` copies the database page by page inside one read
transaction, so the copy is a consistent snapshot even while the API and a relay write
(WAL mode lets them go on). The copy is switched to a rollback journal so that the
archived file stands alone; counts, head and revision are read from the copy itself.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from echo_auth.db.engines import SQLITE_BUSY_TIMEOUT_MS, normalize_url
from echo_auth.ops.backup_format import BackupError, DumpResult, ProgressFactory

_TABLES = (
    "SELECT name FROM sqlite_master WHERE type = 'table' "
    "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
)


def sqlite_path(url: str) -> Path:
    database = normalize_url(url).database
    assert database is not None  # normalize_url refuses a SQLite URL without a path
    return Path(database)


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, isolation_level=None)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def describe(conn: sqlite3.Connection) -> tuple[dict[str, int], str | None]:
    """Row count of every table, and the Alembic revision (None before any migration)."""
    tables = [row[0] for row in conn.execute(_TABLES)]
    counts = {}
    for name in tables:
        # The names come from sqlite_master, quoted as identifiers.
        query = f"SELECT COUNT(*) FROM {_quote(name)}"  # noqa: S608
        counts[name] = int(conn.execute(query).fetchone()[0])
    revision = None
    if "alembic_version" in counts:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        revision = None if row is None else str(row[0])
    return counts, revision


class SQLiteBackend:
    name = "sqlite"
    suffix = ".sqlite3"

    def dump(self, url: str, dest: Path, *, label: str, progress: ProgressFactory) -> DumpResult:
        path = sqlite_path(url)
        if not path.is_file():
            raise BackupError(f"the {label} database {path} does not exist")
        with (
            progress(f"copying {label}", None) as advance,
            closing(_connect(path)) as src,
            closing(_connect(dest)) as dst,
        ):
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")
            advance(1)
            counts, revision = describe(dst)
            head = None
            if "chain_head" in counts:
                row = dst.execute("SELECT seq, hash FROM chain_head WHERE id = 1").fetchone()
                head = (0, "0" * 64) if row is None else (int(row[0]), str(row[1]))
        return DumpResult(dest, counts, revision, {"database": str(path)}, head)

    def table_count(self, url: str) -> int:
        path = sqlite_path(url)
        if not path.is_file() or path.stat().st_size == 0:
            return 0
        with closing(_connect(path)) as conn:
            return len(conn.execute(_TABLES).fetchall())

    def load(
        self, dump: Path, url: str, *, replace: bool, label: str, progress: ProgressFactory
    ) -> None:
        # The backup API replaces the whole destination, tables it did not hold included;
        # ``replace`` needs nothing more here (the caller checked emptiness without it).
        path = sqlite_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        with (
            progress(f"restoring {label}", None) as advance,
            closing(_connect(dump)) as src,
            closing(_connect(path)) as dst,
        ):
            src.backup(dst)
            advance(1)

    @contextmanager
    def scratch(self, url: str, name: str, workdir: Path, details: dict[str, Any]) -> Iterator[str]:
        path = workdir / f"{name}.db"
        try:
            yield f"sqlite:///{path}"
        finally:
            for leftover in (
                path,
                path.with_name(path.name + "-wal"),
                path.with_name(path.name + "-shm"),
            ):
                leftover.unlink(missing_ok=True)

    def tool_versions(self) -> dict[str, str]:
        return {"sqlite": sqlite3.sqlite_version}
