"""Run the benchmarks: ``python -m bench [NAME...]``; see bench/README.md.

Each benchmark writes ``bench/results/<name>.json``; the run prints a Markdown table of
everything it measured and writes it to ``bench/results/summary.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pymysql

from bench import audit_cost, http, lag, login, relay, soak, verify
from bench.common import (
    MIN_REPEATS,
    MYSQL_URL,
    RESULTS_DIR,
    MySQLServer,
    Options,
    Row,
    loadavg,
    log,
    machine_info,
    machine_line,
)

BENCHMARKS: dict[str, Callable[[Options], list[Row]]] = {
    "login": login.run,
    "relay": relay.run,
    "verify": verify.run,
    # Outside the 570 s budget: fixed sizes, about 4.5 minutes together (bench/README.md).
    "lag": lag.run,
    "audit-cost": audit_cost.run,
    # Outside the 570 s budget too: fixed sizes, about 7 minutes (bench/http.py).
    "http": http.run,
    # Last, and outside the 570 s budget: a fixed 10 minutes (--soak-seconds).
    "soak": soak.run,
}
# The whole default run must end within 10 minutes; verify (last) sizes itself to fit.
TOTAL_BUDGET_S = 570.0


def _fmt(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:,.1f} ms"
    if unit == "MB":
        return f"{value:,.0f} MB"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "n":
        return f"{value:,.0f}"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:,.3g} {unit}"


def render(
    rows: list[Row], *, total_s: float, command: str, failed: list[str], loads: list[str]
) -> str:
    lines = [
        "# Echo benchmark results",
        "",
        f"Machine: {machine_line()}  ",
        f"Command: `{command}`; total wall time {total_s:.0f} s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
        + "  ",
        f"1-minute load average when each benchmark started (2 cores): {', '.join(loads)}",
        "",
        "| benchmark | case | metric | median | spread | reps | note |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        spread = "" if r.spread_pct is None else f"{r.spread_pct:.0f}%"
        reps = "" if r.reps is None else str(r.reps)
        value = "FAILED" if r.metric == "FAILED" else _fmt(r.median, r.unit)
        lines.append(
            f"| {r.benchmark} | {r.case} | {r.metric} | {value} | {spread} | {reps} | {r.note} |"
        )
    lines += [
        "",
        "spread = (max - min) / median over the repetitions; latencies: over the samples.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, to check the harness works (results go to bench/results/quick/)",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=None, help="where to write (default bench/results)"
    )
    parser.add_argument("--reps", type=int, default=MIN_REPEATS, help="repetitions (>= 3)")
    parser.add_argument(
        "--verify-n", type=int, default=None, help="verify: build exactly N events (no budget)"
    )
    parser.add_argument(
        "--verify-budget",
        type=float,
        default=180.0,
        help="verify: seconds for building and measuring (default 180)",
    )
    parser.add_argument(
        "--soak-seconds",
        type=float,
        default=None,
        help="soak: seconds of load (default 600; 20 with --quick)",
    )
    parser.add_argument(
        "--no-deadline",
        action="store_true",
        help=f"do not shrink verify to keep the run under {TOTAL_BUDGET_S:.0f} s",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    if args.reps < MIN_REPEATS:
        parser.error(f"--reps must be at least {MIN_REPEATS}: medians need repetitions")
    names = [n for n in BENCHMARKS if not args.names or n in args.names]

    started = time.perf_counter()
    opts = Options(
        reps=args.reps,
        quick=args.quick,
        results_dir=args.results_dir or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR),
        deadline=None if args.no_deadline else started + TOTAL_BUDGET_S,
        verify_n=args.verify_n,
        verify_budget_s=args.verify_budget,
        soak_seconds=args.soak_seconds,
    )
    try:
        MySQLServer.from_url().connect().close()
    except pymysql.MySQLError as exc:
        print(f"bench: no MariaDB/MySQL answers at {MYSQL_URL}: {exc}", file=sys.stderr)
        print("bench: start it (make bench does) or set ECHO_BENCH_MYSQL_URL", file=sys.stderr)
        return 2
    machine_info()
    log(f"machine: {machine_line()}")

    rows: list[Row] = []
    failed: list[str] = []
    loads: list[str] = []
    for name in names:
        load = loadavg()
        loads.append(f"{name} {load[0] if load else '?'}")
        log(f"== {name} (load average {load})")
        t0 = time.perf_counter()
        try:
            rows += BENCHMARKS[name](opts)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            rows.append(Row(name, "-", "FAILED", 0.0, "", note="see the log above"))
        took = time.perf_counter() - t0
        log(f"== {name} took {took:.0f} s")
        loads[-1] += f" ({took:.0f} s)"
    total = time.perf_counter() - started
    command = "python -m bench" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    table = render(rows, total_s=total, command=command, failed=failed, loads=loads)
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    (opts.results_dir / "summary.md").write_text(table)
    print()
    print(table)
    log(f"total wall time {total:.0f} s ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
