"""Shared pieces of the benchmarks: throwaway databases, machine info, statistics, results.

Nothing here touches data it did not create: MySQL databases get a unique
``echo_bench_<pid>_<random>`` name and are dropped on the way out (also when the
benchmark fails or is interrupted); SQLite databases live in a temporary directory.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pymysql
from sqlalchemy.engine import make_url

from echo_auth.audit.events import Actor, AuditEvent, Source, Target
from echo_auth.config import Settings

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
MYSQL_URL = os.environ.get(
    "ECHO_BENCH_MYSQL_URL", os.environ.get("ECHO_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/")
)
BACKENDS = ("mariadb", "sqlite")
MIN_REPEATS = 3


class BenchError(Exception):
    """A benchmark could not run, or what it measured turned out wrong."""


@dataclass
class Options:
    """What the command line chose; every benchmark gets the same object."""

    reps: int = MIN_REPEATS
    quick: bool = False
    results_dir: Path = RESULTS_DIR
    # perf_counter() value by which the whole run should be over (None: no limit).
    deadline: float | None = None
    verify_n: int | None = None
    verify_budget_s: float = 180.0
    # soak: seconds of load (None: 600, or 20 with --quick).
    soak_seconds: float | None = None

    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.perf_counter()


# -- throwaway databases ------------------------------------------------------------------


@dataclass(frozen=True)
class MySQLServer:
    host: str
    port: int
    user: str
    password: str

    @classmethod
    def from_url(cls, raw: str = MYSQL_URL) -> MySQLServer:
        url = make_url(raw)
        return cls(
            url.host or "127.0.0.1", url.port or 3306, url.username or "root", url.password or ""
        )

    def connect(self, database: str | None = None) -> pymysql.Connection[Any]:
        return pymysql.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            database=database,
            autocommit=True,
            charset="utf8mb4",
            connect_timeout=5,
        )

    def url(self, database: str) -> str:
        auth = f"{self.user}:{self.password}" if self.password else self.user
        return f"mysql://{auth}@{self.host}:{self.port}/{database}"

    def version(self) -> str:
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            row = cur.fetchone()
        return str(row[0]) if row else "unknown"

    def execute(self, *statements: str) -> None:
        with self.connect() as conn, conn.cursor() as cur:
            for sql in statements:
                cur.execute(sql)


@dataclass(frozen=True)
class Databases:
    backend: str
    identity_url: str
    audit_url: str
    workdir: Path
    # MySQL: the database names; SQLite: the file paths.
    identity_db: str
    audit_db: str


def _stem() -> str:
    return f"echo_bench_{os.getpid()}_{secrets.token_hex(4)}"


@contextmanager
def throwaway_databases(backend: str) -> Iterator[Databases]:
    """A fresh identity and audit database, empty (migrate them with ``settings_for``)."""
    with tempfile.TemporaryDirectory(prefix="echo-bench-") as tmp:
        workdir = Path(tmp)
        if backend == "sqlite":
            identity, audit = workdir / "identity.db", workdir / "audit.db"
            yield Databases(
                "sqlite",
                f"sqlite:///{identity}",
                f"sqlite:///{audit}",
                workdir,
                str(identity),
                str(audit),
            )
            return
        if backend != "mariadb":
            raise ValueError(f"unknown backend {backend!r}")
        server = MySQLServer.from_url()
        stem = _stem()
        names = (f"{stem}_identity", f"{stem}_audit")
        created: list[str] = []
        try:
            for name in names:
                server.execute(
                    f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                )
                created.append(name)
            yield Databases("mariadb", server.url(names[0]), server.url(names[1]), workdir, *names)
        finally:
            problems: list[str] = []
            for name in created:
                try:
                    # Bounded: a connection left inside a transaction on the database would
                    # otherwise make DROP wait for its metadata lock for a year.
                    server.execute(
                        "SET SESSION lock_wait_timeout = 120", f"DROP DATABASE IF EXISTS `{name}`"
                    )
                except pymysql.MySQLError as exc:
                    problems.append(f"{name}: {exc}")
            if problems:
                raise BenchError("could not drop throwaway databases: " + "; ".join(problems))


def settings_for(dbs: Databases, **overrides: Any) -> Settings:
    """Settings for a benchmark: the real defaults except where a benchmark says otherwise."""
    values: dict[str, Any] = {
        "env": "test",
        "data_dir": dbs.workdir / "var",
        "identity_db_url": dbs.identity_url,
        "audit_db_url": dbs.audit_url,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


# -- events -------------------------------------------------------------------------------

_EPOCH = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
_ACTIONS = (
    ("auth.login.succeeded", "success", None),
    ("auth.login.failed", "failure", "bad_password"),
    ("user.signed_up", "success", None),
    ("session.revoked", "success", None),
    ("admin.user.viewed", "success", None),
)


def make_events(n: int, *, offset: int = 0, start: datetime | None = None) -> list[AuditEvent]:
    """``n`` realistic, distinct events (a mix of actions, users, IPs), in time order.

    Event ``i`` (counting from ``offset``) occurred ``i`` microseconds after ``start``.
    """
    base = start or _EPOCH
    out: list[AuditEvent] = []
    for i in range(offset, offset + n):
        action, outcome, reason = _ACTIONS[i % len(_ACTIONS)]
        user = f"0190a1b2-c3d4-7e5f-8a9b-{i % 5000:012d}"
        out.append(
            AuditEvent(
                action=action,
                outcome=outcome,  # type: ignore[arg-type]
                reason=reason,
                actor=Actor("user", user, f"user{i % 5000}@example.com"),
                target=Target("user", user),
                source=Source(
                    ip=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
                    user_agent="Mozilla/5.0 (X11; Linux x86_64) echo-bench/1.0",
                    request_id=f"req-{i:010d}",
                ),
                metadata={"session_id": f"s-{i:08d}", "mfa": False},
                occurred_at=base + timedelta(microseconds=i),
            )
        )
    return out


# -- statistics and machine info -----------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median and spread of repetitions (spread = (max - min) / median)."""
    if not values:
        return {}
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "spread_pct": 100.0 * (max(values) - min(values)) / med if med else 0.0,
    }


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (p95 of 30 samples is the 29th smallest)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-pct * len(ordered) // 100))))
    return ordered[rank - 1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_MACHINE: dict[str, Any] | None = None


def machine_info() -> dict[str, Any]:
    global _MACHINE
    if _MACHINE is None:
        try:
            mariadb = MySQLServer.from_url().version()
        except pymysql.MySQLError as exc:
            mariadb = f"unavailable ({exc.args[0] if exc.args else exc})"
        _MACHINE = {
            "host": socket.gethostname(),
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "memory_gib": _memory_gib(),
            "os": platform.platform(),
            "python": platform.python_version(),
            "mariadb": mariadb,
            "sqlite": sqlite3.sqlite_version,
            "loadavg_at_start": loadavg(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "echo_revision": _git_revision(),
        }
    return _MACHINE


def _git_revision() -> str:
    """The commit the measured code comes from, and whether src/ differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + (" + uncommitted changes in src/" if dirty else "")


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (other work on this shared machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def machine_line() -> str:
    m = machine_info()
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}; "
        f"MariaDB {m['mariadb']}; SQLite {m['sqlite']}; {m['date']}; "
        f"Echo {m['echo_revision']}"
    )


# -- results ------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the summary table."""

    benchmark: str
    case: str
    metric: str
    median: float
    unit: str
    spread_pct: float | None = None
    reps: int | None = None
    note: str = ""


def write_result(opts: Options, name: str, document: dict[str, Any], rows: list[Row]) -> Path:
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    path = opts.results_dir / f"{name}.json"
    body = {
        "benchmark": name,
        "machine": machine_info(),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_at_finish": loadavg(),
        **document,
        "summary_rows": [row.__dict__ for row in rows],
    }
    path.write_text(json.dumps(body, indent=2, default=str) + "\n")
    return path


class VerifyChild:
    """``python -m bench.verify_child URL`` running in the background."""

    def __init__(self, url: str, *, count: bool = False) -> None:
        args = [sys.executable, "-m", "bench.verify_child", url]
        if count:
            args.append("--count")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            args,
            cwd=REPO_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except BaseException:
            self.kill()
            raise
        wall = time.perf_counter() - self.started
        if self.proc.returncode != 0:
            tail = "\n".join(err.strip().splitlines()[-5:])
            raise BenchError(f"verify_child exited with {self.proc.returncode}: {tail}")
        doc: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        doc["process_wall_s"] = wall
        return doc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def log(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)
