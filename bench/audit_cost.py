"""audit-cost: what writing the audit event adds to a login and a sign-up.

``Runtime.auth.login`` and ``Runtime.auth.signup`` are timed with the outbox write as in
production and with it switched off, on MariaDB and on SQLite. The switch is benchmark
code only: :class:`OutboxSwitch` replaces every reference to
``echo_auth.audit.outbox.enqueue_event(s)`` held by Echo's modules with a function that
writes nothing, and puts the originals back afterwards; production code has no flag.
That the switch works is checked: the outbox gains rows only in the samples with it on.

To keep the hash from drowning a sub-millisecond difference, argon2id runs with its
minimal parameters here (t=1, m=8 KiB, p=1: well under a millisecond), not Echo's
defaults. Samples are interleaved in ABBA order (on, off, off, on, ...) so that drift
in the machine's load hits both alike; they are split into repetitions of equal size, and
the cost is the difference of the medians (on minus off), per repetition and overall.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import func, select

from bench.common import (
    BACKENDS,
    BenchError,
    Options,
    Row,
    log,
    percentile,
    settings_for,
    summarize,
    throwaway_databases,
    write_result,
)
from echo_auth.audit import outbox
from echo_auth.audit.events import Source
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import audit_outbox
from echo_auth.runtime import Runtime

NAME = "audit-cost"
SAMPLES = 240  # per operation, per mode (with and without the outbox write)
QUICK_SAMPLES = 30
INSIDE_SAMPLES = 50  # per operation, timing enqueue_event(s) from the inside
ARGON2 = {"argon2_time_cost": 1, "argon2_memory_kib": 8, "argon2_parallelism": 1}
PASSWORD = "correct horse battery staple 7193"
SOURCE = Source(ip="203.0.113.7", user_agent="Mozilla/5.0 (X11; Linux x86_64) echo-bench/1.0")


def _no_event(*_args: Any, **_kwargs: Any) -> None:
    """Stands in for enqueue_event(s) while the outbox write is switched off."""


class OutboxSwitch:
    """Benchmark only: turns the outbox write off by replacing enqueue_event(s) in Echo.

    Every reference to the two functions held by a loaded ``echo_auth`` module (found once,
    after the code paths have been warmed up, so everything they import is loaded) is
    swapped for a no-op by :meth:`off` and put back by :meth:`on`.
    """

    def __init__(self) -> None:
        originals = (outbox.enqueue_event, outbox.enqueue_events)
        self.references: list[tuple[Any, str, Any]] = []
        for name, module in list(sys.modules.items()):
            if module is None or not (name == "echo_auth" or name.startswith("echo_auth.")):
                continue
            for attr, value in list(vars(module).items()):
                if any(value is f for f in originals):
                    self.references.append((module, attr, value))

    def timed(self, into: list[float]) -> None:
        """Keep the real functions, but add the time spent inside them to ``into``."""

        def wrap(real: Callable[..., None]) -> Callable[..., None]:
            def timed_call(*args: Any, **kwargs: Any) -> None:
                started = time.perf_counter()
                try:
                    real(*args, **kwargs)
                finally:
                    into.append((time.perf_counter() - started) * 1000.0)

            return timed_call

        for module, attr, value in self.references:
            setattr(module, attr, wrap(value))

    def off(self) -> None:
        for module, attr, _ in self.references:
            setattr(module, attr, _no_event)

    def on(self) -> None:
        for module, attr, value in self.references:
            setattr(module, attr, value)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        self.off()
        try:
            yield
        finally:
            self.on()


def _outbox_rows(runtime: Runtime) -> int:
    with transaction(runtime.identity, write=False) as conn:
        return int(conn.execute(select(func.count()).select_from(audit_outbox)).scalar_one())


def _ms(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000.0


def _one_backend(backend: str, samples: int, reps: int) -> dict[str, Any]:
    with throwaway_databases(backend) as dbs:
        settings = settings_for(dbs, **ARGON2)
        runtime = Runtime(settings, pool_size=4)
        try:
            runtime.upgrade_databases()
            auth = runtime.auth
            email = "bench-audit-cost@example.com"
            auth.signup(email, PASSWORD, SOURCE)
            counter = iter(range(10**9))

            def login() -> None:
                result = auth.login(email, PASSWORD, SOURCE)
                if not hasattr(result, "session"):
                    raise BenchError(f"login did not open a session: {result!r}")

            def signup() -> None:
                auth.signup(f"bench-{next(counter)}@example.com", PASSWORD, SOURCE)

            ops = {"login": login, "sign-up": signup}
            for fn in ops.values():  # warm up: every module these paths use is loaded
                fn()
            switch = OutboxSwitch()
            # Learn how many events each operation queues, and check the switch.
            per_op: dict[str, int] = {}
            for op, fn in ops.items():
                before = _outbox_rows(runtime)
                fn()
                per_op[op] = _outbox_rows(runtime) - before
                with switch.disabled():
                    before = _outbox_rows(runtime)
                    fn()
                    if _outbox_rows(runtime) != before:
                        raise BenchError(f"{op}: the outbox switch did not switch it off")
                if per_op[op] < 1:
                    raise BenchError(f"{op}: queued no audit event")
            start_rows = _outbox_rows(runtime)
            times: dict[tuple[str, bool], list[float]] = {
                (op, on): [] for op in ops for on in (True, False)
            }
            for i in range(samples):
                order = (True, False) if i % 2 == 0 else (False, True)  # ABBA
                for op, fn in ops.items():
                    for on in order:
                        if on:
                            times[(op, on)].append(_ms(fn))
                        else:
                            with switch.disabled():
                                times[(op, on)].append(_ms(fn))
            queued = _outbox_rows(runtime) - start_rows
            expected = samples * sum(per_op.values())
            if queued != expected:
                raise BenchError(f"{backend}: {queued} events queued, expected {expected}")
            # Apart from the comparison: the time spent inside enqueue_event(s) itself.
            inside: dict[str, list[float]] = {op: [] for op in ops}
            for op, fn in ops.items():
                switch.timed(inside[op])
                try:
                    for _ in range(INSIDE_SAMPLES):
                        fn()
                finally:
                    switch.on()
        finally:
            runtime.close()
    size = samples // reps
    result: dict[str, Any] = {
        "backend": backend,
        "events_per_operation": per_op,
        "references_switched": [f"{m.__name__}.{a}" for m, a, _ in switch.references],
        "ops": {},
    }
    for op in ops:
        on, off = times[(op, True)], times[(op, False)]
        rep_diffs = [
            percentile(on[r * size : (r + 1) * size], 50)
            - percentile(off[r * size : (r + 1) * size], 50)
            for r in range(reps)
        ]
        result["ops"][op] = {
            "with_outbox": {**summarize(on), "p95": percentile(on, 95)},
            "without_outbox": {**summarize(off), "p95": percentile(off, 95)},
            "p50_with_ms": percentile(on, 50),
            "p50_without_ms": percentile(off, 50),
            "p50_difference_ms": percentile(on, 50) - percentile(off, 50),
            "p50_difference_per_rep_ms": rep_diffs,
            # on and off samples taken next to each other (ABBA), differenced, then the median
            "median_paired_difference_ms": percentile(
                [a - b for a, b in zip(on, off, strict=True)], 50
            ),
            "inside_enqueue_p50_ms": percentile(inside[op], 50),
            "samples_with_ms": [round(t, 3) for t in on],
            "samples_without_ms": [round(t, 3) for t in off],
        }
    return result


def run(opts: Options) -> list[Row]:
    samples = QUICK_SAMPLES if opts.quick else SAMPLES
    samples -= samples % opts.reps  # equal repetitions
    results = []
    for backend in BACKENDS:
        log(f"audit-cost: {backend}, {samples} samples per operation and mode")
        res = _one_backend(backend, samples, opts.reps)
        results.append(res)
        for op, r in res["ops"].items():
            log(
                f"audit-cost: {backend} {op}: p50 {r['p50_with_ms']:.2f} ms with the outbox "
                f"write, {r['p50_without_ms']:.2f} ms without: "
                f"{r['p50_difference_ms']:+.2f} ms"
            )
    rows: list[Row] = []
    for res in results:
        for op, r in res["ops"].items():
            case = f"{res['backend']} {op}"
            rows.append(
                Row(
                    NAME,
                    case,
                    "p50 with - without outbox write",
                    r["p50_difference_ms"],
                    "ms",
                    None,
                    samples,
                    "target < 1 ms; per rep "
                    + ", ".join(f"{d:+.2f}" for d in r["p50_difference_per_rep_ms"])
                    + f" ms; median of paired differences {r['median_paired_difference_ms']:+.2f}"
                    + f" ms; inside enqueue_event p50 {r['inside_enqueue_p50_ms']:.2f} ms",
                )
            )
            rows.append(
                Row(
                    NAME,
                    case,
                    "p50 latency with outbox write",
                    r["p50_with_ms"],
                    "ms",
                    None,
                    samples,
                    f"without: {r['p50_without_ms']:.2f} ms; "
                    f"{res['events_per_operation'][op]} event(s) per {op}; "
                    "argon2id t=1, m=8 KiB, p=1 (minimal, not Echo's default)",
                )
            )
    write_result(
        opts,
        NAME,
        {
            "parameters": {
                "samples_per_operation_and_mode": samples,
                "repetitions": opts.reps,
                "order": "ABBA interleaved, login then sign-up each round",
                "argon2": ARGON2,
            },
            "backends": results,
        },
        rows,
    )
    return rows
