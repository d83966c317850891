"""The relay on real databases (SQLite and MariaDB): outbox -> hash chain, exactly once.

Covers: in-order gapless delivery, idempotent appends, a poisoned outbox row retried with
backoff then set aside as a dead letter (while its batch-mates are delivered), putting dead
letters back, the pipeline's health figures, and verification spotting a hand-edited row.
"""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.exc import DBAPIError

from echo_auth.audit.chain import QueuedEvent, append_to_chain, read_head
from echo_auth.audit.dead_letters import list_dead_letters, retry_dead_letters
from echo_auth.audit.events import GENESIS_HASH, Actor, AuditEvent, Source, Target
from echo_auth.audit.outbox import enqueue_event
from echo_auth.audit.pipeline import pipeline_status
from echo_auth.audit.relay import RelayPolicy, deliver_batch, drain
from echo_auth.audit.verify import verify_chain
from echo_auth.db.audit_schema import audit_events
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import audit_dead_letters, audit_outbox
from echo_auth.runtime import Runtime


def _make_event(i: int, occurred_at: datetime | None = None) -> AuditEvent:
    extra: dict[str, Any] = {} if occurred_at is None else {"occurred_at": occurred_at}
    return AuditEvent(
        action="auth.login.failed" if i % 2 else "auth.login.succeeded",
        outcome="failure" if i % 2 else "success",
        actor=Actor("user", str(i), f"user{i}@example.com"),
        target=Target("user", str(i)),
        reason="bad_password" if i % 2 else None,
        source=Source("203.0.113.7", "pytest/Jörg 東京", f"req-{i}"),
        metadata={"i": i},
        **extra,
    )


def _enqueue(runtime: Runtime, count: int, per_transaction: int = 10) -> list[AuditEvent]:
    events = [_make_event(i) for i in range(count)]
    for start in range(0, count, per_transaction):
        with transaction(runtime.identity) as conn:
            for event in events[start : start + per_transaction]:
                enqueue_event(conn, event)
    return events


def _audit_rows(runtime: Runtime) -> list[Any]:
    with transaction(runtime.audit, write=False) as conn:
        return conn.execute(
            select(
                audit_events.c.seq,
                audit_events.c.event_id,
                audit_events.c.event_json,
                audit_events.c.prev_hash,
                audit_events.c.hash,
            ).order_by(audit_events.c.seq)
        ).all()


def _outbox(runtime: Runtime) -> list[Any]:
    with transaction(runtime.identity, write=False) as conn:
        return conn.execute(select(audit_outbox).order_by(audit_outbox.c.id)).all()


def _verify(runtime: Runtime) -> Any:
    with transaction(runtime.audit, write=False) as conn:
        return verify_chain(conn, batch=7)


def _policy(runtime: Runtime, **changes: Any) -> RelayPolicy:
    return dataclasses.replace(runtime.relay_policy, **changes)


def test_drain_delivers_every_event_once_in_queue_order(runtime: Runtime) -> None:
    events = _enqueue(runtime, 45, per_transaction=10)
    # Batches smaller than the queue, so several claims happen and the chain spans them.
    moved = drain(runtime.identity, runtime.audit, _policy(runtime, batch_size=7))
    assert moved == 45

    rows = _audit_rows(runtime)
    assert [r.seq for r in rows] == list(range(1, 46))
    assert [r.event_id for r in rows] == [e.event_id for e in events]
    # The stored JSON is the enqueued canonical text, byte for byte, and the links chain.
    assert [r.event_json for r in rows] == [e.canonical() for e in events]
    prev = GENESIS_HASH
    for row in rows:
        assert row.prev_hash == prev
        prev = row.hash
    assert _outbox(runtime) == []

    report = _verify(runtime)
    assert report.intact, report.as_dict()
    assert report.events_checked == 45 and report.head_seq == 45 and report.head_hash == prev
    with transaction(runtime.audit, write=False) as conn:
        assert read_head(conn) == (45, prev)

    # Nothing left: another drain moves nothing and changes nothing.
    assert drain(runtime.identity, runtime.audit, runtime.relay_policy) == 0
    assert len(_audit_rows(runtime)) == 45

    # An event exists if and only if its identity transaction commits.
    kept, lost = _make_event(100), _make_event(101)
    with transaction(runtime.identity) as conn:
        enqueue_event(conn, kept)
    with pytest.raises(RuntimeError), transaction(runtime.identity) as conn:
        enqueue_event(conn, lost)
        raise RuntimeError("the identity change failed")
    assert [r.event_id for r in _outbox(runtime)] == [kept.event_id]
    assert drain(runtime.identity, runtime.audit, runtime.relay_policy) == 1
    rows = _audit_rows(runtime)
    assert [r.seq for r in rows] == list(range(1, 47))
    assert rows[-1].event_id == kept.event_id
    assert lost.event_id not in {r.event_id for r in rows}


def test_append_is_idempotent_on_event_id(runtime: Runtime) -> None:
    events = [_make_event(i) for i in range(6)]
    queued = [QueuedEvent(e.event_id, e.canonical()) for e in events]
    with transaction(runtime.audit) as conn:
        assert append_to_chain(conn, queued[:4]) == [e.event_id for e in events[:4]]
    with transaction(runtime.audit) as conn:
        assert append_to_chain(conn, queued[:4]) == []
    # Overlapping batch, with a duplicate inside it: only the new ones are appended, once.
    with transaction(runtime.audit) as conn:
        appended = append_to_chain(conn, [queued[2], queued[4], queued[4], queued[5], queued[0]])
    assert appended == [events[4].event_id, events[5].event_id]

    rows = _audit_rows(runtime)
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r.event_id for r in rows] == [e.event_id for e in events]
    assert _verify(runtime).intact


def test_redelivery_after_a_crash_between_audit_commit_and_outbox_delete(
    runtime: Runtime,
) -> None:
    """The audit commit happened, the outbox delete did not: the rows are claimed again."""
    events = _enqueue(runtime, 12)
    with transaction(runtime.audit) as conn:
        append_to_chain(conn, [QueuedEvent(e.event_id, e.canonical()) for e in events[:8]])
    assert len(_outbox(runtime)) == 12

    result = deliver_batch(runtime.identity, runtime.audit, runtime.relay_policy)
    assert (result.claimed, result.delivered, result.already_present) == (12, 4, 8)
    assert _outbox(runtime) == []
    rows = _audit_rows(runtime)
    assert [r.seq for r in rows] == list(range(1, 13))
    assert [r.event_id for r in rows] == [e.event_id for e in events]
    assert _verify(runtime).intact


def _insert_raw(runtime: Runtime, event_id: str, payload: str) -> None:
    now = datetime.now(UTC)
    with transaction(runtime.identity) as conn:
        conn.execute(
            insert(audit_outbox).values(
                event_id=event_id, payload=payload, created_at=now, available_at=now
            )
        )


def _dead_letter_events(runtime: Runtime, action: str) -> list[dict[str, Any]]:
    return [
        json.loads(r.event_json)
        for r in _audit_rows(runtime)
        if json.loads(r.event_json)["action"] == action
    ]


def test_malformed_payload_is_retried_with_backoff_then_dead_lettered(runtime: Runtime) -> None:
    base = 0.2
    policy = _policy(runtime, max_attempts=3, backoff_base_s=base, backoff_max_s=10.0)
    before = _enqueue(runtime, 3)
    poison = _make_event(99)  # a real id, so an operator can repair the payload later
    _insert_raw(runtime, poison.event_id, "not json")
    after = _enqueue(runtime, 3)
    good_ids = [e.event_id for e in before + after]

    # Attempt 1: the good events of the same batch are delivered; the bad one waits.
    started = datetime.now(UTC)
    result = deliver_batch(runtime.identity, runtime.audit, policy)
    finished = datetime.now(UTC)
    assert (result.claimed, result.delivered, result.failed, result.dead_lettered) == (7, 6, 1, 0)
    assert [r.event_id for r in _audit_rows(runtime)] == good_ids
    [row] = _outbox(runtime)
    assert row.event_id == poison.event_id and row.attempts == 1
    assert "not an event document" in row.last_error
    assert started + timedelta(seconds=base) <= row.available_at
    assert row.available_at <= finished + timedelta(seconds=base)

    # Not available again before its delay has passed.
    if datetime.now(UTC) < row.available_at - timedelta(seconds=0.01):
        assert deliver_batch(runtime.identity, runtime.audit, policy).claimed == 0

    # Attempt 2, after the first delay: the delay doubles.
    time.sleep(base + 0.02)
    started = datetime.now(UTC)
    result = deliver_batch(runtime.identity, runtime.audit, policy)
    finished = datetime.now(UTC)
    assert (result.claimed, result.failed, result.dead_lettered) == (1, 1, 0)
    [row] = _outbox(runtime)
    assert row.attempts == 2
    assert started + timedelta(seconds=2 * base) <= row.available_at
    assert row.available_at <= finished + timedelta(seconds=2 * base)

    # Attempt 3 = max_attempts: set aside as a dead letter, with a system event saying so.
    time.sleep(2 * base + 0.02)
    result = deliver_batch(runtime.identity, runtime.audit, policy)
    assert (result.claimed, result.failed, result.dead_lettered, result.delivered) == (1, 1, 1, 0)
    assert poison.event_id not in {r.event_id for r in _outbox(runtime)}
    with transaction(runtime.identity, write=False) as conn:
        [letter] = list_dead_letters(conn)
        payload = conn.execute(select(audit_dead_letters.c.payload)).scalar_one()
    assert letter.event_id == poison.event_id and letter.attempts == 3
    assert "not an event document" in letter.last_error
    assert payload == "not json"

    assert drain(runtime.identity, runtime.audit, policy) == 1
    [created] = _dead_letter_events(runtime, "system.dead_letter.created")
    assert created["target"] == {"type": "audit_event", "id": poison.event_id}
    assert created["outcome"] == "failure" and created["actor"]["type"] == "system"
    assert created["metadata"]["attempts"] == 3
    assert _outbox(runtime) == []
    assert _verify(runtime).intact
    assert poison.event_id not in {r.event_id for r in _audit_rows(runtime)}


def test_retry_dead_letters_puts_them_back_on_the_queue(runtime: Runtime) -> None:
    policy = _policy(runtime, max_attempts=1)
    poison = _make_event(7)
    _insert_raw(runtime, poison.event_id, "not json")
    assert deliver_batch(runtime.identity, runtime.audit, policy).dead_lettered == 1
    drain(runtime.identity, runtime.audit, policy)  # delivers system.dead_letter.created
    assert _outbox(runtime) == []

    # An operator repairs the stored payload, then retries from the CLI's function.
    with transaction(runtime.identity) as conn:
        conn.execute(update(audit_dead_letters).values(payload=poison.canonical()))
    operator = Actor("admin", "root@host", "root")
    with transaction(runtime.identity) as conn:
        assert retry_dead_letters(conn, operator) == 1
    with transaction(runtime.identity, write=False) as conn:
        assert list_dead_letters(conn) == []
    requeued = {r.event_id: r for r in _outbox(runtime)}
    assert requeued[poison.event_id].attempts == 0
    assert requeued[poison.event_id].available_at <= datetime.now(UTC)

    assert drain(runtime.identity, runtime.audit, policy) == 2
    rows = _audit_rows(runtime)
    assert [r.event_id for r in rows].count(poison.event_id) == 1
    assert next(r for r in rows if r.event_id == poison.event_id).event_json == poison.canonical()
    [retried] = _dead_letter_events(runtime, "system.dead_letter.retried")
    assert retried["target"] == {"type": "audit_event", "id": poison.event_id}
    assert retried["actor"]["id"] == "root@host"
    assert _outbox(runtime) == []
    assert _verify(runtime).intact


def test_pipeline_status_reports_depth_age_delivered_and_dead_letters(runtime: Runtime) -> None:
    with (
        transaction(runtime.identity, write=False) as iconn,
        transaction(runtime.audit, write=False) as aconn,
    ):
        empty = pipeline_status(iconn, aconn)
    assert (empty.outbox_depth, empty.oldest_undelivered_age_s, empty.delivered) == (0, None, 0)
    assert (empty.dead_letters, empty.audit_db_reachable) == (0, True)

    now = datetime.now(UTC)
    with transaction(runtime.identity) as conn:
        enqueue_event(conn, _make_event(0, occurred_at=now - timedelta(seconds=90)))
        enqueue_event(conn, _make_event(1, occurred_at=now - timedelta(seconds=30)))
        for i in range(2, 5):
            enqueue_event(conn, _make_event(i))
    _insert_raw(runtime, _make_event(5).event_id, "not json")

    with (
        transaction(runtime.identity, write=False) as iconn,
        transaction(runtime.audit, write=False) as aconn,
    ):
        queued = pipeline_status(iconn, aconn)
    assert queued.outbox_depth == 6
    assert queued.oldest_undelivered_age_s is not None
    assert 90 <= queued.oldest_undelivered_age_s < 100
    assert queued.delivered == queued.chain_head_seq == 0
    assert queued.dead_letters == 0

    drain(runtime.identity, runtime.audit, _policy(runtime, max_attempts=1))
    with (
        transaction(runtime.identity, write=False) as iconn,
        transaction(runtime.audit, write=False) as aconn,
    ):
        after = pipeline_status(iconn, aconn)
        delivered = aconn.execute(select(func.count()).select_from(audit_events)).scalar_one()
    # 5 events delivered; the bad one died and its system.dead_letter.created is queued.
    assert delivered == 5
    assert (after.outbox_depth, after.delivered, after.dead_letters) == (1, 5, 1)
    assert after.oldest_undelivered_age_s is not None and after.oldest_undelivered_age_s < 30

    drain(runtime.identity, runtime.audit, runtime.relay_policy)
    with transaction(runtime.identity, write=False) as iconn:
        unreachable = pipeline_status(iconn, None)
    assert unreachable.outbox_depth == 0 and unreachable.oldest_undelivered_age_s is None
    assert unreachable.dead_letters == 1
    assert unreachable.delivered is None and unreachable.audit_db_reachable is False
    assert unreachable.as_dict()["outbox_depth"] == 0


def _drop_append_only_triggers(runtime: Runtime) -> None:
    """What an attacker with DDL rights does first; the triggers themselves must hold."""
    with pytest.raises(DBAPIError, match="append-only"), transaction(runtime.audit) as conn:
        conn.execute(update(audit_events).where(audit_events.c.seq == 1).values(reason="x"))
    with pytest.raises(DBAPIError, match="append-only"), transaction(runtime.audit) as conn:
        conn.execute(delete(audit_events).where(audit_events.c.seq == 1))
    with transaction(runtime.audit) as conn:
        conn.execute(text("DROP TRIGGER audit_events_no_update"))
        conn.execute(text("DROP TRIGGER audit_events_no_delete"))


def _set(runtime: Runtime, seq: int, column: str, value: Any) -> None:
    with transaction(runtime.audit) as conn:
        changed = conn.execute(
            update(audit_events).where(audit_events.c.seq == seq).values({column: value})
        )
        assert changed.rowcount == 1


def test_rows_changed_by_hand_are_reported_at_their_seq(runtime: Runtime) -> None:
    _enqueue(runtime, 12)
    drain(runtime.identity, runtime.audit, runtime.relay_policy)
    assert _verify(runtime).intact
    _drop_append_only_triggers(runtime)
    with transaction(runtime.audit, write=False) as conn:
        originals = {r.seq: r for r in conn.execute(select(audit_events)).all()}

    # Odd indexes are failed logins (seq = index + 1), so every new value below differs.
    json_6 = originals[6].event_json.replace('"outcome":"failure"', '"outcome":"success"')
    assert json_6 != originals[6].event_json
    changes: list[tuple[int, str, Any]] = [
        (2, "action", "auth.login.succeeded"),
        (4, "outcome", "success"),
        (6, "event_json", json_6),
        (8, "actor_id", "9999"),
        (10, "ip", "198.51.100.99"),
        (11, "occurred_at", datetime(2020, 1, 1, tzinfo=UTC)),
        (12, "user_agent", "curl/8"),
        (1, "request_id", None),
    ]
    for seq, column, value in changes:
        _set(runtime, seq, column, value)
        report = _verify(runtime)
        assert not report.intact, (column, report.as_dict())
        assert report.first_bad_seq == seq, (column, report.as_dict())
        assert [(p.kind, p.seq) for p in report.problems] == [("modified", seq)], column
        assert report.events_checked == 12
        # Put it back: the chain is intact again, so the report was about that change alone.
        _set(runtime, seq, column, getattr(originals[seq], column))
        assert _verify(runtime).intact, column

    # A rewritten hash column is reported at its own row (the next link breaks too).
    _set(runtime, 3, "hash", "f" * 64)
    report = _verify(runtime)
    assert report.first_bad_seq == 3
    assert ("modified", 3) in {(p.kind, p.seq) for p in report.problems}
    _set(runtime, 3, "hash", originals[3].hash)
    assert _verify(runtime).intact

    # A deleted row is reported as exactly that gap.
    with transaction(runtime.audit) as conn:
        conn.execute(delete(audit_events).where(audit_events.c.seq == 5))
    report = _verify(runtime)
    assert report.first_bad_seq == 5
    assert [(p.kind, p.seq, p.seq_end) for p in report.problems] == [("deleted", 5, 5)]
