"""lag: end-to-end time from an event's outbox commit to its row in the hash chain.

A producer (a child process, ``python -m bench.lag produce``) commits one event per
identity transaction (``enqueue_event``, as a request does) at a fixed rate, 1,000/s, for
60 s on MariaDB (3 s on SQLite, to fit the run's budget), and records the wall-clock
time right after each commit. In this process a relay runs as in production: ``run_relay``
with the settings' default policy and the checkpointer, on its own thread, while the main
thread only waits.

When the relay hands back a batch (``on_batch``, called after both its commits, so the
rows are visible to any reader) it records the time and the number of events delivered.
Batches are appended in chain order, so the event at ``seq`` s became visible at the first
callback whose running total reached s. An event's lag is that time minus its outbox
commit time. (Cross-check: ``recorded_at``, which the relay sets just before its INSERT,
minus the commit time; it misses the INSERT and both commits, so it reads a little low.)

Afterwards every produced event must be in the chain exactly once, in a chain that
verifies, and the outbox must be empty; otherwise the benchmark fails.
"""

from __future__ import annotations

import bisect
import itertools
import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from bench.common import (
    REPO_DIR,
    BenchError,
    Databases,
    Options,
    Row,
    VerifyChild,
    loadavg,
    log,
    percentile,
    settings_for,
    summarize,
    throwaway_databases,
    write_result,
)
from echo_auth.audit.events import Actor, AuditEvent, Source, Target
from echo_auth.audit.outbox import enqueue_event
from echo_auth.audit.relay import BatchResult, RelayStats, run_relay
from echo_auth.db.audit_schema import audit_events, chain_head
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import audit_outbox
from echo_auth.runtime import Runtime

NAME = "lag"
RATE = 1000  # events/s
DURATION_S = {"mariadb": 60.0, "sqlite": 3.0}
QUICK_DURATION_S = 3.0
PRODUCER_THREADS = 8
DRAIN_TIMEOUT_S = 60.0


# -- the producer (child process) ---------------------------------------------------------


@dataclass(frozen=True)
class ProducerArgs:
    backend: str
    identity_url: str
    audit_url: str
    workdir: str
    rate: float
    duration_s: float
    start_at: float  # time.time() of the first event
    out: str

    def databases(self) -> Databases:
        return Databases(
            self.backend, self.identity_url, self.audit_url, Path(self.workdir), "", ""
        )


def _event(i: int) -> AuditEvent:
    user = f"0190a1b2-c3d4-7e5f-8a9b-{i % 5000:012d}"
    return AuditEvent(
        action="auth.login.succeeded",
        outcome="success",
        actor=Actor("user", user, f"user{i % 5000}@example.com"),
        target=Target("user", user),
        source=Source(
            ip=f"10.0.{(i >> 8) & 255}.{i & 255}",
            user_agent="Mozilla/5.0 (X11; Linux x86_64) echo-bench/1.0",
            request_id=f"req-{i:010d}",
        ),
        metadata={"session_id": f"s-{i:08d}", "mfa": False},
    )


def produce(args: ProducerArgs) -> None:
    """Commit one event per transaction on a fixed schedule; write what was committed when.

    PRODUCER_THREADS threads share the schedule (event i is due at start + i / rate and
    belongs to thread i mod PRODUCER_THREADS), as concurrent requests would: one thread
    alone cannot commit 1,000 transactions a second when each commit waits for the disk.
    """
    runtime = Runtime(settings_for(args.databases()), pool_size=PRODUCER_THREADS)
    count = int(args.rate * args.duration_s)
    ids: list[str] = [""] * count
    committed: list[float] = [0.0] * count
    scheduled: list[float] = [0.0] * count
    crashed: list[BaseException] = []

    def work(first: int) -> None:
        try:
            with transaction(runtime.identity, write=False) as conn:  # connect before the clock
                conn.execute(select(1))
            for i in range(first, count, PRODUCER_THREADS):
                due = args.start_at + i / args.rate
                wait = due - time.time()
                if wait > 0:
                    time.sleep(wait)
                event = _event(i)  # made when due: occurred_at is now, as in a request
                with transaction(runtime.identity) as conn:
                    enqueue_event(conn, event)
                committed[i] = time.time()
                ids[i] = event.event_id
                scheduled[i] = due
        except BaseException as exc:  # reported below
            crashed.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(PRODUCER_THREADS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        runtime.close()
    if crashed:
        raise crashed[0]
    Path(args.out).write_text(
        json.dumps({"ids": ids, "committed": committed, "scheduled": scheduled})
    )


# -- one measured run ---------------------------------------------------------------------


def _count(runtime: Runtime, engine_name: str) -> int:
    if engine_name == "outbox":
        with transaction(runtime.identity, write=False) as conn:
            return int(conn.execute(select(func.count()).select_from(audit_outbox)).scalar_one())
    with transaction(runtime.audit, write=False) as conn:
        return int(conn.execute(select(chain_head.c.seq)).scalar_one())


def _run_once(dbs: Databases, runtime: Runtime, duration_s: float) -> dict[str, Any]:
    head_before = _count(runtime, "head")
    batches: list[tuple[float, int]] = []  # (time.time() after the batch, running total)
    total = [head_before]

    def on_batch(result: BatchResult) -> None:
        if result.delivered:
            total[0] += result.delivered
            batches.append((time.time(), total[0]))

    stop = threading.Event()
    stats = RelayStats()
    relay = threading.Thread(
        target=run_relay,
        args=(runtime.relay_identity, runtime.audit, runtime.relay_policy, stop),
        kwargs={"on_batch": on_batch, "stats": stats, "checkpointer": runtime.checkpointer},
        name="lag-relay",
        daemon=True,
    )
    out = dbs.workdir / f"producer-{time.monotonic_ns()}.json"
    args = ProducerArgs(
        dbs.backend,
        dbs.identity_url,
        dbs.audit_url,
        str(dbs.workdir),
        RATE,
        duration_s,
        time.time() + 1.5,  # the child's imports and connections take ~1 s
        str(out),
    )
    relay.start()
    try:
        child = subprocess.run(
            [sys.executable, "-m", "bench.lag", "produce", json.dumps(asdict(args))],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=duration_s + 120,
        )
        if child.returncode != 0:
            tail = "\n".join(child.stderr.strip().splitlines()[-5:])
            raise BenchError(f"the lag producer exited with {child.returncode}: {tail}")
        produced = json.loads(out.read_text())
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while _count(runtime, "outbox") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        relay.join(timeout=30)
    ids: list[str] = produced["ids"]
    committed: list[float] = produced["committed"]
    scheduled: list[float] = produced["scheduled"]
    left = _count(runtime, "outbox")
    with transaction(runtime.audit, write=False) as conn:
        rows = conn.execute(
            select(audit_events.c.event_id, audit_events.c.seq, audit_events.c.recorded_at).where(
                audit_events.c.seq > head_before
            )
        ).all()
    by_id = {r.event_id: (int(r.seq), r.recorded_at) for r in rows}
    head_after = _count(runtime, "head")
    missing = [i for i in ids if i not in by_id]
    if left or missing or total[0] != head_after:
        raise BenchError(
            f"lag {dbs.backend}: outbox left {left}, {len(missing)} events missing from the "
            f"chain, relay counted up to seq {total[0]} but the head is at {head_after}"
        )
    cum = [c for _, c in batches]
    lags: list[float] = []
    recorded_lags: list[float] = []
    for event_id, commit in zip(ids, committed, strict=True):
        seq, recorded_at = by_id[event_id]
        visible = batches[bisect.bisect_left(cum, seq)][0]
        lags.append(1000 * (visible - commit))
        recorded_lags.append(1000 * (recorded_at.timestamp() - commit))
    slips = [1000 * (c - s) for c, s in zip(committed, scheduled, strict=True)]
    span = max(committed) - scheduled[0]
    totals = [head_before] + [c for _, c in batches]
    sizes = [b - a for a, b in itertools.pairwise(totals)]
    return {
        "events": len(ids),
        "produced_per_s": len(ids) / span if span > 0 else float("nan"),
        "p50_ms": percentile(lags, 50),
        "p99_ms": percentile(lags, 99),
        "max_ms": max(lags),
        "recorded_at_p50_ms": percentile(recorded_lags, 50),
        "recorded_at_p99_ms": percentile(recorded_lags, 99),
        "commit_slip_p50_ms": percentile(slips, 50),
        "commit_slip_p99_ms": percentile(slips, 99),
        "relay_batches": len(batches),
        "batch_size_median": sorted(sizes)[len(sizes) // 2] if sizes else 0,
        "batch_size_max": max(sizes) if sizes else 0,
        "relay_errors": stats.errors,
        "loadavg": loadavg(),
    }


# -- the benchmark --------------------------------------------------------------------------


def run(opts: Options) -> list[Row]:
    durations = dict.fromkeys(DURATION_S, QUICK_DURATION_S) if opts.quick else dict(DURATION_S)
    backends = list(durations)
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    policy_doc: dict[str, Any] = {}
    with throwaway_databases("mariadb") as my, throwaway_databases("sqlite") as sq:
        dbs = {"mariadb": my, "sqlite": sq}
        runtimes: dict[str, Runtime] = {}
        try:
            for backend in backends:
                runtime = Runtime(settings_for(dbs[backend]), pool_size=4)
                runtimes[backend] = runtime
                runtime.upgrade_databases()
                policy_doc = asdict(runtime.relay_policy)
            # Interleaved: every backend once per repetition.
            for rep in range(opts.reps):
                for backend in backends:
                    result = _run_once(dbs[backend], runtimes[backend], durations[backend])
                    runs[backend].append(result)
                    log(
                        f"lag: rep {rep + 1}/{opts.reps} {backend}: "
                        f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                        f"max {result['max_ms']:.0f} ms; {result['produced_per_s']:,.0f} "
                        f"events/s produced, {result['relay_batches']} batches "
                        f"(median {result['batch_size_median']} events)"
                    )
            checks = {}
            children = {b: VerifyChild(dbs[b].audit_url, count=True) for b in backends}
            try:
                for backend in backends:
                    report = children[backend].result(timeout=600)
                    expected = sum(r["events"] for r in runs[backend])
                    if not report["intact"] or report["rows_counted"] != expected:
                        raise BenchError(f"lag {backend}: chain check failed: {report}")
                    checks[backend] = {k: report[k] for k in ("intact", "rows_counted", "head_seq")}
            finally:
                for child in children.values():
                    child.kill()
        finally:
            for runtime in runtimes.values():
                runtime.close()

    rows: list[Row] = []
    doc_cases = []
    for backend in backends:
        reps = runs[backend]
        p50 = summarize([r["p50_ms"] for r in reps])
        p99 = summarize([r["p99_ms"] for r in reps])
        rate = summarize([r["produced_per_s"] for r in reps])["median"]
        label = f"{backend} {RATE:,}/s x {durations[backend]:.0f} s"
        doc_cases.append(
            {
                "backend": backend,
                "rate": RATE,
                "duration_s": durations[backend],
                "p50_ms": p50,
                "p99_ms": p99,
                "max_ms": summarize([r["max_ms"] for r in reps]),
                "repetitions": reps,
                "check": checks[backend],
            }
        )
        batch = sorted(r["batch_size_median"] for r in reps)[len(reps) // 2]
        rows.append(
            Row(
                NAME,
                label,
                "commit-to-chain p50",
                p50["median"],
                "ms",
                p50["spread_pct"],
                len(reps),
                f"{rate:,.0f} events/s produced; relay batches of ~{batch} events",
            )
        )
        rows.append(
            Row(
                NAME,
                label,
                "commit-to-chain p99",
                p99["median"],
                "ms",
                p99["spread_pct"],
                len(reps),
                "target < 250 ms; max "
                + ", ".join(f"{r['max_ms']:.0f}" for r in reps)
                + " ms per rep",
            )
        )
    write_result(
        opts,
        NAME,
        {
            "parameters": {
                "rate": RATE,
                "durations_s": durations,
                "events_per_transaction": 1,
                "repetitions": opts.reps,
                "relay_policy": policy_doc,
                "started": datetime.now(UTC).isoformat(timespec="seconds"),
            },
            "cases": doc_cases,
        },
        rows,
    )
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "produce":
        produce(ProducerArgs(**json.loads(sys.argv[2])))
    else:
        sys.exit("usage: python -m bench.lag produce ARGS_JSON (run by python -m bench lag)")
