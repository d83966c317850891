"""The tamper matrix: an attacker with full SQL rights (triggers dropped first) edits the
audit log, and verification names what was done. Both backends."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Connection, delete, insert, select, text, update

from echo_auth.audit.chain import link_hash
from echo_auth.audit.events import Actor, AuditEvent, Target
from echo_auth.audit.outbox import enqueue_events
from echo_auth.audit.relay import drain
from echo_auth.audit.verify import verify_chain
from echo_auth.audit.verify_report import VerifyReport
from echo_auth.db.audit_schema import APPEND_ONLY_TABLES, audit_events, chain_head, checkpoints
from echo_auth.db.engines import transaction
from echo_auth.runtime import Runtime

EVENTS = 30


def _fill(runtime: Runtime, count: int, *, checkpoint_at: tuple[int, ...] = ()) -> None:
    """Queue and deliver ``count`` events, signing checkpoints after the given seqs."""
    made = 0
    for stop in (*checkpoint_at, count):
        with transaction(runtime.identity) as conn:
            enqueue_events(
                conn,
                [
                    AuditEvent(
                        action="auth.login.succeeded",
                        outcome="success",
                        actor=Actor("user", f"u{i}", f"u{i}@example.com"),
                        target=Target("user", f"u{i}"),
                        metadata={"n": i},
                    )
                    for i in range(made, stop)
                ],
            )
        drain(runtime.identity, runtime.audit, runtime.relay_policy)
        runtime.checkpointer.maybe_checkpoint(force=True)
        made = stop


def _verify(runtime: Runtime) -> VerifyReport:
    with transaction(runtime.audit, write=False) as conn:
        return verify_chain(
            conn,
            public_key=runtime.checkpoint_public_key,
            external=runtime.checkpoint_sink.read_all(),
        )


def _as_attacker(runtime: Runtime, change: Callable[[Connection], None]) -> None:
    """Drop the append-only triggers, as someone with full SQL rights would, then edit."""
    with transaction(runtime.audit) as conn:
        for table in APPEND_ONLY_TABLES:
            for verb in ("update", "delete"):
                conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_{verb}"))
        change(conn)


def _row(conn: Connection, seq: int) -> dict[str, object]:
    return dict(conn.execute(select(audit_events).where(audit_events.c.seq == seq)).one()._mapping)


def _set_head(conn: Connection) -> None:
    """A careful attacker also moves the chain head to the table's new last row."""
    last = conn.execute(
        select(audit_events.c.seq, audit_events.c.hash).order_by(audit_events.c.seq.desc()).limit(1)
    ).one()
    conn.execute(update(chain_head).values(seq=last.seq, hash=last.hash))


def _shift_seqs(conn: Connection, from_seq: int, by: int) -> None:
    # Two steps through negative numbers so no intermediate primary key collides.
    conn.execute(
        update(audit_events).where(audit_events.c.seq >= from_seq).values(seq=-audit_events.c.seq)
    )
    conn.execute(
        update(audit_events).where(audit_events.c.seq < 0).values(seq=-audit_events.c.seq + by)
    )


def _kinds(report: VerifyReport) -> set[tuple[str, int]]:
    return {(p.kind, p.seq) for p in report.problems}


@pytest.fixture
def chain(runtime: Runtime) -> Runtime:
    _fill(runtime, EVENTS, checkpoint_at=(10,))
    report = _verify(runtime)
    assert report.intact, report.as_dict()
    assert report.head_seq == EVENTS
    return runtime


def test_triggers_refuse_update_and_delete(chain: Runtime) -> None:
    for statement in (
        update(audit_events).where(audit_events.c.seq == 1).values(action="auth.logout"),
        delete(audit_events).where(audit_events.c.seq == 1),
        update(checkpoints).values(seq=99),
        delete(checkpoints),
    ):
        with (
            pytest.raises(Exception, match="append-only") as caught,
            transaction(chain.audit) as conn,
        ):
            conn.execute(statement)
        assert "refused" in str(caught.value)
    assert _verify(chain).intact


def test_one_field_changed_is_modified(chain: Runtime) -> None:
    _as_attacker(
        chain,
        lambda c: c.execute(
            update(audit_events).where(audit_events.c.seq == 12).values(outcome="failure")
        ),
    )
    report = _verify(chain)
    assert not report.intact
    assert ("modified", 12) in _kinds(report)
    assert report.first_bad_seq == 12


def test_event_json_changed_is_modified(chain: Runtime) -> None:
    def change(conn: Connection) -> None:
        row = _row(conn, 7)
        doc = json.loads(str(row["event_json"]))
        doc["metadata"]["n"] = 999
        new_json = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        conn.execute(
            update(audit_events).where(audit_events.c.seq == 7).values(event_json=new_json)
        )

    _as_attacker(chain, change)
    report = _verify(chain)
    assert _kinds(report) == {("modified", 7)}


def test_deleted_row_is_deleted(chain: Runtime) -> None:
    _as_attacker(chain, lambda c: c.execute(delete(audit_events).where(audit_events.c.seq == 15)))
    report = _verify(chain)
    assert ("deleted", 15) in _kinds(report)
    assert {p.kind for p in report.problems} == {"deleted"}


def test_forged_row_inserted_in_the_middle_is_inserted(chain: Runtime) -> None:
    def change(conn: Connection) -> None:
        before = _row(conn, 19)
        _shift_seqs(conn, 20, 1)
        forged = dict(_row(conn, 21))  # a copy of the real 20th event, made to look new
        doc = json.loads(str(forged["event_json"]))
        doc["event_id"] = "01a21e00-0000-7000-8000-000000000000"
        doc["actor"]["label"] = "mallory@example.com"
        forged_json = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        forged.update(
            seq=20,
            event_id=doc["event_id"],
            actor_label="mallory@example.com",
            event_json=forged_json,
            prev_hash=before["hash"],
            hash=link_hash(str(before["hash"]), forged_json),
        )
        conn.execute(insert(audit_events).values(**forged))
        _set_head(conn)

    _as_attacker(chain, change)
    report = _verify(chain)
    assert ("inserted", 20) in _kinds(report)
    assert {p.kind for p in report.problems} == {"inserted"}
    assert any(i.kind == "mismatch" for i in report.checkpoint_issues)


def test_two_rows_swapped_are_reordered(chain: Runtime) -> None:
    def change(conn: Connection) -> None:
        conn.execute(update(audit_events).where(audit_events.c.seq == 22).values(seq=-22))
        conn.execute(update(audit_events).where(audit_events.c.seq == 23).values(seq=22))
        conn.execute(update(audit_events).where(audit_events.c.seq == -22).values(seq=23))

    _as_attacker(chain, change)
    report = _verify(chain)
    assert _kinds(report) == {("reordered", 22), ("reordered", 23)}


def test_last_rows_deleted_are_caught_by_the_checkpoint(chain: Runtime) -> None:
    def change(conn: Connection) -> None:
        conn.execute(delete(audit_events).where(audit_events.c.seq > EVENTS - 10))
        _set_head(conn)

    _as_attacker(chain, change)
    report = _verify(chain)
    assert report.head_seq == EVENTS - 10
    deleted = [p for p in report.problems if p.kind == "deleted"]
    assert deleted and deleted[0].seq == EVENTS - 9 and deleted[0].seq_end == EVENTS
    assert any(i.kind == "mismatch" for i in report.checkpoint_issues)


def test_chain_recomputed_from_a_seq_is_caught_by_external_checkpoints(chain: Runtime) -> None:
    def change(conn: Connection) -> None:
        rows = [_row(conn, s) for s in range(15, EVENTS + 1)]
        prev = str(_row(conn, 14)["hash"])
        for row in rows:
            doc = json.loads(str(row["event_json"]))
            if row["seq"] == 15:
                doc["outcome"] = "failure"
            new_json = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            new_hash = link_hash(prev, new_json)
            conn.execute(
                update(audit_events)
                .where(audit_events.c.seq == row["seq"])
                .values(event_json=new_json, outcome=doc["outcome"], prev_hash=prev, hash=new_hash)
            )
            prev = new_hash
        _set_head(conn)
        # The attacker also deletes the database copies of the checkpoints.
        conn.execute(delete(checkpoints))

    _as_attacker(chain, change)
    report = _verify(chain)
    modified = [p for p in report.problems if p.kind == "modified"]
    assert modified, report.as_dict()
    # The last checkpoint that still matches is the one at seq 10.
    assert modified[0].seq == 11 and modified[0].seq_end == EVENTS
    kinds = {(i.kind, i.location) for i in report.checkpoint_issues}
    assert ("missing", "database") in kinds and ("mismatch", "external") in kinds
    # Without the external copies the rewrite would not be visible: that is their point.
    with transaction(chain.audit, write=False) as conn:
        blind = verify_chain(conn, public_key=chain.checkpoint_public_key)
    assert blind.intact


def test_checkpoint_file_edited_is_invalid(chain: Runtime) -> None:
    directory = chain.checkpoint_sink.directory
    target = sorted(directory.glob("*.json"))[0]
    os.chmod(target, 0o644)
    doc = json.loads(target.read_bytes())
    doc["seq"] = 5
    target.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")))
    report = _verify(chain)
    kinds = {(i.kind, i.location) for i in report.checkpoint_issues}
    assert ("invalid", "external") in kinds
    assert ("missing", "external") in kinds  # its database twin has no valid external copy
    assert not report.intact


def test_checkpoint_row_deleted_is_missing(chain: Runtime) -> None:
    _as_attacker(
        chain,
        lambda c: (
            c.execute(
                delete(checkpoints).where(
                    checkpoints.c.id
                    == select(checkpoints.c.id)
                    .order_by(checkpoints.c.id)
                    .limit(1)
                    .scalar_subquery()
                )
            )
            if c.dialect.name == "sqlite"
            else c.execute(text("DELETE FROM checkpoints ORDER BY id LIMIT 1"))
        ),
    )
    report = _verify(chain)
    assert [(i.kind, i.location) for i in report.checkpoint_issues] == [("missing", "database")]
    assert not report.intact


def test_checkpoint_files_are_read_only_and_never_overwritten(chain: Runtime) -> None:
    directory: Path = chain.checkpoint_sink.directory
    files = sorted(directory.iterdir())
    assert files and all(f.stat().st_mode & 0o222 == 0 for f in files)
    key_file = chain.settings.checkpoint_key_file
    assert key_file is not None and key_file.stat().st_mode & 0o777 == 0o600
