"""verify: ``verify_chain`` over a long chain on SQLite and MariaDB: events/s, peak memory.

The chain is built fast and untimed: canonical events from
``AuditEvent(...).canonical()``, appended with ``append_to_chain`` in audit transactions
of 5,000 rows; each chunk is generated once and appended to both databases.

The target is 1,000,000 events. Building and verifying that many does not fit the
10-minute budget of ``python -m bench`` on a 2-core machine, so the benchmark first
builds a calibration chain, measures how fast building and verifying go, and grows the
chain to the largest N (a multiple of 25,000) that fits its budget; the JSON and the
table report the N used. ``--verify-n N`` builds exactly N instead.

Each verify runs in a fresh child process (``python -m bench.verify_child URL``), which
reports the verify's own time and its peak RSS (``ru_maxrss``) after and before verifying.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine

from bench.common import (
    BenchError,
    Options,
    Row,
    VerifyChild,
    log,
    make_events,
    settings_for,
    summarize,
    throwaway_databases,
    write_result,
)
from echo_auth.audit.chain import QueuedEvent, append_to_chain
from echo_auth.db.engines import transaction
from echo_auth.runtime import Runtime

NAME = "verify"
TARGET_N = 1_000_000
CHUNK = 5_000
CALIBRATION_N = 25_000
ROUND_TO = 25_000
MIN_PLANNING_S = 90.0  # below this, skip calibrating and use CALIBRATION_N
SAFETY = 0.85  # plan for a machine 15% slower than the calibration saw
BACKEND_ORDER = ("sqlite", "mariadb")
TARGET_RATE = 50_000
TARGET_MB = 200


class ChainBuilder:
    def __init__(self, engines: dict[str, Engine]) -> None:
        self.engines = engines
        self.n = 0
        self.generate_s = 0.0
        self.append_s = dict.fromkeys(engines, 0.0)

    def grow_to(self, n: int) -> None:
        last_log = time.perf_counter()
        while self.n < n:
            size = min(CHUNK, n - self.n)
            t0 = time.perf_counter()
            queued = [
                QueuedEvent(e.event_id, e.canonical()) for e in make_events(size, offset=self.n)
            ]
            self.generate_s += time.perf_counter() - t0
            for backend, engine in self.engines.items():
                t0 = time.perf_counter()
                with transaction(engine) as conn:
                    append_to_chain(conn, queued)
                self.append_s[backend] += time.perf_counter() - t0
            self.n += size
            if time.perf_counter() - last_log > 20:
                last_log = time.perf_counter()
                log(f"verify: built {self.n:,} of {n:,} events")

    @property
    def seconds(self) -> float:
        return self.generate_s + sum(self.append_s.values())


def _measure(url: str, n: int) -> dict[str, Any]:
    report = VerifyChild(url).result(timeout=3600)
    if not report["intact"] or report["events_checked"] != n or report["head_seq"] != n:
        raise BenchError(f"verify of a freshly built chain of {n} failed: {report['summary']}")
    return report


def _plan(opts: Options, builder: ChainBuilder, calib: dict[str, dict[str, Any]], t0: float) -> int:
    """The largest N that fits the budget, from what the calibration measured."""
    budget = opts.verify_budget_s - (time.perf_counter() - t0)
    budget = min(budget, opts.remaining() - 10.0)
    build_per_event = builder.seconds / builder.n
    verify_per_event = sum(r["seconds"] / r["events_checked"] for r in calib.values())
    overhead = sum(r["process_wall_s"] - r["seconds"] for r in calib.values())
    # Remaining work for a chain of N: build N - n more, verify N reps times per backend.
    fixed = opts.reps * overhead - builder.n * build_per_event
    per_event = build_per_event + opts.reps * verify_per_event
    fits = int((SAFETY * budget - fixed) / per_event)
    n = min(TARGET_N, fits // ROUND_TO * ROUND_TO)
    return max(n, builder.n)


def run(opts: Options) -> list[Row]:
    started = time.perf_counter()
    target = opts.verify_n or (20_000 if opts.quick else TARGET_N)
    with (
        throwaway_databases("sqlite") as sqlite_dbs,
        throwaway_databases("mariadb") as mariadb_dbs,
    ):
        dbs = {"sqlite": sqlite_dbs, "mariadb": mariadb_dbs}
        runtimes = {b: Runtime(settings_for(d), pool_size=1) for b, d in dbs.items()}
        try:
            for rt in runtimes.values():
                rt.upgrade_databases()
            builder = ChainBuilder({b: rt.audit for b, rt in runtimes.items()})
            calibration: dict[str, dict[str, Any]] = {}
            left = min(opts.verify_budget_s, opts.remaining() - 10.0)
            if opts.verify_n is None and not opts.quick and left < MIN_PLANNING_S:
                n = CALIBRATION_N
                log(
                    f"verify: only {max(left, 0):.0f} s left of the budget; "
                    f"N = {n:,} without calibrating"
                )
            elif opts.verify_n is None and not opts.quick:
                builder.grow_to(CALIBRATION_N)
                for backend in BACKEND_ORDER:
                    calibration[backend] = _measure(dbs[backend].audit_url, builder.n)
                n = _plan(opts, builder, calibration, started)
                rates = ", ".join(f"{b} {r['events_per_s']:,.0f}/s" for b, r in calibration.items())
                log(
                    f"verify: calibration on {builder.n:,} events: building "
                    f"{builder.n / builder.seconds:,.0f}/s, verifying {rates}; "
                    f"N = {n:,} fits the budget (target {TARGET_N:,})"
                )
            else:
                n = target
            log(f"verify: building a chain of {n:,} events on SQLite and MariaDB (not timed)")
            builder.grow_to(n)
            build = {
                "n": builder.n,
                "generate_s": round(builder.generate_s, 2),
                "append_s": {b: round(s, 2) for b, s in builder.append_s.items()},
            }
            log(
                f"verify: built in {builder.seconds:.0f} s (generate {build['generate_s']} s, "
                f"append {build['append_s']})"
            )
        finally:
            for rt in runtimes.values():
                rt.close()
        reports: dict[str, list[dict[str, Any]]] = {b: [] for b in BACKEND_ORDER}
        for rep in range(opts.reps):
            for backend in BACKEND_ORDER:
                r = _measure(dbs[backend].audit_url, n)
                reports[backend].append(r)
                log(
                    f"verify: rep {rep + 1}/{opts.reps} {backend} N={n:,}: "
                    f"{r['events_per_s']:,.0f} events/s ({r['seconds']:.1f} s), "
                    f"peak RSS {r['maxrss_kb'] / 1024:.0f} MB"
                )

    rows: list[Row] = []
    doc_backends = []
    for backend in BACKEND_ORDER:
        reps = reports[backend]
        rate = summarize([r["events_per_s"] for r in reps])
        peak = summarize([r["maxrss_kb"] / 1024 for r in reps])
        base = summarize([r["maxrss_baseline_kb"] / 1024 for r in reps])
        doc_backends.append(
            {
                "backend": backend,
                "n": n,
                "events_per_s": rate,
                "seconds": summarize([r["seconds"] for r in reps]),
                "peak_rss_mb": peak,
                "baseline_rss_mb": base,
                "repetitions": reps,
                "calibration": calibration.get(backend),
            }
        )
        if n >= TARGET_N:
            short = ""
        elif opts.quick:
            short = " (--quick)"
        elif opts.verify_n is not None:
            short = " (N from --verify-n)"
        else:
            short = f" (not {TARGET_N:,}: time budget)"
        rows += [
            Row(
                NAME,
                f"{backend} N={n:,}",
                "events/s",
                rate["median"],
                "/s",
                rate["spread_pct"],
                len(reps),
                f"target ≥ {TARGET_RATE:,}/s{short}",
            ),
            Row(
                NAME,
                f"{backend} N={n:,}",
                "peak RSS",
                peak["median"],
                "MB",
                peak["spread_pct"],
                len(reps),
                f"target < {TARGET_MB} MB; {base['median']:.0f} MB before verifying",
            ),
        ]
    write_result(
        opts,
        NAME,
        {
            "parameters": {
                "target_n": TARGET_N,
                "n": n,
                "reduced_for_budget": n < TARGET_N,
                "budget_s": opts.verify_budget_s,
                "chunk": CHUNK,
                "repetitions": opts.reps,
                "verify_batch": "verify_chain default",
            },
            "build": build,
            "backends": doc_backends,
        },
        rows,
    )
    return rows
