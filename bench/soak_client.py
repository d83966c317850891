"""The soak's load generator: ``python -m bench.soak_client CONFIG.json OUT.json``.

Runs in its own process (so its CPU time is not the benchmark harness's, and the harness
can sample the server meanwhile). Open loop: every kind of request has a fixed rate and
a fixed schedule (request ``k`` of a kind is due at ``(k + phase) / rate`` seconds after
the start); each is sent at its time whatever happened to the earlier ones, so a slow
server is measured, not politely waited for. Latency counts from the scheduled time,
which includes any wait for a free connection (no coordinated omission).

Requests go through a minimal HTTP/1.1 client on asyncio streams (keep-alive
connections, up to ``max_connections``), because a full client library costs more CPU
per request than the server's own work on ``/v1/me``, and both share the same two cores.

Every request carries its own ``X-Request-ID`` (``soak-<n>``); the requests that must
leave an audit event (login, logout, admin reads, audit searches) are listed in the
output with that id, so the harness can check each has its event exactly once.

The config (JSON): ``base_url``, ``password``, ``admin_email``, ``emails``,
``duration_s``, ``rates`` (requests/s by kind), ``timeout_s``, ``max_connections``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import random
import resource
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

# The answer each kind of request must get, and the audit action it must leave behind.
EXPECTED: dict[str, tuple[int, str | None]] = {
    "login": (200, "auth.login.succeeded"),
    "logout": (204, "auth.logout"),
    "me": (200, None),
    "admin_list": (200, "admin.user.listed"),
    "admin_view": (200, "admin.user.viewed"),
    "audit_search": (200, "audit.searched"),
}
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) echo-soak/1.0"
MAX_ERRORS_KEPT = 200
# uvicorn closes a keep-alive connection after 5 s idle; never reuse one that old.
MAX_IDLE_S = 3.0


class TransportError(Exception):
    """No HTTP answer: refused, reset, closed early, or timed out (the phase says where)."""


@dataclass
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter, float]


class Http:
    """HTTP/1.1 with keep-alive over a bounded pool of connections; no cookies, no redirects.

    Waiting for a free connection counts against the timeout, as it would for any client
    with a connection limit.
    """

    def __init__(self, base_url: str, max_connections: int, timeout_s: float) -> None:
        url = urlsplit(base_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.host_header = f"{self.host}:{self.port}"
        self.slots = asyncio.Semaphore(max_connections)
        self.idle: list[Conn] = []
        self.timeout_s = timeout_s
        self.opened = 0

    async def request(
        self, method: str, target: str, headers: dict[str, str], body: bytes | None = None
    ) -> Answer:
        phase = "waiting for a connection"
        try:
            async with asyncio.timeout(self.timeout_s), self.slots:
                phase = "connecting"
                conn = await self._connection()
                phase = "waiting for the answer"
                return await self._exchange(conn, method, target, headers, body)
        except TimeoutError:
            raise TransportError(f"timeout after {self.timeout_s:.0f} s {phase}") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            raise TransportError(f"{type(e).__name__} {phase}: {e}") from None

    async def _connection(self) -> Conn:
        now = time.monotonic()
        while self.idle:
            reader, writer, last = self.idle.pop()
            if now - last < MAX_IDLE_S and not writer.is_closing():
                return reader, writer, last
            writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self.opened += 1
        return reader, writer, now

    async def _exchange(
        self, conn: Conn, method: str, target: str, headers: dict[str, str], body: bytes | None
    ) -> Answer:
        reader, writer, _ = conn
        try:
            head = [f"{method} {target} HTTP/1.1", f"host: {self.host_header}"]
            head += [f"{k}: {v}" for k, v in headers.items()]
            if body is not None:
                head += ["content-type: application/json", f"content-length: {len(body)}"]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b""))
            raw = await reader.readuntil(b"\r\n\r\n")
            status_line, *lines = raw[:-4].decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            length, chunked, close = None, False, False
            for line in lines:
                name, _, value = line.partition(":")
                name, value = name.strip().lower(), value.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "transfer-encoding":
                    chunked = "chunked" in value
                elif name == "connection":
                    close = value == "close"
            if chunked:
                data = await self._chunked(reader)
            elif length is not None:
                data = await reader.readexactly(length)
            elif status in (204, 304) or status < 200:
                data = b""
            else:
                data, close = await reader.read(), True
        except BaseException:
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self.idle.append((reader, writer, time.monotonic()))
        return Answer(status, data)

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers from uvicorn
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


def _percentile(ordered: list[float], pct: float) -> float:
    if not ordered:
        return 0.0
    rank = max(1, min(len(ordered), int(-(-pct * len(ordered) // 100))))
    return ordered[rank - 1]


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: Counter[str] = field(default_factory=Counter)
    acknowledged: list[tuple[str, str]] = field(default_factory=list)  # (request id, action)
    per_second: dict[int, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    lateness: list[float] = field(default_factory=list)
    by_10s: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    skipped: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0


class Soak:
    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = config
        self.base = str(config["base_url"]).rstrip("/")
        self.password = str(config["password"])
        self.stats = Stats()
        self.ids = itertools.count(1)
        self.rng = random.Random(20261127)
        # Live session tokens for /v1/me, with the number of requests using each right now
        # (a logout only takes a token nobody is using, so no /v1/me meets a revoked one).
        self.tokens: list[str] = []
        self.busy: Counter[str] = Counter()
        self.keep = 0  # the pool never shrinks below the tokens of the first logins
        self.user_ids: list[str] = []
        self.admin_token = ""
        self.next_user = 0
        self.started = 0.0
        # No cookies: every request authenticates with its bearer token only, and a login
        # never presents an earlier login's device cookie.
        self.http = Http(
            self.base, int(config.get("max_connections", 100)), float(config.get("timeout_s", 30))
        )

    # -- one request ------------------------------------------------------------------------

    async def request(
        self,
        kind: str,
        method: str,
        path: str,
        *,
        due: float,
        token: str | None = None,
        json_body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        setup: bool = False,
    ) -> Answer | None:
        """Send, time from ``due``, classify; the response when it had the expected status."""
        st = self.stats
        rid = f"soak-{next(self.ids):07d}"
        headers = {"user-agent": USER_AGENT, "x-request-id": rid}
        if token:
            headers["authorization"] = f"Bearer {token}"
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        second = int(due - self.started) if self.started else -1
        expected, action = EXPECTED[kind]
        target = f"{path}?{urlencode(params)}" if params else path
        body = json.dumps(json_body).encode() if json_body is not None else None
        resp: Answer | None = None
        try:
            resp = await self.http.request(method, target, headers, body)
            status: int | None = resp.status
            detail = "" if status == expected else resp.text[:300]
        except TransportError as exc:
            status, detail = None, str(exc)[:300]
        finally:
            st.in_flight -= 1
        latency_ms = (time.monotonic() - due) * 1000.0
        label = kind if not setup else f"setup_{kind}"
        st.statuses[label][str(status) if status is not None else "transport_error"] += 1
        if not setup:
            st.latencies[kind].append(latency_ms)
            st.per_second[second]["done"] += 1
            st.by_10s[second // 10].append(latency_ms)
        if status != expected:
            st.error_count[label] += 1
            if not setup:
                st.per_second[second]["errors"] += 1
            if len(st.errors) < MAX_ERRORS_KEPT:
                st.errors.append(
                    {
                        "kind": label,
                        "request_id": rid,
                        "at_s": round(time.monotonic() - self.started, 3) if self.started else None,
                        "status": status,
                        "latency_ms": round(latency_ms, 1),
                        "detail": detail,
                    }
                )
            return None
        if action is not None:
            st.acknowledged.append((rid, action))
        return resp

    # -- the kinds of request ---------------------------------------------------------------

    async def login(self, due: float, email: str | None = None, *, setup: bool = False) -> None:
        emails = self.cfg["emails"]
        if email is None:
            email = emails[self.next_user % len(emails)]
            self.next_user += 1
        resp = await self.request(
            "login",
            "POST",
            "/v1/login",
            due=due,
            json_body={"email": email, "password": self.password},
            setup=setup,
        )
        if resp is None:
            return
        body = resp.json()
        if email == self.cfg["admin_email"]:
            self.admin_token = body["session_token"]
            return
        self.tokens.append(body["session_token"])
        if body["user"]["id"] not in self.user_ids:
            self.user_ids.append(body["user"]["id"])

    async def logout(self, due: float) -> None:
        # The oldest token beyond the first logins' that no request is using.
        victim = next(
            (t for t in self.tokens[self.keep :] if not self.busy[t]),
            None,
        )
        if victim is None:
            self.stats.skipped["logout"] += 1
            return
        self.tokens.remove(victim)
        await self.request("logout", "POST", "/v1/logout", due=due, token=victim)

    async def me(self, due: float) -> None:
        token = self.rng.choice(self.tokens)
        self.busy[token] += 1
        try:
            await self.request("me", "GET", "/v1/me", due=due, token=token)
        finally:
            self.busy[token] -= 1
            if not self.busy[token]:
                del self.busy[token]

    async def admin_list(self, due: float) -> None:
        params: dict[str, Any] = {"limit": 20}
        if self.rng.random() < 0.5:
            params["q"] = f"soak-user-{self.rng.randrange(len(self.cfg['emails']))}"
        await self.request(
            "admin_list", "GET", "/v1/admin/users", due=due, token=self.admin_token, params=params
        )

    async def admin_view(self, due: float) -> None:
        user_id = self.rng.choice(self.user_ids)
        await self.request(
            "admin_view", "GET", f"/v1/admin/users/{user_id}", due=due, token=self.admin_token
        )

    async def audit_search(self, due: float) -> None:
        since = (datetime.now(UTC) - timedelta(seconds=60)).strftime("%Y-%m-%dT%H:%M:%SZ")
        choices: list[dict[str, Any]] = [
            {},
            {"action": "auth.login.succeeded"},
            {"outcome": "success", "since": since},
            {"actor": self.rng.choice(self.cfg["emails"])},
            {"q": "soak-user-1"},
            {"action": "admin.user.viewed", "since": since},
        ]
        params = {**self.rng.choice(choices), "limit": 20}
        await self.request(
            "audit_search",
            "GET",
            "/v1/audit/events",
            due=due,
            token=self.admin_token,
            params=params,
        )

    # -- the run ----------------------------------------------------------------------------

    async def setup(self) -> None:
        """Log in the admin once and every user twice (two at a time): the first tokens.

        /v1/me uses them all; the pool never shrinks below as many tokens as users, so
        the logouts have tokens to end from the start, and the pool stays near twice the
        users as logins and logouts alternate.
        """
        gate = asyncio.Semaphore(2)

        async def one(email: str) -> None:
            async with gate:
                await self.login(time.monotonic(), email, setup=True)

        emails = list(self.cfg["emails"])
        await asyncio.gather(one(self.cfg["admin_email"]), *(one(e) for e in emails + emails))
        if not self.admin_token or len(self.tokens) != 2 * len(emails):
            raise SystemExit(f"setup logins failed: {self.stats.errors[:3]}")
        self.keep = len(emails)

    async def run(self) -> dict[str, Any]:
        await self.setup()
        rates: dict[str, float] = {k: float(v) for k, v in self.cfg["rates"].items() if v}
        handlers = {
            "login": self.login,
            "logout": self.logout,
            "me": self.me,
            "admin_list": self.admin_list,
            "admin_view": self.admin_view,
            "audit_search": self.audit_search,
        }
        duration = float(self.cfg["duration_s"])
        self.started = time.monotonic()
        started_wall = time.time()
        # Due times of each kind: (k + phase) / rate; the phases spread the kinds apart.
        phases = {kind: i / len(rates) for i, kind in enumerate(rates)}
        heap = [(phases[kind] / rate, kind, 0) for kind, rate in rates.items()]
        heapq.heapify(heap)
        tasks: set[asyncio.Task[None]] = set()
        sent: Counter[str] = Counter()
        while heap:
            offset, kind, k = heapq.heappop(heap)
            if offset >= duration:
                continue
            due = self.started + offset
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.stats.lateness.append(max(0.0, time.monotonic() - due) * 1000.0)
            task = asyncio.create_task(handlers[kind](due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent[kind] += 1
            self.stats.per_second[int(offset)]["scheduled"] += 1
            heapq.heappush(heap, ((k + 1 + phases[kind]) / rates[kind], kind, k + 1))
        schedule_end = time.monotonic()
        if tasks:
            await asyncio.wait(tasks, timeout=float(self.cfg.get("timeout_s", 30.0)) + 30)
        ended = time.monotonic()
        self.http.close()
        return self.report(rates, sent, started_wall, schedule_end - self.started, ended)

    def report(
        self,
        rates: dict[str, float],
        sent: Counter[str],
        started_wall: float,
        schedule_s: float,
        ended: float,
    ) -> dict[str, Any]:
        st = self.stats
        kinds: dict[str, Any] = {}
        for kind in rates:
            lat = sorted(st.latencies.get(kind, []))
            kinds[kind] = {
                "rate_per_s": rates[kind],
                "sent": sent[kind],
                "completed": len(lat),
                "skipped": st.skipped[kind],
                "statuses": dict(st.statuses.get(kind, {})),
                "errors": st.error_count[kind],
                "latency_ms": {
                    "p50": _percentile(lat, 50),
                    "p90": _percentile(lat, 90),
                    "p99": _percentile(lat, 99),
                    "max": lat[-1] if lat else 0.0,
                    "mean": sum(lat) / len(lat) if lat else 0.0,
                },
            }
        late = sorted(st.lateness)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        seconds = sorted(s for s in st.per_second if s >= 0)
        return {
            "load_started_epoch": started_wall,
            "schedule_s": schedule_s,
            "wall_s": ended - self.started,
            "kinds": kinds,
            "setup": {k: dict(v) for k, v in st.statuses.items() if k.startswith("setup_")},
            "requests": sum(sent.values()),
            "completed": sum(len(v) for v in st.latencies.values()),
            "errors": sum(v for k, v in st.error_count.items() if not k.startswith("setup_")),
            "setup_errors": sum(v for k, v in st.error_count.items() if k.startswith("setup_")),
            "error_samples": st.errors,
            "acknowledged": st.acknowledged,
            "max_in_flight": st.max_in_flight,
            "connections_opened": self.http.opened,
            "unfinished": sum(sent.values())
            - sum(len(v) for v in st.latencies.values())
            - sum(st.skipped.values()),
            "scheduler_lateness_ms": {
                "p50": _percentile(late, 50),
                "p99": _percentile(late, 99),
                "max": late[-1] if late else 0.0,
            },
            "per_second": [
                {"s": s, **{k: st.per_second[s][k] for k in ("scheduled", "done", "errors")}}
                for s in seconds
            ],
            "latency_by_10s_ms": [
                {
                    "from_s": b * 10,
                    "n": len(v),
                    "p50": _percentile(sorted(v), 50),
                    "p99": _percentile(sorted(v), 99),
                }
                for b, v in sorted(st.by_10s.items())
            ],
            "client_cpu_s": usage.ru_utime + usage.ru_stime,
            "client_maxrss_mb": usage.ru_maxrss / 1024.0,
        }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.soak_client CONFIG.json OUT.json", file=sys.stderr)
        return 2
    config = json.loads(Path(argv[0]).read_text())
    runner: Callable[[Coroutine[Any, Any, dict[str, Any]]], dict[str, Any]] = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        pass
    result = runner(Soak(config).run())
    Path(argv[1]).write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
