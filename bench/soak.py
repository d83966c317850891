"""soak: 10 minutes of mixed traffic against real processes, with two relays running.

Throwaway MariaDB databases, migrated; an admin+auditor made with ``echo-auth user
create`` and ordinary users made in-process (``create_user_by_operator``), all with
Echo's real argon2id parameters. Then, as separate processes with ``ECHO_*`` settings:
``echo-auth serve --workers 2 --no-relay`` and two ``echo-auth relay``. A load process
(``bench/soak_client.py``) sends a fixed open-loop schedule of logins, logouts, ``/v1/me``
(most of it), admin reads and audit searches for ``--soak-seconds`` (default 600).

Every second the harness samples the outbox (depth and the age of its oldest row, read
straight from the identity database) and the RSS (``VmRSS``) and CPU time of every
process: the serve supervisor, each API worker (its children) and each relay.

At the end the relays drain the outbox; then every process is stopped (SIGTERM, exit 0
expected), and the result is checked: the outbox and the dead letters are empty, every
acknowledged request that must leave an audit event has exactly one (matched by its
``X-Request-ID``), ``seq`` is gapless and ``echo-auth audit verify`` exits 0. Those
checks failing fails the benchmark (after writing the JSON); errors, lag and memory
growth are reported against their targets, never asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql

from bench.common import (
    REPO_DIR,
    BenchError,
    Databases,
    MySQLServer,
    Options,
    Row,
    loadavg,
    log,
    percentile,
    settings_for,
    throwaway_databases,
    write_result,
)
from echo_auth.audit.events import Actor, Source
from echo_auth.identity.provisioning import create_user_by_operator
from echo_auth.runtime import Runtime

NAME = "soak"
PASSWORD = "correct horse battery staple 7193"
ADMIN_EMAIL = "soak-admin@example.com"
DEFAULT_SECONDS = 600.0
QUICK_SECONDS = 20.0
# Requests per second by kind: ~200/s in all, which this 2-core machine (also running
# MariaDB, two relays and the load process itself) sustains with headroom. Logins are
# few: each costs one argon2id verify (t=3, m=64 MiB, p=4), ~0.2 to 0.7 s of CPU here.
RATES: dict[str, float] = {
    "me": 185.0,
    "login": 1.0,
    "logout": 1.0,
    "admin_list": 3.0,
    "admin_view": 3.0,
    "audit_search": 6.0,
}
USERS = 20
QUICK_USERS = 5
WORKERS = 2
RELAYS = 2
DRAIN_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
MB = 1024.0 * 1024.0
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Plan:
    seconds: float
    users: int
    warmup_s: float  # memory "at start" is measured after this much load ...
    window_s: float  # ... as the median over this long (and "at end": the last window_s)


def plan_for(opts: Options) -> Plan:
    seconds = opts.soak_seconds or (QUICK_SECONDS if opts.quick else DEFAULT_SECONDS)
    if opts.quick or seconds < 120:
        return Plan(seconds, QUICK_USERS if opts.quick else USERS, seconds / 4, seconds / 4)
    return Plan(seconds, USERS, 30.0, 30.0)


# -- processes ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(dbs: Databases, data_dir: Path, port: int) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_")}
    return {
        **base,
        "ECHO_ENV": "test",
        "ECHO_DATA_DIR": str(data_dir),
        "ECHO_IDENTITY_DB_URL": dbs.identity_url,
        "ECHO_AUDIT_DB_URL": dbs.audit_url,
        "ECHO_BASE_URL": f"http://127.0.0.1:{port}",
        "ECHO_LOG_LEVEL": "warning",
    }


def _echo_auth() -> list[str]:
    return [sys.executable, "-m", "echo_auth"]


class Proc:
    """A child in its own session (so a Ctrl-C reaches only us, and we stop it)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                args,
                env=env,
                cwd=log_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait; SIGKILL to its process group if it does not end. The exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        self.kill()  # leftovers of its group (a worker whose supervisor died)
        return self.proc.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def log(self, tail: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return sorted(out)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return None


def _cpu_s(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine spent busy since boot (all cores, every process)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    # cpu user nice system idle iowait irq softirq steal ...
    values = [int(v) for v in fields[1:9]]
    return (sum(values) - values[3] - values[4]) / TICKS


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - our URL
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def _wait_ready(base: str, procs: list[Proc], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive:
                raise BenchError(f"{p.name} exited with {p.proc.returncode}:\n{p.log()}")
        if _get(f"{base}/readyz") == 200:
            return
        time.sleep(0.2)
    raise BenchError(f"{base}/readyz did not answer 200 within {timeout:.0f} s")


def _workers(serve: Proc, want: int, timeout: float = 30.0) -> list[int]:
    """The API worker processes: the serve supervisor's children that run the app."""
    deadline = time.monotonic() + timeout
    while True:
        kids = [p for p in _children(serve.pid) if "resource_tracker" not in _cmdline(p)]
        if len(kids) >= want or time.monotonic() > deadline:
            if len(kids) != want:
                raise BenchError(
                    f"expected {want} API workers under pid {serve.pid}, found "
                    + ", ".join(f"{p}: {_cmdline(p)[:80]}" for p in kids)
                )
            return kids
        time.sleep(0.2)


# -- sampling -----------------------------------------------------------------------------


@dataclass
class Sampler:
    """Each process's RSS and CPU time every 0.25 s; the outbox (depth, oldest age) each 1 s.

    RSS is sampled often because a login's argon2id verify holds 64 MiB for a fraction of
    a second: the floor of a window (its smallest sample) is the process without those
    transient buffers, which is what a leak would raise.
    """

    dbs: Databases
    pids: dict[str, int]
    interval_s: float = 0.25
    outbox_every_s: float = 1.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        server = MySQLServer.from_url()
        conn: pymysql.Connection[Any] | None = None
        next_outbox = 0.0
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                self.samples.append(self.processes())
                if started >= next_outbox:
                    next_outbox = started + self.outbox_every_s
                    try:
                        if conn is None:
                            conn = server.connect(self.dbs.identity_db)
                        depth, age = outbox_now(conn)
                        self.outbox.append(
                            {
                                "t": time.time(),
                                "outbox_depth": depth,
                                "outbox_oldest_age_s": age,
                                "loadavg_1m": load[0] if (load := loadavg()) else None,
                            }
                        )
                    except pymysql.MySQLError as exc:
                        self.problems.append(f"{time.time():.0f}: {exc}")
                        if conn is not None:
                            conn.close()
                        conn = None
                self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))
        finally:
            if conn is not None:
                conn.close()

    def processes(self) -> dict[str, Any]:
        return {
            "t": time.time(),
            "rss_mb": {name: _rss_mb(pid) for name, pid in self.pids.items()},
            "cpu_s": {
                **{name: _cpu_s(pid) for name, pid in self.pids.items()},
                "machine": _machine_busy_s(),
            },
        }


def outbox_now(conn: pymysql.Connection[Any]) -> tuple[int, float]:
    """Rows in the outbox, and the age of the oldest (0 when empty), by the server's clock."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT COUNT(*), "
            "COALESCE(TIMESTAMPDIFF(MICROSECOND, MIN(created_at), UTC_TIMESTAMP(6)), 0) "
            "FROM audit_outbox"
        )
        row = cur.fetchone()
    assert row is not None
    return int(row[0]), max(0.0, float(row[1]) / 1e6)


def _scalar(conn: pymysql.Connection[Any], sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
    return row[0] if row else None


# -- analysis -----------------------------------------------------------------------------


def _memory(
    samples: list[dict[str, Any]],
    names: list[str],
    plan: Plan,
    t0: float,
    t1: float,
    idle: dict[str, Any],
) -> dict[str, Any]:
    """Per process: RSS at start (after warm-up) and at end of the load, over a window each.

    ``floor``: the window's smallest sample (the process without argon2's transient
    64 MiB buffers; growth is judged on it); ``median`` and the single samples at the
    window's edges are reported beside it.
    """
    start_lo, start_hi = t0 + plan.warmup_s, t0 + plan.warmup_s + plan.window_s
    end_lo = t1 - plan.window_s
    out: dict[str, Any] = {}
    for name in names:
        series = [(s["t"], s["rss_mb"].get(name)) for s in samples if t0 <= s["t"] <= t1]
        series = [(t, v) for t, v in series if v is not None]
        start = [v for t, v in series if start_lo <= t <= start_hi]
        end = [v for t, v in series if t >= end_lo]
        if not start or not end:
            out[name] = {"error": "no samples"}
            continue
        s_floor, e_floor = min(start), min(end)
        s_med, e_med = statistics.median(start), statistics.median(end)
        step = max(1, len(series) // 240)
        out[name] = {
            "start_floor_mb": s_floor,
            "end_floor_mb": e_floor,
            "growth_pct": 100.0 * (e_floor - s_floor) / s_floor,
            "start_median_mb": s_med,
            "end_median_mb": e_med,
            "growth_median_pct": 100.0 * (e_med - s_med) / s_med,
            "start_point_mb": start[0],
            "end_point_mb": end[-1],
            "after_drain_mb": idle["rss_mb"].get(name),
            "min_mb": min(v for _, v in series),
            "max_mb": max(v for _, v in series),
            "start_window_s": [round(start_lo - t0, 1), round(start_hi - t0, 1)],
            "end_window_s": [round(end_lo - t0, 1), round(t1 - t0, 1)],
            "samples_per_window": [len(start), len(end)],
            "floor_per_minute_mb": _floors(series, t0, 60.0),
            "series_mb": [[round(t - t0, 1), round(v, 1)] for t, v in series[::step]],
        }
    return out


def _floors(series: list[tuple[float, float]], t0: float, width: float) -> list[list[float]]:
    """The smallest sample of each ``width``-second slice of the load: [from_s, MB]."""
    floors: dict[int, float] = {}
    for t, v in series:
        k = int((t - t0) // width)
        floors[k] = min(v, floors.get(k, v))
    return [[k * width, round(v, 1)] for k, v in sorted(floors.items())]


def _cpu(samples: list[dict[str, Any]], names: list[str], t0: float, t1: float) -> dict[str, float]:
    inside = [s for s in samples if t0 <= s["t"] <= t1]
    out: dict[str, float] = {}
    if len(inside) < 2:
        return out
    first, last = inside[0], inside[-1]
    span = last["t"] - first["t"]
    for name in names:
        a, b = first["cpu_s"].get(name), last["cpu_s"].get(name)
        if a is not None and b is not None and span > 0:
            out[name] = (b - a) / span
    return out


def _outbox(samples: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    inside = [s for s in samples if t0 <= s["t"] <= t1]
    ages = [s["outbox_oldest_age_s"] for s in inside]
    depths = [s["outbox_depth"] for s in inside]
    if not inside:
        return {"samples": 0}
    return {
        "samples": len(inside),
        "oldest_age_s": {
            "p50": percentile(ages, 50),
            "p99": percentile(ages, 99),
            "max": max(ages),
            "mean": sum(ages) / len(ages),
        },
        "depth": {"p50": percentile(depths, 50), "p99": percentile(depths, 99), "max": max(depths)},
        "empty_share_pct": 100.0 * sum(1 for d in depths if d == 0) / len(depths),
    }


def _check_audit(dbs: Databases, acknowledged: list[list[str]]) -> tuple[dict[str, Any], list[str]]:
    """Every acknowledged request has its event exactly once; the chain has no gap."""
    server = MySQLServer.from_url()
    problems: list[str] = []
    with server.connect(dbs.audit_db) as conn:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT request_id, action, "
                "TIMESTAMPDIFF(MICROSECOND, occurred_at, recorded_at) "
                "FROM audit_events WHERE request_id LIKE 'soak-%'"
            )
            soak_rows = list(cur.fetchall())
            cur.execute("SELECT action, COUNT(*) FROM audit_events GROUP BY action")
            by_action = {str(a): int(n) for a, n in cur.fetchall()}
        total = int(_scalar(conn, "SELECT COUNT(*) FROM audit_events") or 0)
        min_seq = _scalar(conn, "SELECT MIN(seq) FROM audit_events")
        max_seq = _scalar(conn, "SELECT MAX(seq) FROM audit_events")
    with server.connect(dbs.identity_db) as conn:
        outbox_left = int(_scalar(conn, "SELECT COUNT(*) FROM audit_outbox") or 0)
        dead = int(_scalar(conn, "SELECT COUNT(*) FROM audit_dead_letters") or 0)
    found = Counter((str(r), str(a)) for r, a, _ in soak_rows)
    wanted = Counter((r, a) for r, a in acknowledged)
    missing = [k for k in wanted if found[k] < wanted[k]]
    duplicated = [k for k, n in found.items() if n > 1]
    unacknowledged = [k for k in found if k not in wanted]
    delivery = sorted(float(us) / 1000.0 for _, _, us in soak_rows)
    if missing:
        problems.append(f"{len(missing)} acknowledged requests have no audit event: {missing[:5]}")
    if duplicated:
        problems.append(f"{len(duplicated)} requests have their event more than once")
    if outbox_left:
        problems.append(f"{outbox_left} events still in the outbox after the drain")
    if dead:
        problems.append(f"{dead} dead letters")
    if total and (min_seq != 1 or max_seq != total):
        problems.append(f"seq is not gapless: {total} rows, seq {min_seq}..{max_seq}")
    doc = {
        "audit_rows": total,
        "seq_range": [min_seq, max_seq],
        "by_action": by_action,
        "acknowledged": sum(wanted.values()),
        "found_for_acknowledged": sum(min(found[k], n) for k, n in wanted.items()),
        "missing": len(missing),
        "duplicated": len(duplicated),
        "events_of_unacknowledged_requests": len(unacknowledged),
        "other_events": total - len(soak_rows),
        "outbox_left": outbox_left,
        "dead_letters": dead,
        "delivery_latency_ms": {
            "p50": percentile(delivery, 50) if delivery else None,
            "p99": percentile(delivery, 99) if delivery else None,
            "max": delivery[-1] if delivery else None,
        },
    }
    return doc, problems


def _log_levels(procs: list[Proc]) -> dict[str, Any]:
    """Lines by level in each process's output (JSON lines), and any traceback."""
    out: dict[str, Any] = {}
    for p in procs:
        levels: Counter[str] = Counter()
        samples: list[str] = []
        text = p.log_path.read_text(errors="replace") if p.log_path.exists() else ""
        for line in text.splitlines():
            level = "other"
            if line.startswith("{"):
                with contextlib.suppress(ValueError, AttributeError):
                    level = str(json.loads(line).get("level", "other")).lower()
            levels[level] += 1
            if level in ("warning", "error", "critical", "other") and len(samples) < 10:
                samples.append(line[:400])
        out[p.name] = {
            "lines": dict(levels),
            "traceback": "Traceback" in text,
            "samples": samples,
        }
    return out


# -- the benchmark ------------------------------------------------------------------------


def _make_users(dbs: Databases, env: dict[str, str], data_dir: Path, n: int) -> list[str]:
    settings = settings_for(dbs, data_dir=data_dir)
    runtime = Runtime(settings)
    try:
        runtime.upgrade_databases()
        # Made now, once: both relays sign checkpoints with this one key.
        runtime.checkpoint_key  # noqa: B018
        operator, source = Actor("admin", "bench", "soak"), Source()
        emails = [f"soak-user-{i}@example.com" for i in range(n)]
        for email in emails:
            create_user_by_operator(runtime.auth, email, PASSWORD, [], operator, source)
    finally:
        runtime.close()
    made = subprocess.run(
        [
            *_echo_auth(),
            "user",
            "create",
            "--email",
            ADMIN_EMAIL,
            "--role",
            "admin",
            "--role",
            "auditor",
        ],
        input=PASSWORD + "\n",
        env=env,
        cwd=data_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if made.returncode != 0:
        raise BenchError(f"echo-auth user create failed: {made.stderr.strip()[-500:]}")
    return emails


def run(opts: Options) -> list[Row]:
    plan = plan_for(opts)
    log(
        f"soak: {plan.seconds:.0f} s at {sum(RATES.values()):.0f} req/s "
        f"({', '.join(f'{k} {v:g}/s' for k, v in RATES.items())}), {plan.users} users"
    )
    with throwaway_databases("mariadb") as dbs:
        return _run(opts, plan, dbs)


def _run(opts: Options, plan: Plan, dbs: Databases) -> list[Row]:
    data_dir = dbs.workdir / "var"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = _env(dbs, data_dir, port)
    t_setup = time.monotonic()
    emails = _make_users(dbs, env, data_dir, plan.users)
    log(
        f"soak: databases migrated, {len(emails)} users + admin/auditor "
        f"({time.monotonic() - t_setup:.0f} s)"
    )

    procs: list[Proc] = []
    client: Proc | None = None
    sampler: Sampler | None = None
    try:
        serve = Proc(
            "serve",
            [*_echo_auth(), "serve", "--workers", str(WORKERS), "--no-relay", "--port", str(port)],
            env,
            dbs.workdir,
        )
        procs.append(serve)
        for i in range(1, RELAYS + 1):
            procs.append(Proc(f"relay{i}", [*_echo_auth(), "relay"], env, dbs.workdir))
        _wait_ready(base, procs)
        workers = _workers(serve, WORKERS)
        pids = {"serve": serve.pid}
        pids.update({f"api_worker{i}": pid for i, pid in enumerate(workers, 1)})
        pids.update({p.name: p.pid for p in procs if p.name.startswith("relay")})
        log(f"soak: ready at {base}; pids {pids}")

        config = {
            "base_url": base,
            "password": PASSWORD,
            "admin_email": ADMIN_EMAIL,
            "emails": emails,
            "duration_s": plan.seconds,
            "rates": RATES,
            "timeout_s": 30.0,
            "max_connections": 100,
        }
        config_path = dbs.workdir / "soak-client.json"
        out_path = dbs.workdir / f"soak-client-out-{secrets.token_hex(4)}.json"
        config_path.write_text(json.dumps(config))
        load_avg_start = loadavg()
        client = Proc(
            "client",
            [sys.executable, "-m", "bench.soak_client", str(config_path), str(out_path)],
            {**os.environ, "PYTHONPATH": str(REPO_DIR)},
            dbs.workdir,
        )
        # Started before the client's schedule: it logs its sessions in first.
        sampler = Sampler(dbs, {**pids, "client": client.pid})
        sampler.start()
        budget = plan.seconds + 300.0
        try:
            code = client.proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            raise BenchError(f"the load process did not finish within {budget:.0f} s") from None
        if code != 0:
            raise BenchError(f"the load process exited with {code}:\n{client.log()}")
        load = json.loads(out_path.read_text())
        t0 = float(load["load_started_epoch"])
        t1 = t0 + float(load["schedule_s"])
        log(
            f"soak: load done: {load['requests']} requests, {load['errors']} errors; "
            "waiting for the relays to drain"
        )

        drain_started = time.monotonic()
        with MySQLServer.from_url().connect(dbs.identity_db) as conn:
            while True:
                depth, _ = outbox_now(conn)
                if depth == 0:
                    break
                if time.monotonic() - drain_started > DRAIN_TIMEOUT_S:
                    break
                for p in procs:
                    if not p.alive:
                        raise BenchError(f"{p.name} exited with {p.proc.returncode}:\n{p.log()}")
                time.sleep(0.2)
        drain_s = time.monotonic() - drain_started
        idle = sampler.processes()  # every process alive and idle: nothing left to do
        replaced = sorted(set(workers) ^ set(_workers(serve, WORKERS)))
        sampler.stop()
        exits: dict[str, int | None] = {}
        for p in reversed(procs):  # the relays first, then the API
            exits[p.name] = p.stop()
        audit, problems = _check_audit(dbs, load["acknowledged"])
        if depth:
            problems.append(f"the outbox did not drain within {DRAIN_TIMEOUT_S:.0f} s")
        if replaced:
            problems.append(f"API workers were replaced during the run (pids {replaced})")
        for name, exit_code in exits.items():
            if exit_code != 0:
                problems.append(f"{name} exited with {exit_code} on SIGTERM")
        verify = subprocess.run(
            [*_echo_auth(), "audit", "verify", "--json"],
            env=env,
            cwd=data_dir,
            capture_output=True,
            text=True,
            timeout=600,
        )
        verify_doc: dict[str, Any] = {"exit_code": verify.returncode}
        try:
            report = json.loads(verify.stdout)
            verify_doc.update(
                {k: report.get(k) for k in ("intact", "events_checked", "problems_total")}
            )
        except ValueError:
            verify_doc["stdout"] = verify.stdout[-1000:]
        verify_doc["stderr"] = verify.stderr[-1000:]
        if verify.returncode != 0:
            problems.append(f"echo-auth audit verify exited with {verify.returncode}")
        elif verify_doc.get("events_checked") not in (None, audit["audit_rows"]):
            problems.append(
                f"audit verify checked {verify_doc['events_checked']} events, "
                f"the table has {audit['audit_rows']}"
            )
        logs = _log_levels(procs)
        for name, info in logs.items():
            if info["traceback"]:
                problems.append(f"{name} logged a traceback")

        names = list(pids)
        memory = _memory(sampler.samples, names, plan, t0, t1, idle)
        cpu = _cpu(sampler.samples, [*names, "client", "machine"], t0, t1)
        outbox = _outbox(sampler.outbox, t0, t1)
        loads = [s["loadavg_1m"] for s in sampler.outbox if t0 <= s["t"] <= t1 and s["loadavg_1m"]]
        document = {
            "parameters": {
                "seconds": plan.seconds,
                "rates_per_s": RATES,
                "total_rate_per_s": sum(RATES.values()),
                "users": plan.users,
                "api_workers": WORKERS,
                "relays": RELAYS,
                "warmup_s": plan.warmup_s,
                "memory_window_s": plan.window_s,
                "argon2": "Echo's defaults (t=3, m=64 MiB, p=4; 2 hashing threads per worker)",
                "quick": opts.quick,
            },
            "pids": pids,
            "load": {k: v for k, v in load.items() if k != "acknowledged"},
            "outbox": outbox,
            "memory": memory,
            "cpu_cores_used": cpu,
            "loadavg_1m_during": {
                "at_start": load_avg_start[0] if load_avg_start else None,
                "mean": sum(loads) / len(loads) if loads else None,
                "max": max(loads) if loads else None,
            },
            "drain_s": drain_s,
            "exit_codes": exits,
            "audit": audit,
            "verify": verify_doc,
            "logs": logs,
            "sampler_problems": sampler.problems,
            "problems": problems,
            "outbox_samples": sampler.outbox,
        }
        rows = _rows(plan, load, outbox, memory, cpu, audit, verify_doc)
        path = write_result(opts, NAME, document, rows)
        log(f"soak: wrote {path}")
        if problems:
            raise BenchError("soak: " + "; ".join(problems))
        return rows
    finally:
        if client is not None and client.alive:
            client.kill()
        if sampler is not None:
            sampler.stop()
        for p in reversed(procs):
            if p.alive:
                p.stop(timeout=20)
            else:
                p.kill()


def _statuses(counts: dict[str, int]) -> str:
    return ", ".join(f"{status} x{n}" for status, n in counts.items())


def _rows(
    plan: Plan,
    load: dict[str, Any],
    outbox: dict[str, Any],
    memory: dict[str, Any],
    cpu: dict[str, float],
    audit: dict[str, Any],
    verify: dict[str, Any],
) -> list[Row]:
    case = f"mariadb {plan.seconds:.0f} s, {WORKERS} workers + {RELAYS} relays"
    achieved = load["completed"] / load["wall_s"] if load["wall_s"] else 0.0
    echo_cpu = sum(v for k, v in cpu.items() if k not in ("client", "machine"))
    kinds = load["kinds"]
    rows = [
        Row(
            NAME,
            case,
            "requests",
            float(load["requests"]),
            "n",
            note=f"{sum(RATES.values()):.0f}/s scheduled, {achieved:.0f}/s answered; "
            f"client late p99 {load['scheduler_lateness_ms']['p99']:.0f} ms; CPU cores busy: "
            f"machine {cpu.get('machine', 0.0):.2f}, Echo {echo_cpu:.2f}, "
            f"client {cpu.get('client', 0.0):.2f}",
        ),
        Row(
            NAME,
            case,
            "errors",
            float(load["errors"]),
            "n",
            note="target 0"
            + (
                "; "
                + ", ".join(
                    f"{k}: {v['errors']} ({_statuses(v['statuses'])})"
                    for k, v in kinds.items()
                    if v["errors"]
                )
                if load["errors"]
                else ""
            ),
        ),
    ]
    for kind in ("me", "login", "admin_list", "admin_view", "audit_search", "logout"):
        if kind not in kinds:
            continue
        lat = kinds[kind]["latency_ms"]
        rows.append(
            Row(
                NAME,
                case,
                f"{kind} latency p50",
                lat["p50"],
                "ms",
                reps=kinds[kind]["completed"],
                note=f"p99 {lat['p99']:.1f} ms, max {lat['max']:.0f} ms "
                f"({kinds[kind]['rate_per_s']:g}/s)",
            )
        )
    age = outbox.get("oldest_age_s", {})
    if age:
        rows.append(
            Row(
                NAME,
                case,
                "outbox lag p99",
                age["p99"] * 1000.0,
                "ms",
                reps=outbox["samples"],
                note="age of the oldest outbox row, sampled each second; "
                f"max {age['max'] * 1000:.0f} ms, depth p99 {outbox['depth']['p99']}, "
                f"empty in {outbox['empty_share_pct']:.0f}% of samples",
            )
        )
    delivery = audit["delivery_latency_ms"]
    if delivery["p99"] is not None:
        rows.append(
            Row(
                NAME,
                case,
                "event delivery p99",
                delivery["p99"],
                "ms",
                reps=audit["acknowledged"],
                note=f"occurred_at to recorded_at per event; p50 {delivery['p50']:.0f} ms, "
                f"max {delivery['max']:.0f} ms",
            )
        )
    for name, mem in memory.items():
        if "error" in mem:
            continue
        rows.append(
            Row(
                NAME,
                case,
                f"{name} RSS at end",
                mem["end_floor_mb"],
                "MB",
                note=f"floor: start {mem['start_floor_mb']:.0f} MB, growth "
                f"{mem['growth_pct']:+.1f}% (target < 10%); median {mem['start_median_mb']:.0f}"
                f" -> {mem['end_median_mb']:.0f} MB; CPU {cpu.get(name, 0.0):.2f} cores",
            )
        )
    rows.append(
        Row(
            NAME,
            case,
            "audit events",
            float(audit["audit_rows"]),
            "n",
            note=f"{audit['found_for_acknowledged']}/{audit['acknowledged']} acknowledged "
            f"requests have theirs once, {audit['missing']} missing, "
            f"{audit['duplicated']} duplicated; outbox left {audit['outbox_left']}; "
            f"audit verify exit {verify['exit_code']}",
        )
    )
    return rows
