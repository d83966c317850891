"""relay: events/s moved from the outbox into the hash chain, against a raw batched INSERT.

For each case a fresh pair of databases is migrated, N events are queued with
``enqueue_events`` (identity transactions of 1,000; not timed), and then only the relay is
timed: ``drain`` for one relay, or two threads, each with its own ``Runtime`` and engines,
calling ``deliver_batch`` until both see an empty outbox. Afterwards the outbox must be
empty and ``verify_chain`` (run by ``bench.verify_child`` in another process) must find
the chain intact with exactly N events, so a fast but wrong relay cannot pass.

That check runs in the background while the next case queues its events (neither is
timed; the check is always over before the next timed section starts), which keeps the
whole benchmark inside its time budget.

The raw limit: one client sends 500-row multi-row INSERTs (one statement and one commit
per 500 rows, as the relay commits once per batch) of precomputed audit rows, the same N
rows with the same columns, into a scratch table with audit_events' exact schema. Each raw
insert runs right before the relay runs of its size in the same repetition, so that the
ratio compares figures taken under the same load on this shared machine.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import DBAPIError

from bench.common import (
    BACKENDS,
    BenchError,
    Databases,
    MySQLServer,
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
from echo_auth.audit import relay as relay_module
from echo_auth.audit.chain import link_hash, project
from echo_auth.audit.events import GENESIS_HASH, AuditEvent
from echo_auth.audit.outbox import enqueue_events
from echo_auth.audit.relay import AuditUnavailable, deliver_batch, drain
from echo_auth.db.audit_schema import audit_events
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import audit_outbox
from echo_auth.runtime import Runtime


class _NeverRaised(Exception):
    pass


NAME = "relay"
# Newer relays report deadlocks as LockConflict (retried at once); older ones let the
# driver's error through (a DBAPIError, backed off like any database trouble).
LOCK_CONFLICT: type[Exception] = getattr(relay_module, "LockConflict", _NeverRaised)
ENQUEUE_BATCH = 1000
RAW_BATCH = 500
COLUMNS = tuple(c.name for c in audit_events.columns)


@dataclass(frozen=True)
class Case:
    backend: str
    n: int
    relays: int

    @property
    def label(self) -> str:
        return f"{self.backend} N={self.n:,} {self.relays} relay{'s' if self.relays > 1 else ''}"


# -- the relay runs ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PreparedEvent:
    """An AuditEvent's queue-facing fields, with its canonical JSON computed once.

    ``enqueue_events`` reads only ``event_id``, ``occurred_at`` and ``canonical()``; the
    rows it writes are byte-identical to those of the original ``AuditEvent``. Caching the
    JSON keeps the untimed queueing of 6 x 100,000 events from eating the time budget.
    """

    event_id: str
    occurred_at: datetime
    payload: str

    @classmethod
    def of(cls, event: AuditEvent) -> PreparedEvent:
        return cls(event.event_id, event.occurred_at, event.canonical())

    def canonical(self) -> str:
        return self.payload


def _warm(*engines: Engine) -> None:
    for engine in engines:
        with transaction(engine, write=False) as conn:
            conn.execute(text("SELECT 1"))


def _enqueue(runtime: Runtime, events: Sequence[PreparedEvent]) -> None:
    for i in range(0, len(events), ENQUEUE_BATCH):
        with transaction(runtime.identity) as conn:
            enqueue_events(conn, events[i : i + ENQUEUE_BATCH])  # type: ignore[arg-type]


def _outbox_left(runtime: Runtime) -> int:
    with transaction(runtime.identity, write=False) as conn:
        return int(conn.execute(select(func.count()).select_from(audit_outbox)).scalar_one())


def _one_relay(runtime: Runtime) -> tuple[float, int]:
    _warm(runtime.relay_identity, runtime.audit)
    started = time.perf_counter()
    delivered = drain(runtime.relay_identity, runtime.audit, runtime.relay_policy)
    return time.perf_counter() - started, delivered


def _many_relays(dbs: Databases, count: int) -> tuple[float, int, list[dict[str, Any]]]:
    """``count`` threads, each with its own Runtime, calling deliver_batch until empty.

    A batch that fails is handled the way ``run_relay`` handles it, and counted: a lock
    conflict (MariaDB picked the relay as a deadlock victim) is retried at once; other
    database errors back off (``idle_sleep_s * 2**n``, n consecutive failures) first.
    """
    runtimes = [Runtime(settings_for(dbs), pool_size=2) for _ in range(count)]
    try:
        for rt in runtimes:
            _warm(rt.relay_identity, rt.audit)
        stats = [
            {
                "delivered": 0,
                "already_present": 0,
                "batches": 0,
                "errors": 0,
                "lock_conflicts": 0,
                "backoff_s": 0.0,
                "last_error": None,
            }
            for _ in range(count)
        ]
        crashed: list[BaseException] = []
        gate = threading.Barrier(count + 1)

        def work(i: int) -> None:
            rt, mine = runtimes[i], stats[i]
            policy = rt.relay_policy
            failing = 0
            try:
                gate.wait()
                while True:
                    try:
                        result = deliver_batch(rt.relay_identity, rt.audit, policy)
                    except LOCK_CONFLICT as exc:  # run_relay retries these at once
                        mine["lock_conflicts"] += 1
                        mine["last_error"] = str(exc)[:200]
                        continue
                    except (AuditUnavailable, DBAPIError) as exc:
                        failing += 1
                        wait = min(policy.backoff_max_s, policy.idle_sleep_s * 2 ** min(failing, 8))
                        mine["errors"] += 1
                        mine["backoff_s"] += wait
                        mine["last_error"] = str(getattr(exc, "orig", None) or exc)[:200]
                        time.sleep(wait)
                        continue
                    failing = 0
                    mine["delivered"] += result.delivered
                    mine["already_present"] += result.already_present
                    mine["batches"] += 1
                    if result.claimed == 0:
                        return
            except BaseException as exc:  # reported by the main thread
                crashed.append(exc)

        threads = [
            threading.Thread(target=work, args=(i,), name=f"relay-{i}") for i in range(count)
        ]
        for t in threads:
            t.start()
        gate.wait()
        started = time.perf_counter()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        if crashed:
            raise BenchError(f"a relay thread failed: {crashed[0]!r}") from crashed[0]
        return seconds, sum(int(m["delivered"]) for m in stats), stats
    finally:
        for rt in runtimes:
            rt.close()


class PendingCheck:
    """The correctness check of a finished run, running while the next run queues."""

    def __init__(
        self,
        stack: ExitStack,
        case: Case,
        child: VerifyChild,
        outbox_left: int,
        delivered: int,
        redelivered: int,
    ) -> None:
        self.stack, self.case, self.child = stack, case, child
        self.outbox_left, self.delivered, self.redelivered = outbox_left, delivered, redelivered

    def finish(self) -> dict[str, Any]:
        """Wait for the check, drop the run's databases, raise if the relay was wrong."""
        try:
            report = self.child.result(timeout=600)
        finally:
            self.child.kill()
            self.stack.close()
        n = self.case.n
        check = {
            "outbox_left": self.outbox_left,
            "delivered": self.delivered,
            "redelivered_already_present": self.redelivered,
            "intact": report["intact"],
            "events_checked": report["events_checked"],
            "rows_counted": report["rows_counted"],
            "head_seq": report["head_seq"],
            "verify_s": round(report["seconds"], 3),
        }
        ok = (
            report["intact"]
            and report["events_checked"] == n
            and report["rows_counted"] == n
            and report["head_seq"] == n
            and self.outbox_left == 0
            # A batch whose outbox delete failed after its audit commit is claimed again
            # and skipped as already present: appended once, delivered at least once.
            and self.delivered + self.redelivered == n
        )
        if not ok:
            raise BenchError(f"relay {self.case.label} left a wrong result: {check}")
        return check

    def abort(self) -> None:
        self.child.kill()
        self.stack.close()


def _relay_once(
    case: Case, events: Sequence[PreparedEvent], previous: PendingCheck | None
) -> tuple[dict[str, Any], PendingCheck, dict[str, Any] | None]:
    """One timed run; returns its numbers, its pending check, and the previous check."""
    stack = ExitStack()
    try:
        dbs = stack.enter_context(throwaway_databases(case.backend))
        runtime = Runtime(settings_for(dbs), pool_size=2)
        stack.callback(runtime.close)
        runtime.upgrade_databases()
        t0 = time.perf_counter()
        _enqueue(runtime, events)
        enqueue_s = time.perf_counter() - t0
        previous_check = None
        if previous is not None:
            pending, previous = previous, None
            previous_check = pending.finish()
        if case.relays == 1:
            seconds, delivered = _one_relay(runtime)
            per_relay: list[dict[str, Any]] = [{"delivered": delivered, "errors": 0}]
        else:
            seconds, delivered, per_relay = _many_relays(dbs, case.relays)
        left = _outbox_left(runtime)
        child = VerifyChild(dbs.audit_url, count=True)
    except BaseException:
        if previous is not None:
            previous.abort()
        stack.close()
        raise
    run = {
        "relay_batch_size": runtime.relay_policy.batch_size,
        "seconds": seconds,
        "events_per_s": case.n / seconds,
        "relays": per_relay,
        "errors": sum(int(r["errors"]) + int(r.get("lock_conflicts", 0)) for r in per_relay),
        "enqueue_s": round(enqueue_s, 3),
    }
    redelivered = sum(int(r.get("already_present", 0)) for r in per_relay)
    pending = PendingCheck(stack, case, child, left, delivered, redelivered)
    return run, pending, previous_check


# -- the raw limit ----------------------------------------------------------------------------


def _raw_rows(events: Sequence[PreparedEvent]) -> list[tuple[Any, ...]]:
    """The rows the relay would write for these events, computed in advance."""
    recorded = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    rows: list[tuple[Any, ...]] = []
    prev = GENESIS_HASH
    for seq, event in enumerate(events, start=1):
        payload = event.payload
        values = project(payload)
        digest = link_hash(prev, payload)
        values.update(
            seq=seq,
            occurred_at=values["occurred_at"].strftime("%Y-%m-%d %H:%M:%S.%f"),
            recorded_at=recorded,
            event_json=payload,
            prev_hash=prev,
            hash=digest,
        )
        rows.append(tuple(values[c] for c in COLUMNS))
        prev = digest
    return rows


def _chunks(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    out = []
    for i in range(0, len(rows), RAW_BATCH):
        flat: list[Any] = []
        for row in rows[i : i + RAW_BATCH]:
            flat.extend(row)
        out.append(flat)
    return out


def _insert_sql(marker: str, rows: int) -> str:
    one = "(" + ",".join([marker] * len(COLUMNS)) + ")"
    return f"INSERT INTO raw_events ({','.join(COLUMNS)}) VALUES " + ",".join([one] * rows)


class RawTarget:
    """One migrated throwaway database per backend; a fresh scratch table per repetition.

    MariaDB: ``DROP TABLE`` + ``CREATE TABLE raw_events LIKE audit_events`` (a new
    tablespace each time). SQLite: a new file holding ``audit_events``' DDL, renamed.
    """

    def __init__(self, dbs: Databases) -> None:
        self.dbs = dbs
        self.runs = 0
        runtime = Runtime(settings_for(dbs), pool_size=1)
        try:
            runtime.upgrade_databases()  # the real audit_events, to copy the schema from
        finally:
            runtime.close()
        self.sqlite_ddl: list[str] = []
        if dbs.backend == "sqlite":
            conn = sqlite3.connect(dbs.audit_db)
            try:
                self.sqlite_ddl = [
                    sql.replace("audit_events", "raw_events")
                    for (sql,) in conn.execute(
                        "SELECT sql FROM sqlite_master WHERE tbl_name = 'audit_events' "
                        "AND type IN ('table', 'index') AND sql IS NOT NULL ORDER BY type DESC"
                    )
                ]
            finally:
                conn.close()

    def insert(self, chunks: list[list[Any]], n: int) -> dict[str, Any]:
        self.runs += 1
        width = len(COLUMNS)
        if self.dbs.backend == "mariadb":
            with MySQLServer.from_url().connect(self.dbs.audit_db) as conn, conn.cursor() as cur:
                cur.execute("DROP TABLE IF EXISTS raw_events")
                cur.execute("CREATE TABLE raw_events LIKE audit_events")
                sql = {len(c) // width: _insert_sql("%s", len(c) // width) for c in chunks}
                escape_s = 0.0
                started = time.perf_counter()
                for flat in chunks:
                    # What cursor.execute(sql, args) does, with the escaping timed apart.
                    t0 = time.perf_counter()
                    statement = cur.mogrify(sql[len(flat) // width], flat)
                    escape_s += time.perf_counter() - t0
                    cur.execute(statement)  # autocommit: one commit per statement
                seconds = time.perf_counter() - started
                cur.execute("SELECT COUNT(*) FROM raw_events")
                count = cur.fetchone()[0]  # type: ignore[index]
                cur.execute("DROP TABLE raw_events")
        else:
            escape_s = 0.0  # sqlite3 binds parameters in C
            path = self.dbs.workdir / f"raw-{self.runs}.db"
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                # The same pragmas as Echo's engines (echo_auth.db.engines).
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA busy_timeout=10000")
                conn.execute("PRAGMA synchronous=FULL")
                for statement in self.sqlite_ddl:
                    conn.execute(statement)
                sql = {len(c) // width: _insert_sql("?", len(c) // width) for c in chunks}
                started = time.perf_counter()
                for flat in chunks:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute(sql[len(flat) // width], flat)
                    conn.execute("COMMIT")
                seconds = time.perf_counter() - started
                count = conn.execute("SELECT COUNT(*) FROM raw_events").fetchone()[0]
            finally:
                conn.close()
            for leftover in path.parent.glob(path.name + "*"):
                leftover.unlink()
        if count != n:
            raise BenchError(f"raw insert on {self.dbs.backend} stored {count} rows, expected {n}")
        return {
            "seconds": seconds,
            "events_per_s": n / seconds,
            "driver_escaping_s": escape_s,
            "escaping_share": escape_s / seconds,
        }


# -- the benchmark ----------------------------------------------------------------------------


def run(opts: Options) -> list[Row]:
    small, large = (2_000, 6_000) if opts.quick else (10_000, 100_000)
    cases = [
        Case("mariadb", small, 1),
        Case("sqlite", small, 1),
        Case("mariadb", large, 1),
        Case("mariadb", large, 2),
    ]
    raws = [("mariadb", small), ("sqlite", small), ("mariadb", large)]
    log(f"relay: generating {large:,} events and the raw rows (not timed)")
    events = [PreparedEvent.of(e) for e in make_events(large)]
    # The first N rows of the chain of `large` events are the chain of the first N events.
    all_chunks = _chunks(_raw_rows(events))
    chunks = {n: all_chunks[: -(-n // RAW_BATCH)] for n in (small, large)}
    runs: dict[Case, list[dict[str, Any]]] = {c: [] for c in cases}
    raw_runs: dict[tuple[str, int], list[dict[str, Any]]] = {r: [] for r in raws}
    state: dict[str, Any] = {"pending": None, "owner": None}
    stack = ExitStack()

    def settle() -> None:
        pending: PendingCheck | None = state["pending"]
        if pending is not None:
            state["pending"] = None
            check = pending.finish()
            runs[state["owner"][0]][state["owner"][1]]["check"] = check

    def relay_case(case: Case, rep: int) -> None:
        pending, state["pending"] = state["pending"], None
        result, new_pending, check = _relay_once(case, events[: case.n], pending)
        if check is not None:
            runs[state["owner"][0]][state["owner"][1]]["check"] = check
        runs[case].append(result)
        state["pending"], state["owner"] = new_pending, (case, len(runs[case]) - 1)
        log(
            f"relay: rep {rep + 1}/{opts.reps} {case.label}: "
            f"{result['events_per_s']:,.0f} events/s ({result['seconds']:.2f} s)"
            + (f", {result['errors']} failed batches retried" if result["errors"] else "")
        )

    # Repetitions are interleaved (every case once, then again) so that a noisy neighbour
    # hurts all cases alike rather than every repetition of one case. The large cases run
    # last, back to back, so that each one's check overlaps the next one's queueing.
    try:
        targets = {b: RawTarget(stack.enter_context(throwaway_databases(b))) for b in BACKENDS}

        def raw_case(backend: str, n: int, rep: int) -> None:
            settle()  # nothing runs in the background during a timed raw insert
            raw = targets[backend].insert(chunks[n], n)
            raw_runs[(backend, n)].append(raw)
            log(
                f"relay: rep {rep + 1}/{opts.reps} raw {backend} N={n:,}: "
                f"{raw['events_per_s']:,.0f} rows/s ({raw['seconds']:.2f} s)"
            )

        # Each raw insert runs right before the relay runs of its size in the same
        # repetition, so that relay/raw compares figures taken under the same load.
        for rep in range(opts.reps):
            for backend, n in raws[:2]:
                raw_case(backend, n, rep)
            for case in cases[:2]:
                relay_case(case, rep)
        for rep in range(opts.reps):
            raw_case(*raws[2], rep)
            for case in cases[2:]:
                relay_case(case, rep)
        settle()
    finally:
        if state["pending"] is not None:
            state["pending"].abort()
        stack.close()

    rows: list[Row] = []
    doc_cases = []
    for case in cases:
        rates = [r["events_per_s"] for r in runs[case]]
        stats = summarize(rates)
        raw_stats = summarize([r["events_per_s"] for r in raw_runs[(case.backend, case.n)]])
        ratio = stats["median"] / raw_stats["median"]
        errors = [r["errors"] for r in runs[case]]
        raw_reps = raw_runs[(case.backend, case.n)]
        paired = [
            r["events_per_s"] / w["events_per_s"] for r, w in zip(runs[case], raw_reps, strict=True)
        ]
        note = f"{100 * ratio:.1f}% of raw (target ≥ 60%); same rep: " + ", ".join(
            f"{100 * p:.0f}%" for p in paired
        )
        if any(errors):
            note += f"; failed batches retried per run: {', '.join(map(str, errors))}"
        doc_cases.append(
            {
                "case": case.label,
                "backend": case.backend,
                "n": case.n,
                "relays": case.relays,
                "events_per_s": stats,
                "seconds": summarize([r["seconds"] for r in runs[case]]),
                "raw_events_per_s": raw_stats["median"],
                "relay_to_raw": ratio,
                "relay_to_raw_same_rep": paired,
                "failed_batches_per_run": errors,
                "repetitions": runs[case],
            }
        )
        rows.append(
            Row(
                NAME,
                case.label,
                "events/s",
                stats["median"],
                "/s",
                stats["spread_pct"],
                len(rates),
                note,
            )
        )
    doc_raw = []
    for backend, n in raws:
        stats = summarize([r["events_per_s"] for r in raw_runs[(backend, n)]])
        share = summarize([r["escaping_share"] for r in raw_runs[(backend, n)]])["median"]
        raw_note = f"{RAW_BATCH}-row multi-row INSERT, one commit each"
        if share:
            raw_note += f"; pymysql escaping = {100 * share:.0f}% of it"
        doc_raw.append(
            {
                "backend": backend,
                "n": n,
                "events_per_s": stats,
                "repetitions": raw_runs[(backend, n)],
            }
        )
        rows.append(
            Row(
                NAME,
                f"raw INSERT {backend} N={n:,}",
                "rows/s",
                stats["median"],
                "/s",
                stats["spread_pct"],
                len(raw_runs[(backend, n)]),
                raw_note,
            )
        )
    write_result(
        opts,
        NAME,
        {
            "parameters": {
                "repetitions": opts.reps,
                "enqueue_batch": ENQUEUE_BATCH,
                "relay_batch_size": runs[cases[0]][0]["relay_batch_size"],
                "raw_batch": RAW_BATCH,
                "sizes": [small, large],
            },
            "cases": doc_cases,
            "raw": doc_raw,
        },
        rows,
    )
    return rows
