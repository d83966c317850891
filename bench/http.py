"""http: Echo against FastAPI-Users over HTTP, with wrk on loopback.

Echo (``echo-auth serve --workers 2``, relay in-process) and the peer
(bench/peers/fastapi_users: FastAPI-Users' documented full example, ``uvicorn app:app
--workers 2``) each run on throwaway MariaDB databases, with argon2id at the same
parameters (t=3, m=64 MiB, p=4). wrk (bench/wrk/bench.lua) measures, interleaved and
repeated (median and spread over >= 3 repetitions):

(a) ``/v1/me`` against ``/users/me`` with a bearer token: req/s, p50 and p99 at 16 and
    64 connections (10 s after a 2 s warm-up);
(b) logins at 16 connections (15 s), one account per connection so that no login meets
    the brute-force throttle: throughput, p50, p99, and p99 against the mean that
    queueing alone implies (16 / throughput);
(c) the hashing ceiling: two processes doing nothing but argon2-cffi ``verify`` for 10 s;
    Echo's login throughput as a share of it;
(d) a login storm: 16 connections logging in while 16 others call ``/v1/me`` (two wrk
    processes), the ``/v1/me`` p99; the peer the same way;
(e) Echo's login and ``/v1/me`` on SQLite, the embedded default.

Everything started here is stopped, and every database dropped, also on failure or
Ctrl-C. See bench/README.md for the details and the targets.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bench.common import (
    BENCH_DIR,
    BenchError,
    Databases,
    MySQLServer,
    Options,
    Row,
    loadavg,
    log,
    machine_info,
    settings_for,
    summarize,
    throwaway_databases,
    write_result,
)
from echo_auth.audit.events import Source
from echo_auth.config import Settings
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import users
from echo_auth.runtime import Runtime

NAME = "http"
PEER_DIR = BENCH_DIR / "peers" / "fastapi_users"
PEER_VENV = PEER_DIR / ".venv"
WRK_SCRIPT = BENCH_DIR / "wrk" / "bench.lua"
WRK = os.environ.get("ECHO_BENCH_WRK", "wrk")
PASSWORD = "correct horse battery staple 7193"
SOURCE = Source(ip="203.0.113.7", user_agent="echo-bench/1.0 (http)")
WORKERS = 2
LOGIN_CONNECTIONS = 16  # one account per connection: the throttle never sees two at once
STORM_CONNECTIONS = 16  # 16 logging in + 16 on /v1/me
WRK_TIMEOUT = "30s"  # wrk's default 2 s would drop the peer's slow logins from the latencies
TARGETS = {"me_ratio": 4.0, "login_p99_over_queue": 1.5, "login_pct_of_ceiling": 95.0}
STORM_P99_TARGET_MS = 100.0


@dataclass(frozen=True)
class Plan:
    me_s: int
    warm_s: int
    login_s: int
    login_warm_s: int
    ceiling_s: int
    storm_s: int
    concurrencies: tuple[int, ...]
    sqlite_concurrencies: tuple[int, ...]
    sqlite_login_s: int


def _plan(quick: bool) -> Plan:
    raw = os.environ.get("ECHO_BENCH_HTTP_CONCURRENCY", "")
    chosen = tuple(sorted({int(x) for x in raw.split(",") if x.strip()}))
    if quick:
        # 1 s runs; logins get 3 s, as a login can take about a second on a busy machine.
        return Plan(1, 1, 3, 1, 1, 3, chosen or (1, 4, 16, 64), (16,), 3)
    # About 7 to 8 minutes on the idle 2-core machine; SQLite's logins are shorter to fit.
    return Plan(10, 2, 15, 2, 10, 8, chosen or (16, 64), (16,), 10)


# -- processes ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, bytes]:
    if not url.startswith("http://127.0.0.1:"):
        raise BenchError(f"only loopback servers are measured, not {url}")
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (loopback)
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


@dataclass
class Server:
    """A server started here, in its own process group (uvicorn's workers are children)."""

    name: str
    port: int
    args: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    pids: set[int] = field(default_factory=set)
    restarts: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_path: str, ready_status: int = 200, timeout: float = 90.0) -> None:
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                self.args,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        good = 0
        while good < 10:  # a few answers in a row: both workers have had time to start
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not ready after {timeout:.0f} s: {self.tail()}")
            try:
                status, _ = _http("GET", self.base + ready_path, timeout=5)
            except OSError:
                status = 0
            good = good + 1 if status == ready_status else 0
            time.sleep(0.2 if good == 0 else 0.05)
        self.pids = set(_group_members(self.proc.pid))

    def check_workers(self, what: str) -> None:
        """Note it when the processes changed: uvicorn replaced a dead or hung worker."""
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
            raise BenchError(
                f"{self.name} (pid {self.proc.pid}) ended by {how} during {what}: {self.tail()}"
            )
        now = set(_group_members(self.proc.pid))
        if now != self.pids:
            gone, new = sorted(self.pids - now), sorted(now - self.pids)
            note = f"during {what}: processes {gone} gone, {new} new"
            log(f"http: WARNING {self.name}: a worker was replaced {note}")
            self.restarts.append(note)
            self.pids = now

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return sum(_cpu_seconds(pid) for pid in _group_members(self.proc.pid))

    def wait_idle(self, max_s: float = 30.0, busy_cores: float = 0.25) -> float:
        """Wait until the server stops working off requests a load generator left behind.

        wrk stops at its deadline with up to one request per connection in flight; a
        server whose logins queue (the peer's block its event loop) goes on working them
        off, which would slow the next measurement down. Returns the seconds waited.
        """
        started = time.monotonic()
        before = self.cpu_seconds()
        while time.monotonic() - started < max_s:
            time.sleep(0.5)
            now = self.cpu_seconds()
            if (now - before) / 0.5 < busy_cores:
                break
            before = now
        return time.monotonic() - started

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)  # the group we made for it: uvicorn and its workers
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                log(f"http: {self.name} did not stop on {sig.name}")
        # A worker may outlive its supervisor: end what is left of the group, by id.
        for pid in _group_members(proc.pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:])

    def log_summary(self) -> dict[str, Any]:
        """What the server logged: Echo logs JSON lines at warning and above here."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return {}
        lines = text.strip().splitlines()
        errors = [ln for ln in lines if re.search(r'"level":\s*"(error|critical)"', ln)]
        return {
            "lines": len(lines),
            "error_lines": len(errors),
            "tracebacks": text.count("Traceback (most recent call last)"),
            "tail": lines[-15:],
        }


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def _group_members(pgid: int) -> list[int]:
    """Processes still in the process group ``pgid`` (one that a Server started)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # after the name: state, ppid, pgrp
            members.append(int(stat.parent.name))
    return members


@contextmanager
def _running(server: Server, ready_path: str, ready_status: int = 200) -> Iterator[Server]:
    try:
        server.start(ready_path, ready_status)
        yield server
    except BaseException:
        log(f"http: {server.name} log, last lines:\n  " + server.tail().replace("\n", "\n  "))
        raise
    finally:
        server.stop()


def _clean_env() -> dict[str, str]:
    """The environment without any ECHO_*/PEER_* setting of the caller."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ECHO_", "PEER_", "VIRTUAL_ENV", "PYTHONPATH"))
    }


# -- Echo ---------------------------------------------------------------------------------


ECHO_EMAIL_FORMAT = "bench-http-%d@example.com"
PEER_EMAIL_FORMAT = "peer-http-%d@example.com"
ME_USER = LOGIN_CONNECTIONS  # the account whose token the /me runs use


def _prepare_echo(dbs: Databases, accounts: int) -> tuple[Settings, str]:
    """Migrate, sign up ``accounts`` users (argon2 in 2 threads); the stored hash of one."""
    settings = settings_for(dbs)
    runtime = Runtime(settings, pool_size=4)
    try:
        runtime.upgrade_databases()
        emails = [ECHO_EMAIL_FORMAT % i for i in range(accounts)]
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda e: runtime.auth.signup(e, PASSWORD, SOURCE), emails))
        with transaction(runtime.identity, write=False) as conn:
            stored = conn.execute(
                select(users.c.password_hash).where(users.c.email == emails[0])
            ).scalar_one()
            count = conn.execute(select(users.c.id)).all()
        if len(count) != accounts:
            raise BenchError(f"Echo: {len(count)} accounts after {accounts} sign-ups")
    finally:
        runtime.close()
    return settings, str(stored)


def _echo_server(dbs: Databases, settings: Settings, workdir: Path) -> Server:
    port = _free_port()
    env = _clean_env() | {
        "ECHO_ENV": settings.env,
        "ECHO_DATA_DIR": str(settings.data_dir),
        "ECHO_IDENTITY_DB_URL": dbs.identity_url,
        "ECHO_AUDIT_DB_URL": dbs.audit_url,
        "ECHO_BASE_URL": f"http://127.0.0.1:{port}",
        "ECHO_LOG_LEVEL": "warning",
    }
    # `python -m echo_auth` is the `echo-auth` command (the same main()); spelled this way,
    # a `pkill -f "echo-auth serve"` meant for a developer's server does not stop ours
    # halfway through a run (it did, twice, on the shared machine).
    return Server(
        f"Echo ({dbs.backend})",
        port,
        [
            sys.executable,
            "-m",
            "echo_auth",
            "serve",
            "--workers",
            str(WORKERS),
            "--port",
            str(port),
        ],
        env,
        workdir,  # no .env file there: the settings are exactly the ones above
        workdir / f"echo-{dbs.backend}.log",
    )


def _echo_token(server: Server, email: str) -> str:
    body = json.dumps({"email": email, "password": PASSWORD}).encode()
    status, raw = _http(
        "POST",
        server.base + "/v1/login",
        body=body,
        headers={"Content-Type": "application/json"},
    )
    if status != 200:
        raise BenchError(f"Echo login answered {status}: {raw[:300]!r}")
    token = json.loads(raw).get("session_token")
    if not token:
        raise BenchError(f"Echo login gave no session_token: {raw[:300]!r}")
    status, raw = _http("GET", server.base + "/v1/me", headers={"Authorization": f"Bearer {token}"})
    if status != 200 or json.loads(raw).get("email") != email:
        raise BenchError(f"Echo /v1/me with the new token answered {status}: {raw[:300]!r}")
    return str(token)


# -- the peer -----------------------------------------------------------------------------


def _requirements_digest() -> str:
    return hashlib.sha256((PEER_DIR / "requirements.txt").read_bytes()).hexdigest()


def ensure_peer_venv() -> Path:
    """bench/peers/fastapi_users/.venv with the pinned requirements; made when missing."""
    marker = PEER_VENV / ".installed"
    digest = _requirements_digest()
    python = PEER_VENV / "bin" / "python"
    if python.exists() and marker.exists() and marker.read_text().strip() == digest:
        return python
    log(f"http: installing the peer's virtualenv in {PEER_VENV} (once)")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(PEER_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    try:
        done = subprocess.run(
            [*pip, "-r", str(PEER_DIR / "requirements.txt")],
            capture_output=True,
            text=True,
            timeout=900,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"could not install the peer's requirements: {exc}") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise BenchError(f"could not install the peer's requirements:\n{tail}")
    marker.write_text(digest + "\n")
    return python


@contextmanager
def _peer_database() -> Iterator[str]:
    """A throwaway MariaDB database for the peer; yields its asyncmy URL."""
    server = MySQLServer.from_url()
    name = f"echo_bench_{os.getpid()}_{secrets.token_hex(4)}_peer"
    server.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    try:
        auth = server.user + (":" + urllib.parse.quote(server.password) if server.password else "")
        yield f"mysql+asyncmy://{auth}@{server.host}:{server.port}/{name}?charset=utf8mb4"
    finally:
        try:
            server.execute(
                "SET SESSION lock_wait_timeout = 120", f"DROP DATABASE IF EXISTS `{name}`"
            )
        except Exception as exc:
            raise BenchError(f"could not drop the peer's database {name}: {exc}") from exc


def _peer_server(python: Path, url: str, workdir: Path) -> Server:
    env = _clean_env() | {
        "PEER_DATABASE_URL": url,
        "PEER_SECRET": secrets.token_urlsafe(32),
    }
    subprocess.run([str(python), "init_db.py"], cwd=PEER_DIR, env=env, check=True, timeout=60)
    port = _free_port()
    uvicorn = python.with_name("uvicorn")
    return Server(
        "FastAPI-Users",
        port,
        [
            str(uvicorn),
            "app:app",
            "--workers",
            str(WORKERS),
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env,
        PEER_DIR,
        workdir / "peer.log",
    )


def _peer_register(server: Server, accounts: int) -> None:
    def one(i: int) -> None:
        body = json.dumps({"email": PEER_EMAIL_FORMAT % i, "password": PASSWORD}).encode()
        status, raw = _http(
            "POST",
            server.base + "/auth/register",
            body=body,
            headers={"Content-Type": "application/json"},
            timeout=120,
        )
        if status != 201:
            raise BenchError(f"peer /auth/register answered {status}: {raw[:300]!r}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(accounts)))


def _peer_token(server: Server, email: str) -> str:
    body = urllib.parse.urlencode({"username": email, "password": PASSWORD}).encode()
    status, raw = _http(
        "POST",
        server.base + "/auth/jwt/login",
        body=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    if status != 200:
        raise BenchError(f"peer login answered {status}: {raw[:300]!r}")
    token = json.loads(raw)["access_token"]
    status, raw = _http(
        "GET", server.base + "/users/me", headers={"Authorization": f"Bearer {token}"}
    )
    if status != 200 or json.loads(raw).get("email") != email:
        raise BenchError(f"peer /users/me with the new token answered {status}: {raw[:300]!r}")
    return str(token)


def _peer_stored_hash(url: str) -> str:
    name = url.rsplit("/", 1)[1].split("?")[0]
    with MySQLServer.from_url().connect(name) as conn, conn.cursor() as cur:
        cur.execute("SELECT hashed_password FROM user LIMIT 1")
        row = cur.fetchone()
    if not row:
        raise BenchError("the peer has no users")
    return str(row[0])


def _argon2_params(stored: str) -> dict[str, int | str]:
    m = re.match(r"^\$(argon2\w+)\$v=\d+\$m=(\d+),t=(\d+),p=(\d+)\$", stored)
    if not m:
        raise BenchError(f"not an argon2 hash: {stored[:40]!r}")
    return {"type": m[1], "memory_kib": int(m[2]), "time_cost": int(m[3]), "parallelism": int(m[4])}


# -- wrk ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """One wrk invocation: what it sends and how."""

    url: str
    connections: int
    threads: int
    script_args: tuple[str, ...]

    def command(self, seconds: int) -> list[str]:
        return [
            WRK,
            "-t",
            str(self.threads),
            "-c",
            str(self.connections),
            "-d",
            f"{seconds}s",
            "--timeout",
            WRK_TIMEOUT,
            "-s",
            str(WRK_SCRIPT),
            self.url,
            "--",
            *self.script_args,
        ]


def me_load(base: str, path: str, token: str, connections: int) -> Load:
    return Load(base + path, connections, min(2, connections), ("me", token))


def login_load(base: str, path: str, style: str, email_format: str, connections: int) -> Load:
    # One connection per wrk thread, one account per thread: see bench.lua.
    return Load(
        base + path,
        connections,
        connections,
        ("login", style, email_format, PASSWORD, "1", str(connections)),
    )


_RUNNING: list[subprocess.Popen[str]] = []


def _start_wrk(load: Load, seconds: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        load.command(seconds),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    _RUNNING.append(proc)
    return proc


def _wrk_result(proc: subprocess.Popen[str], seconds: int) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=seconds + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _RUNNING.remove(proc)
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with {proc.returncode}: {err.strip()[-500:]}")
    for line in out.splitlines():
        if line.startswith("WRK_JSON "):
            doc: dict[str, Any] = json.loads(line[len("WRK_JSON ") :])
            break
    else:
        raise BenchError(f"wrk printed no WRK_JSON line: {out[-500:]} {err[-500:]}")
    duration_s = doc["duration_us"] / 1e6
    doc["ok"] = doc["requests"] - doc["non2xx"]
    doc["ok_rps"] = doc["ok"] / duration_s if duration_s else 0.0
    if doc["requests"]:
        for pct in (50, 90, 99):
            doc[f"p{pct}_ms"] = doc[f"p{pct}_us"] / 1000.0
    else:
        # Not one answer in the whole run: every latency was at least the run's length.
        doc["no_answer"] = True
        for pct in (50, 90, 99):
            doc[f"p{pct}_ms"] = doc["duration_us"] / 1000.0
    doc["errors_total"] = sum(doc["errors"].values()) - doc["errors"]["status"]
    return doc


def run_wrk(
    server: Server, what: str, load: Load, seconds: int, warm_s: int = 0, *, settle: bool = False
) -> dict[str, Any]:
    """A warm-up (not kept), then the measured run; ``settle``: let the server go idle after
    each (for logins, which wrk leaves in flight when it stops)."""
    try:
        if warm_s:
            _wrk_result(_start_wrk(load, warm_s), warm_s)
            if settle:
                server.wait_idle()
        doc = _wrk_result(_start_wrk(load, seconds), seconds)
    except BenchError:
        server.check_workers(what)  # says so when the server is the one that failed
        raise
    server.check_workers(what)
    if settle:
        doc["settled_s"] = server.wait_idle()
    return doc


def _stop_all_wrk() -> None:
    for proc in list(_RUNNING):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _RUNNING.remove(proc)


def storm(server: Server, login: Load, me: Load, seconds: int) -> dict[str, Any]:
    """Logins start first and end last; ``/me`` is measured while they run."""
    try:
        logins = _start_wrk(login, seconds + 1)
        time.sleep(1.0)
        me_doc = _wrk_result(_start_wrk(me, seconds), seconds)
        login_doc = _wrk_result(logins, seconds + 1)
    except BenchError:
        server.check_workers("the login storm")
        raise
    server.check_workers("the login storm")
    login_doc["settled_s"] = server.wait_idle()
    return {"me": me_doc, "login": login_doc}


# -- the hashing ceiling ------------------------------------------------------------------

CEILING_CODE = r"""
import json, sys, time
from argon2 import PasswordHasher
seconds, start_at, t, m, p = float(sys.argv[1]), float(sys.argv[2]), *map(int, sys.argv[3:6])
password = sys.stdin.readline().rstrip("\n")
ph = PasswordHasher(time_cost=t, memory_cost=m, parallelism=p)
stored = ph.hash(password)
while time.time() < start_at:
    time.sleep(0.002)
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    ph.verify(stored, password)
    n += 1
print(json.dumps({"verifies": n, "elapsed_s": time.perf_counter() - t0}))
"""


def hashing_ceiling(seconds: int, settings: Settings, processes: int = 2) -> dict[str, Any]:
    """``processes`` processes doing nothing but argon2-cffi verify, started together."""
    start_at = time.time() + 1.0
    args = [
        str(seconds),
        f"{start_at:.3f}",
        str(settings.argon2_time_cost),
        str(settings.argon2_memory_kib),
        str(settings.argon2_parallelism),
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CEILING_CODE, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    docs = []
    try:
        # Every process gets its password before any is waited for: they must verify at
        # the same time (waiting on one first would run them one after the other).
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(PASSWORD + "\n")
            proc.stdin.flush()
        for proc in procs:
            out, err = proc.communicate(timeout=seconds + 60)
            if proc.returncode != 0:
                raise BenchError(f"hashing ceiling process failed: {err.strip()[-300:]}")
            docs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rate = sum(d["verifies"] / d["elapsed_s"] for d in docs)
    return {"verifies_per_s": rate, "processes": docs}


# -- the measurement ----------------------------------------------------------------------


@dataclass
class Results:
    me: dict[str, dict[int, list[dict[str, Any]]]] = field(default_factory=dict)
    login: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    storm: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ceiling: list[dict[str, Any]] = field(default_factory=list)

    def add_me(self, target: str, conns: int, doc: dict[str, Any]) -> None:
        self.me.setdefault(target, {}).setdefault(conns, []).append(doc)


def _brief(doc: dict[str, Any]) -> str:
    bad = f", {doc['non2xx']} non-2xx {doc['statuses']}" if doc["non2xx"] else ""
    errs = f", {doc['errors_total']} socket errors" if doc["errors_total"] else ""
    return (
        f"{doc['ok_rps']:,.1f}/s p50 {doc['p50_ms']:.1f} ms p99 {doc['p99_ms']:.1f} ms{bad}{errs}"
    )


def _measure_mariadb(
    opts: Options, plan: Plan, res: Results, workdir: Path, stack: ExitStack, info: dict[str, Any]
) -> None:
    peer_python = ensure_peer_venv()
    accounts = max(LOGIN_CONNECTIONS, STORM_CONNECTIONS) + 1

    dbs = stack.enter_context(throwaway_databases("mariadb"))
    log(f"http: Echo on MariaDB: migrating, {accounts} sign-ups")
    settings, echo_hash = _prepare_echo(dbs, accounts)
    peer_url = stack.enter_context(_peer_database())
    echo = stack.enter_context(_running(_echo_server(dbs, settings, workdir), "/readyz"))
    peer = stack.enter_context(
        _running(_peer_server(peer_python, peer_url, workdir), "/openapi.json")
    )
    log(f"http: Echo at {echo.base}, FastAPI-Users at {peer.base}; registering peer users")
    _peer_register(peer, accounts)
    peer_hash = _peer_stored_hash(peer_url)
    info["argon2"] = {"echo": _argon2_params(echo_hash), "peer": _argon2_params(peer_hash)}
    if info["argon2"]["echo"] != info["argon2"]["peer"]:
        raise BenchError(f"argon2 parameters differ: {info['argon2']}")
    echo_token = _echo_token(echo, ECHO_EMAIL_FORMAT % ME_USER)
    peer_token = _peer_token(peer, PEER_EMAIL_FORMAT % ME_USER)
    servers = {"echo": echo, "peer": peer}
    info["servers"].update(servers)

    me = {
        "echo": lambda c: me_load(echo.base, "/v1/me", echo_token, c),
        "peer": lambda c: me_load(peer.base, "/users/me", peer_token, c),
    }
    logins = {
        "echo": lambda c: login_load(echo.base, "/v1/login", "echo", ECHO_EMAIL_FORMAT, c),
        "peer": lambda c: login_load(peer.base, "/auth/jwt/login", "form", PEER_EMAIL_FORMAT, c),
    }
    for rep in range(opts.reps):
        order = ("echo", "peer") if rep % 2 == 0 else ("peer", "echo")
        log(f"http: repetition {rep + 1}/{opts.reps} (order {', '.join(order)})")
        for conns in plan.concurrencies:
            for target in order:
                what = f"GET me c={conns}"
                doc = run_wrk(servers[target], what, me[target](conns), plan.me_s, plan.warm_s)
                res.add_me(target, conns, doc)
                log(f"http:   {target} me c={conns}: {_brief(doc)}")
        for target in order:
            warm = plan.login_warm_s if rep == 0 else 0
            load = logins[target](LOGIN_CONNECTIONS)
            doc = run_wrk(servers[target], "logins", load, plan.login_s, warm, settle=True)
            res.login.setdefault(target, []).append(doc)
            log(f"http:   {target} login c={LOGIN_CONNECTIONS}: {_brief(doc)}")
        ceiling = hashing_ceiling(plan.ceiling_s, settings)
        res.ceiling.append(ceiling)
        log(f"http:   hashing ceiling: {ceiling['verifies_per_s']:.2f} verifies/s")
        for target in order:
            loads = (logins[target](STORM_CONNECTIONS), me[target](STORM_CONNECTIONS))
            doc = storm(servers[target], *loads, plan.storm_s)
            res.storm.setdefault(target, []).append(doc)
            log(
                f"http:   {target} storm: me {_brief(doc['me'])}; "
                f"logins {doc['login']['ok_rps']:.1f}/s"
            )


def _measure_sqlite(
    opts: Options, plan: Plan, res: Results, workdir: Path, info: dict[str, Any]
) -> None:
    with ExitStack() as stack:
        dbs = stack.enter_context(throwaway_databases("sqlite"))
        accounts = LOGIN_CONNECTIONS + 1
        log(f"http: Echo on SQLite: migrating, {accounts} sign-ups")
        settings, _ = _prepare_echo(dbs, accounts)
        echo = stack.enter_context(_running(_echo_server(dbs, settings, workdir), "/readyz"))
        info["servers"]["echo_sqlite"] = echo
        token = _echo_token(echo, ECHO_EMAIL_FORMAT % ME_USER)
        for rep in range(opts.reps):
            log(f"http: SQLite repetition {rep + 1}/{opts.reps}")
            for conns in plan.sqlite_concurrencies:
                load = me_load(echo.base, "/v1/me", token, conns)
                doc = run_wrk(echo, f"GET me c={conns}", load, plan.me_s, plan.warm_s)
                res.add_me("echo_sqlite", conns, doc)
                log(f"http:   sqlite me c={conns}: {_brief(doc)}")
            load = login_load(echo.base, "/v1/login", "echo", ECHO_EMAIL_FORMAT, LOGIN_CONNECTIONS)
            warm = plan.login_warm_s if rep == 0 else 0
            doc = run_wrk(echo, "logins", load, plan.sqlite_login_s, warm, settle=True)
            res.login.setdefault("echo_sqlite", []).append(doc)
            log(f"http:   sqlite login c={LOGIN_CONNECTIONS}: {_brief(doc)}")


# -- summary ------------------------------------------------------------------------------

LABELS = {
    "echo": ("mariadb", "Echo /v1/me"),
    "peer": ("fastapi-users", "peer /users/me"),
    "echo_sqlite": ("sqlite", "Echo /v1/me"),
}


def _stats(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "rps": summarize([d["ok_rps"] for d in docs]),
        "p50_ms": summarize([d["p50_ms"] for d in docs]),
        "p90_ms": summarize([d["p90_ms"] for d in docs]),
        "p99_ms": summarize([d["p99_ms"] for d in docs]),
        "non2xx": sum(d["non2xx"] for d in docs),
        "socket_errors": sum(d["errors_total"] for d in docs),
        "statuses": _merge_statuses(docs),
        "runs_without_answer": sum(1 for d in docs if d.get("no_answer")),
    }


def _merge_statuses(docs: Sequence[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in docs:
        for code, n in d["statuses"].items():
            out[code] = out.get(code, 0) + n
    return out


def _problems(st: dict[str, Any]) -> str:
    bad = []
    if st.get("runs_without_answer"):
        bad.append(f"{st['runs_without_answer']} runs got no answer at all (latency = run length)")
    if st["non2xx"]:
        bad.append(f"{st['non2xx']} non-2xx {st['statuses']}")
    if st["socket_errors"]:
        bad.append(f"{st['socket_errors']} socket errors")
    return ("; NOT ALL OK: " + ", ".join(bad)) if bad else ""


def _paired_ratio(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    # Pairs by repetition; a run that failed part-way leaves the last one unpaired.
    return summarize([x / y for x, y in zip(a, b, strict=False) if y])


def _summarize(res: Results, plan: Plan) -> tuple[dict[str, Any], list[Row]]:
    doc: dict[str, Any] = {"me": {}, "login": {}, "storm": {}, "ratios": {}}
    rows: list[Row] = []
    for target, by_conn in res.me.items():
        backend, what = LABELS[target]
        doc["me"][target] = {}
        for conns, docs in sorted(by_conn.items()):
            st = _stats(docs)
            doc["me"][target][conns] = st
            rows.append(
                Row(
                    NAME,
                    f"{backend} c={conns}",
                    f"{what} req/s",
                    st["rps"]["median"],
                    "/s",
                    st["rps"]["spread_pct"],
                    len(docs),
                    f"p50 {st['p50_ms']['median']:.1f} ms, p99 {st['p99_ms']['median']:.1f} ms"
                    + _problems(st),
                )
            )
    for conns in plan.concurrencies:
        if conns not in res.me.get("echo", {}) or conns not in res.me.get("peer", {}):
            continue
        e, p = res.me["echo"][conns], res.me["peer"][conns]
        ratio = _paired_ratio([d["ok_rps"] for d in e], [d["ok_rps"] for d in p])
        p99_ratio = _paired_ratio([d["p99_ms"] for d in e], [d["p99_ms"] for d in p])
        doc["ratios"][f"me_rps_c{conns}"] = ratio
        doc["ratios"][f"me_p99_c{conns}"] = p99_ratio
        ep99, pp99 = doc["me"]["echo"][conns]["p99_ms"], doc["me"]["peer"][conns]["p99_ms"]
        lower = "lower" if ep99["median"] < pp99["median"] else "NOT lower"
        rows.append(
            Row(
                NAME,
                f"Echo/peer c={conns}",
                "me req/s ratio",
                ratio["median"],
                "x",
                ratio["spread_pct"],
                len(e),
                f"target ≥ {TARGETS['me_ratio']:.0f}x; p99 {ep99['median']:.1f} ms vs "
                f"{pp99['median']:.1f} ms ({lower})",
            )
        )
    ceiling = summarize([c["verifies_per_s"] for c in res.ceiling])
    doc["ceiling"] = {"verifies_per_s": ceiling, "runs": res.ceiling}
    for target, docs in res.login.items():
        backend = LABELS[target][0]
        st = _stats(docs)
        queue_ms = [1000.0 * LOGIN_CONNECTIONS / d["ok_rps"] if d["ok_rps"] else 0 for d in docs]
        over = [d["p99_ms"] / q for d, q in zip(docs, queue_ms, strict=True) if q]
        st["queueing_mean_ms"] = summarize(queue_ms)
        st["p99_over_queueing_mean"] = summarize(over)
        doc["login"][target] = st
        note = (
            f"p50 {st['p50_ms']['median']:.0f} ms, p99 {st['p99_ms']['median']:.0f} ms; "
            f"16/X = {st['queueing_mean_ms']['median']:.0f} ms, p99/(16/X) = "
            f"{st['p99_over_queueing_mean']['median']:.2f} "
            f"(target ≤ {TARGETS['login_p99_over_queue']})" + _problems(st)
        )
        rows.append(
            Row(
                NAME,
                f"{backend} c={LOGIN_CONNECTIONS}",
                "peer login throughput" if target == "peer" else "Echo login throughput",
                st["rps"]["median"],
                "logins/s",
                st["rps"]["spread_pct"],
                len(docs),
                note,
            )
        )
    if res.ceiling:
        rows.append(
            Row(
                NAME,
                "argon2 ceiling",
                "hashing ceiling (2 processes)",
                ceiling["median"],
                "verifies/s",
                ceiling["spread_pct"],
                len(res.ceiling),
                "argon2-cffi verify in a loop, nothing else",
            )
        )
        for target in ("echo", "peer"):
            if target not in res.login:
                continue
            pct = _paired_ratio(
                [100.0 * d["ok_rps"] for d in res.login[target]],
                [c["verifies_per_s"] for c in res.ceiling],
            )
            doc["ratios"][f"login_pct_of_ceiling_{target}"] = pct
            rows.append(
                Row(
                    NAME,
                    f"{LABELS[target][0]} c={LOGIN_CONNECTIONS}",
                    "logins % of ceiling",
                    pct["median"],
                    "%",
                    pct["spread_pct"],
                    len(res.ceiling),
                    f"target ≥ {TARGETS['login_pct_of_ceiling']:.0f}%" if target == "echo" else "",
                )
            )
    for target, docs in res.storm.items():
        me_st, login_st = _stats([d["me"] for d in docs]), _stats([d["login"] for d in docs])
        doc["storm"][target] = {"me": me_st, "login": login_st}
        backend, what = LABELS[target]
        rows.append(
            Row(
                NAME,
                f"{backend} storm",
                f"{what} p99",
                me_st["p99_ms"]["median"],
                "ms",
                me_st["p99_ms"]["spread_pct"],
                len(docs),
                f"{STORM_CONNECTIONS} conns on me + {STORM_CONNECTIONS} logging in: "
                f"{me_st['rps']['median']:,.0f} req/s, logins {login_st['rps']['median']:.1f}/s"
                + (f"; target < {STORM_P99_TARGET_MS:.0f} ms" if target == "echo" else "")
                + _problems(me_st)
                + _problems(login_st),
            )
        )
    return doc, rows


def _plot(res: Results, path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("http: matplotlib is missing (pip install -e '.[bench]'): no plot")
        return None
    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(11, 4.5))
    styles = {
        "echo": ("Echo (MariaDB)", "tab:blue", "o"),
        "peer": ("FastAPI-Users (MariaDB)", "tab:red", "s"),
        "echo_sqlite": ("Echo (SQLite)", "tab:green", "^"),
    }
    for target, by_conn in res.me.items():
        label, color, marker = styles[target]
        conns = sorted(by_conn)
        for ax, key in ((ax_rps, "ok_rps"), (ax_p99, "p99_ms")):
            stats = [summarize([d[key] for d in by_conn[c]]) for c in conns]
            med = [s["median"] for s in stats]
            err = [
                [s["median"] - s["min"] for s in stats],
                [s["max"] - s["median"] for s in stats],
            ]
            ax.errorbar(conns, med, yerr=err, label=label, color=color, marker=marker, capsize=3)
    ticks = sorted({c for by_conn in res.me.values() for c in by_conn})
    for ax in (ax_rps, ax_p99):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.minorticks_off()
        ax.set_xlabel("concurrent connections (wrk)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax_rps.set_ylabel("GET me: requests/s (median, min-max)")
    ax_rps.set_ylim(bottom=0)
    ax_p99.set_ylabel("GET me: p99 latency, ms (log)")
    ax_p99.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that servers and databases are cleaned up."""


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise Terminated("SIGTERM")


def run(opts: Options) -> list[Row]:
    if shutil.which(WRK) is None:
        raise BenchError(f"{WRK} not found: run scripts/ensure-wrk (apt-get install wrk)")
    # The servers run in their own sessions (a Ctrl-C must not reach them before we stop
    # them), so a SIGTERM to this process must stop them too: it unwinds like Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(opts)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(opts: Options) -> list[Row]:
    plan = _plan(opts.quick)
    load_at_start = loadavg()
    res = Results()
    started = time.perf_counter()
    info: dict[str, Any] = {"servers": {}}
    logs: dict[str, Any] = {}
    failure: Exception | None = None
    with tempfile.TemporaryDirectory(prefix="echo-bench-http-") as tmp:
        # ECHO_BENCH_HTTP_LOG_DIR keeps the servers' logs (they go with the temporary dir).
        keep = os.environ.get("ECHO_BENCH_HTTP_LOG_DIR")
        workdir = Path(keep) if keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            with ExitStack() as stack:
                _measure_mariadb(opts, plan, res, workdir, stack, info)
            _measure_sqlite(opts, plan, res, workdir, info)
        except Exception as exc:  # what was measured is written (marked incomplete), then raised
            failure = exc
        finally:
            _stop_all_wrk()
            servers: dict[str, Server] = info.pop("servers")
            logs = {
                k: s.log_summary() | {"worker_replacements": s.restarts} for k, s in servers.items()
            }
    for name, summary in logs.items():
        if summary.get("worker_replacements"):
            log(f"http: {name}: uvicorn replaced workers: {summary['worker_replacements']}")
        if summary.get("error_lines") or summary.get("tracebacks"):
            log(
                f"http: {name} logged {summary['error_lines']} error lines, "
                f"{summary['tracebacks']} tracebacks; last lines:\n  "
                + "\n  ".join(summary["tail"][-5:])
            )
    took = time.perf_counter() - started
    doc, rows = _summarize(res, plan)
    m = machine_info()
    title = (
        f"Echo vs FastAPI-Users, {WORKERS} workers each, wrk on loopback; "
        f"{m['cpu']}, {m['cores']} cores; load average {load_at_start}; {m['date'][:16]}"
        + (" (QUICK: 1 s runs)" if opts.quick else "")
    )
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    plot = _plot(res, opts.results_dir / f"{NAME}.png", title) if res.me else None
    write_result(
        opts,
        NAME,
        {
            "parameters": {
                "workers": WORKERS,
                "plan": plan.__dict__,
                "login_connections": LOGIN_CONNECTIONS,
                "storm_connections": STORM_CONNECTIONS,
                "wrk_timeout": WRK_TIMEOUT,
                "targets": TARGETS | {"storm_me_p99_ms": STORM_P99_TARGET_MS},
                "reps": opts.reps,
                "argon2": info.get("argon2"),
                "wrk": _wrk_version(),
            },
            "wall_s": took,
            "incomplete": None if failure is None else f"{type(failure).__name__}: {failure}",
            "loadavg_at_http_start": load_at_start,
            "plot": str(plot) if plot else None,
            "server_logs": logs,
            **doc,
            "raw": {
                "me": res.me,
                "login": res.login,
                "storm": res.storm,
            },
        },
        rows,
    )
    if failure is not None:
        log(f"http: failed; what was measured is in {opts.results_dir / NAME}.json (incomplete)")
        raise failure
    return rows


def _wrk_version() -> str:
    try:
        out = subprocess.run([WRK, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr) else ""
