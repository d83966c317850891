"""The relay: moves events from the outbox (identity DB) into the hash chain (audit DB).

Guarantees, each relied on by tests that kill relays for real:

* A batch is claimed with ``SELECT ... FOR UPDATE SKIP LOCKED`` (SQLite: the writer lock),
  appended to the chain in one audit transaction, and only then deleted from the outbox
  in the claiming transaction. A crash anywhere leaves the rows in the outbox.
* The append is idempotent on ``event_id``, so a re-claimed batch whose audit commit had
  already happened is skipped, not duplicated: exactly once in the audit table.
* Several relays may run at once; their batches serialise on the chain head lock.
* When the audit database is unreachable the relay backs off and retries forever; no event
  is given up on. An event that fails on its own (it cannot be stored) is retried with
  growing delays and, after ``max_attempts``, moved to the dead-letter table with its
  error, which itself records a ``system.dead_letter.created`` event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from echo_auth.audit.chain import ChainMoved, MalformedPayload, QueuedEvent, append_to_chain
from echo_auth.audit.checkpoints import Checkpoint, Checkpointer
from echo_auth.audit.events import Actor, AuditEvent, Target
from echo_auth.audit.outbox import enqueue_event
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import audit_dead_letters, audit_outbox

log = logging.getLogger("echo_auth.relay")


class AuditUnavailable(Exception):
    """The audit database could not be reached; the batch stays queued."""


@dataclass(frozen=True)
class RelayPolicy:
    batch_size: int = 500
    max_attempts: int = 8
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    idle_sleep_s: float = 0.2
    # After a batch that moved events without filling up, more are probably on their way:
    # look again this soon instead of after idle_sleep_s. At a steady trickle this keeps
    # the outbox-to-chain lag near this value (bench/lag.py) at small batches; only an
    # empty claim makes the relay sleep idle_sleep_s.
    busy_sleep_s: float = 0.01

    def delay(self, attempts: int) -> timedelta:
        return timedelta(seconds=min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempts - 1)))


@dataclass
class BatchResult:
    claimed: int = 0
    delivered: int = 0
    already_present: int = 0
    failed: int = 0
    dead_lettered: int = 0


@dataclass
class RelayStats:
    batches: int = 0
    delivered: int = 0
    errors: int = 0
    last_error: str | None = field(default=None)


def _claim(conn: Connection, limit: int) -> list[tuple[int, str, str, int]]:
    stmt = (
        select(
            audit_outbox.c.id,
            audit_outbox.c.event_id,
            audit_outbox.c.payload,
            audit_outbox.c.attempts,
        )
        .where(audit_outbox.c.available_at <= datetime.now(UTC))
        # The index (available_at, id) serves both the filter and the order: MariaDB then
        # locks only the rows it returns, so concurrent relays share even a short queue.
        .order_by(audit_outbox.c.available_at, audit_outbox.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [tuple(row) for row in conn.execute(stmt)]


# MySQL errors that mean "try the same batch again at once": another transaction held a
# lock we needed. Delivery is idempotent, so the retry is harmless.
_LOCK_CONFLICTS = frozenset({1205, 1213})


def _mysql_code(exc: DBAPIError) -> int | None:
    args = getattr(exc.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _is_event_specific(exc: DBAPIError) -> bool:
    """Only errors about an event's own data may count against that event.

    Anything else (the server is down, a table or grant is missing, a lock conflict) is
    the audit database's trouble, not the event's: the whole batch waits and retries, and
    nothing is dead-lettered for it.
    """
    return isinstance(exc, DataError | IntegrityError) and not exc.connection_invalidated


class LockConflict(Exception):
    """A deadlock or lock wait timeout; the batch is retried at once."""


def deliver_batch(identity: Engine, audit: Engine, policy: RelayPolicy) -> BatchResult:
    """Claim one batch and deliver it.

    Raises :class:`AuditUnavailable` if the audit database cannot take it, and
    :class:`LockConflict` after a deadlock or lock wait timeout (retry at once).
    """
    try:
        return _deliver_batch(identity, audit, policy)
    except DBAPIError as exc:
        if _mysql_code(exc) in _LOCK_CONFLICTS:
            raise LockConflict(_short(exc)) from exc
        raise


def _deliver_batch(identity: Engine, audit: Engine, policy: RelayPolicy) -> BatchResult:
    result = BatchResult()
    with transaction(identity) as iconn:
        claimed = _claim(iconn, policy.batch_size)
        result.claimed = len(claimed)
        if not claimed:
            return result
        by_event = {event_id: (row_id, attempts) for row_id, event_id, _, attempts in claimed}
        queued = [QueuedEvent(event_id, payload) for _, event_id, payload, _ in claimed]
        done: list[str] = []
        try:
            appended = _append(audit, queued)
            done = [q.event_id for q in queued]
            result.delivered = len(appended)
        except ChainMoved as exc:
            # The log moved to another server: keep everything queued for the relays
            # that point there, exactly as when the audit database is down.
            raise AuditUnavailable(str(exc)) from exc
        except DBAPIError as exc:
            if _mysql_code(exc) in _LOCK_CONFLICTS:
                raise LockConflict(_short(exc)) from exc
            if not _is_event_specific(exc):
                raise AuditUnavailable(_short(exc)) from exc
            done = _deliver_one_by_one(iconn, audit, queued, by_event, policy, result)
        except MalformedPayload:
            done = _deliver_one_by_one(iconn, audit, queued, by_event, policy, result)
        result.already_present = len(done) - result.delivered
        if done:
            _delete_rows(iconn, [by_event[e][0] for e in done])
    return result


def _append(audit: Engine, queued: list[QueuedEvent]) -> list[str]:
    """Append a batch in one audit transaction, optimistically first.

    An event is already in the log only if a relay crashed between its audit commit and
    its outbox delete, so the batch is first appended without looking for such events:
    one query fewer per batch. If one is there after all, the unique ``event_id`` refuses
    the INSERT; that transaction is rolled back and the batch appended again, looking.
    """
    try:
        with transaction(audit) as aconn:
            return append_to_chain(aconn, queued, check_present=False)
    except IntegrityError as exc:
        if exc.connection_invalidated:
            raise
    with transaction(audit) as aconn:
        return append_to_chain(aconn, queued)


def _delete_rows(iconn: Connection, row_ids: list[int]) -> None:
    """Delete delivered outbox rows by id: one statement with the ids inline.

    The ids are integers read from the outbox itself, so inlining them is safe; it spares
    the driver escaping 500 parameters and SQLAlchemy expanding an IN list per batch.
    """
    ids = ",".join(str(int(i)) for i in row_ids)
    table = iconn.dialect.identifier_preparer.format_table(audit_outbox)
    iconn.exec_driver_sql(f"DELETE FROM {table} WHERE id IN ({ids})")  # noqa: S608


def _deliver_one_by_one(
    iconn: Connection,
    audit: Engine,
    queued: list[QueuedEvent],
    by_event: dict[str, tuple[int, int]],
    policy: RelayPolicy,
    result: BatchResult,
) -> list[str]:
    """Isolate the events that fail on their own so the rest of the batch still moves."""
    done: list[str] = []
    for event in queued:
        try:
            with transaction(audit) as aconn:
                result.delivered += len(append_to_chain(aconn, [event]))
            done.append(event.event_id)
        except ChainMoved as exc:
            raise AuditUnavailable(str(exc)) from exc
        except DBAPIError as exc:
            if _mysql_code(exc) in _LOCK_CONFLICTS:
                raise LockConflict(_short(exc)) from exc
            if not _is_event_specific(exc):
                raise AuditUnavailable(_short(exc)) from exc
            _record_failure(iconn, event, by_event[event.event_id], _short(exc), policy, result)
        except MalformedPayload as exc:
            _record_failure(iconn, event, by_event[event.event_id], str(exc), policy, result)
    return done


def _record_failure(
    iconn: Connection,
    event: QueuedEvent,
    row: tuple[int, int],
    error: str,
    policy: RelayPolicy,
    result: BatchResult,
) -> None:
    row_id, attempts = row
    attempts += 1
    now = datetime.now(UTC)
    result.failed += 1
    log.warning("audit event %s failed delivery (attempt %d): %s", event.event_id, attempts, error)
    if attempts < policy.max_attempts:
        iconn.execute(
            update(audit_outbox)
            .where(audit_outbox.c.id == row_id)
            .values(attempts=attempts, available_at=now + policy.delay(attempts), last_error=error)
        )
        return
    queued_at = iconn.execute(
        select(audit_outbox.c.created_at).where(audit_outbox.c.id == row_id)
    ).scalar_one()
    iconn.execute(
        insert(audit_dead_letters).values(
            event_id=event.event_id,
            payload=event.payload,
            attempts=attempts,
            last_error=error,
            queued_at=queued_at,
            dead_at=now,
        )
    )
    iconn.execute(delete(audit_outbox).where(audit_outbox.c.id == row_id))
    if _is_dead_letter_notice(event):
        return  # a notice about a dead letter that itself died: no notice about the notice
    enqueue_event(
        iconn,
        AuditEvent(
            action="system.dead_letter.created",
            outcome="failure",
            actor=Actor.system("relay"),
            target=Target("audit_event", event.event_id),
            reason="delivery_failed",
            metadata={"attempts": attempts, "error": error[:500]},
        ),
    )
    result.dead_lettered += 1


def _is_dead_letter_notice(event: QueuedEvent) -> bool:
    return '"action":"system.dead_letter.' in event.payload


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.splitlines()[0][:500] if text else type(exc).__name__


def drain(identity: Engine, audit: Engine, policy: RelayPolicy) -> int:
    """Deliver until nothing deliverable is left; returns the number of events appended."""
    total = 0
    while True:
        try:
            result = deliver_batch(identity, audit, policy)
        except LockConflict:
            continue
        total += result.delivered
        if result.claimed < policy.batch_size:
            return total


def run_relay(
    identity: Engine,
    audit: Engine,
    policy: RelayPolicy,
    stop: threading.Event,
    on_batch: Callable[[BatchResult], None] | None = None,
    stats: RelayStats | None = None,
    checkpointer: Checkpointer | None = None,
) -> None:
    """Relay until ``stop`` is set. Never raises for database trouble: it backs off.

    After a full batch it claims again at once; after a partial one it waits
    ``busy_sleep_s``, after an empty one ``idle_sleep_s``.

    With a ``checkpointer`` it also signs the chain head when due (every N events or T
    seconds, idle or not); at most one look per second.
    """
    stats = stats or RelayStats()
    unavailable_for = 0
    next_checkpoint_look = 0.0
    while not stop.is_set():
        if checkpointer is not None and time.monotonic() >= next_checkpoint_look:
            next_checkpoint_look = time.monotonic() + 1.0
            try_checkpoint(checkpointer)
        try:
            result = deliver_batch(identity, audit, policy)
        except LockConflict as exc:
            log.info("relay batch met a lock conflict (%s); retrying", exc)
            continue
        except (AuditUnavailable, DBAPIError) as exc:
            unavailable_for += 1
            stats.errors += 1
            stats.last_error = _short(exc)
            wait = min(policy.backoff_max_s, policy.idle_sleep_s * 2 ** min(unavailable_for, 8))
            log.warning("relay cannot deliver (%s); retrying in %.1fs", stats.last_error, wait)
            stop.wait(wait)
            continue
        unavailable_for = 0
        stats.batches += 1
        stats.delivered += result.delivered
        if on_batch is not None:
            on_batch(result)
        if result.claimed == 0:
            stop.wait(policy.idle_sleep_s)
        elif result.claimed < policy.batch_size:
            stop.wait(min(policy.busy_sleep_s, policy.idle_sleep_s))


def try_checkpoint(checkpointer: Checkpointer, *, force: bool = False) -> Checkpoint | None:
    """Sign a checkpoint if due; trouble is logged, never raised (the relay must go on)."""
    try:
        return checkpointer.maybe_checkpoint(force=force)
    except (DBAPIError, OSError) as exc:
        log.warning("could not sign a checkpoint: %s", _short(exc))
        return None
