"""login: the latency of one login and one sign-up through the service, next to the hash.

With Echo's real default argon2id parameters (``Settings``: t=3, m=64 MiB, p=4) on
MariaDB and on SQLite: 30 sequential ``Runtime.auth.login`` calls of one user, every
second one followed by a bare ``Runtime.hasher.verify`` of the same stored hash
(interleaved, so both see the same machine noise); the difference of the medians is
what a login costs besides the hash. Then sign-ups (``Runtime.auth.signup``), each
followed by a bare ``hasher.hash``. One login and one verify warm up first, not counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

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
from echo_auth.audit.events import Source
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import users
from echo_auth.runtime import Runtime

NAME = "login"
VERIFY_EVERY = 2  # a bare verify after every second login: 15 samples next to 30 logins
PASSWORD = "correct horse battery staple 7193"
SOURCE = Source(ip="203.0.113.7", user_agent="Mozilla/5.0 (X11; Linux x86_64) echo-bench/1.0")


def _ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return (time.perf_counter() - started) * 1000.0, value


def _latency(samples: list[float]) -> dict[str, Any]:
    return {
        **summarize(samples),
        "p95": percentile(samples, 95),
        "mean": sum(samples) / len(samples),
        "samples_ms": [round(s, 3) for s in samples],
    }


def _one_backend(backend: str, logins: int, signups: int) -> dict[str, Any]:
    with throwaway_databases(backend) as dbs:
        settings = settings_for(dbs)  # Echo's defaults: the real argon2id parameters
        runtime = Runtime(settings, pool_size=4)
        try:
            runtime.upgrade_databases()
            auth, hasher = runtime.auth, runtime.hasher  # built (and warmed) before timing
            email = "bench-login@example.com"
            auth.signup(email, PASSWORD, SOURCE)
            with transaction(runtime.identity, write=False) as conn:
                stored = conn.execute(
                    select(users.c.password_hash).where(users.c.email == email)
                ).scalar_one()

            def login() -> Any:
                result = auth.login(email, PASSWORD, SOURCE)
                if not hasattr(result, "session"):
                    raise BenchError(f"login did not open a session: {result!r}")
                return result

            def verify() -> bool:
                ok = hasher.verify(stored, PASSWORD)
                if not ok:
                    raise BenchError("hasher.verify refused the right password")
                return ok

            warm_login, _ = _ms(login)
            warm_verify, _ = _ms(verify)
            login_ms: list[float] = []
            verify_ms: list[float] = []
            for i in range(logins):
                login_ms.append(_ms(login)[0])
                if i % VERIFY_EVERY == 0:
                    verify_ms.append(_ms(verify)[0])
            signup_ms: list[float] = []
            hash_ms: list[float] = []
            for i in range(signups):
                signup_ms.append(
                    _ms(lambda i=i: auth.signup(f"bench-{i}@example.com", PASSWORD, SOURCE))[0]
                )
                hash_ms.append(_ms(lambda: hasher.hash(PASSWORD))[0])
        finally:
            runtime.close()
    login_stats, verify_stats = _latency(login_ms), _latency(verify_ms)
    signup_stats, hash_stats = _latency(signup_ms), _latency(hash_ms)
    diffs = [a - b for a, b in zip(login_ms[::VERIFY_EVERY], verify_ms, strict=True)]
    return {
        "backend": backend,
        "argon2": {
            "time_cost": settings.argon2_time_cost,
            "memory_kib": settings.argon2_memory_kib,
            "parallelism": settings.argon2_parallelism,
            "hash_workers": settings.hash_workers,
        },
        "warmup_ms": {"login": warm_login, "verify": warm_verify},
        "login_ms": login_stats,
        "hasher_verify_ms": verify_stats,
        "login_minus_verify_ms": {
            "of_medians": login_stats["median"] - verify_stats["median"],
            "median_of_pairs": summarize(diffs)["median"],
        },
        "signup_ms": signup_stats,
        "hasher_hash_ms": hash_stats,
        "signup_minus_hash_ms": signup_stats["median"] - hash_stats["median"],
    }


def run(opts: Options) -> list[Row]:
    logins, signups = (6, 3) if opts.quick else (30, 8)
    results = []
    rows: list[Row] = []
    for backend in BACKENDS:
        log(f"login: {backend}: {logins} logins and {signups} sign-ups (argon2id defaults)")
        r = _one_backend(backend, logins, signups)
        results.append(r)
        lg, hv, su = r["login_ms"], r["hasher_verify_ms"], r["signup_ms"]
        extra = r["login_minus_verify_ms"]["of_medians"]
        log(
            f"login: {backend}: login median {lg['median']:.1f} ms (p95 {lg['p95']:.1f}), "
            f"verify {hv['median']:.1f} ms, besides the hash {extra:.1f} ms; "
            f"sign-up {su['median']:.1f} ms"
        )
        rows += [
            Row(
                NAME,
                backend,
                "login latency",
                lg["median"],
                "ms",
                lg["spread_pct"],
                logins,
                f"p95 {lg['p95']:.1f} ms",
            ),
            Row(
                NAME,
                backend,
                "bare hasher.verify",
                hv["median"],
                "ms",
                hv["spread_pct"],
                logins,
                f"p95 {hv['p95']:.1f} ms; n = {len(hv['samples_ms'])}",
            ),
            Row(
                NAME,
                backend,
                "login besides the hash",
                extra,
                "ms",
                None,
                logins,
                "median login - median verify; "
                f"hash = {100 * hv['median'] / lg['median']:.0f}% of a login",
            ),
            Row(
                NAME,
                backend,
                "sign-up latency",
                su["median"],
                "ms",
                su["spread_pct"],
                signups,
                f"p95 {su['p95']:.1f} ms; bare hasher.hash {r['hasher_hash_ms']['median']:.1f} ms",
            ),
        ]
    write_result(
        opts,
        NAME,
        {
            "parameters": {"logins": logins, "signups": signups, "warmup": 1},
            "backends": results,
        },
        rows,
    )
    return rows
