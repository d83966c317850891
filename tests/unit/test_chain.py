"""The chain's hash format, the projection of an event into columns, and search cursors."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime

import pytest

from echo_auth.audit.chain import MalformedPayload, link_hash, project
from echo_auth.audit.events import GENESIS_HASH, Actor, AuditEvent, Source, Target
from echo_auth.audit.search import InvalidQuery, decode_cursor, encode_cursor

MOMENT = datetime(2026, 11, 27, 17, 30, 12, 345678, tzinfo=UTC)


def _event(**overrides: object) -> AuditEvent:
    values: dict[str, object] = {
        "action": "auth.login.failed",
        "outcome": "failure",
        "actor": Actor("user", "42", "ana@example.com"),
        "target": Target("user", "42"),
        "reason": "bad_password",
        "source": Source("203.0.113.7", "Mozilla/5.0 (X11) Jörg", "req-1"),
        "metadata": {"mfa": False},
        "event_id": "0192f1c2-7a9e-7c3d-9b1e-2f6a0c1d4e5f",
        "occurred_at": MOMENT,
    }
    values.update(overrides)
    return AuditEvent(**values)  # type: ignore[arg-type]


# --- link_hash ------------------------------------------------------------------------------


def test_link_hash_is_sha256_of_prev_hex_then_event_json_in_utf8() -> None:
    payload = _event().canonical()
    expected = hashlib.sha256(GENESIS_HASH.encode("utf-8") + payload.encode("utf-8")).hexdigest()
    assert link_hash(GENESIS_HASH, payload) == expected
    assert len(expected) == 64 and expected == expected.lower()


def test_link_hash_known_vector() -> None:
    # Fixed once with hashlib; a change of format (separator, encoding, order) breaks it.
    assert (
        link_hash("0" * 64, '{"a":"é"}')
        == "5dbe4572a860871a8cc243598340661cd308929bd87a2d010651d4f4f4bb162b"
    )


def test_link_hash_uses_utf8_not_another_encoding() -> None:
    payload = '{"label":"Jörg"}'
    utf8 = hashlib.sha256((GENESIS_HASH + payload).encode("utf-8")).hexdigest()
    latin1 = hashlib.sha256((GENESIS_HASH + payload).encode("latin-1")).hexdigest()
    assert link_hash(GENESIS_HASH, payload) == utf8 != latin1


def test_chained_links_depend_on_every_previous_event() -> None:
    first, second = _event().canonical(), _event(event_id="x" * 36).canonical()
    h1 = link_hash(GENESIS_HASH, first)
    h2 = link_hash(h1, second)
    assert h2 == hashlib.sha256((h1 + second).encode()).hexdigest()
    tampered = first.replace("bad_password", "bad_passwore")
    assert link_hash(link_hash(GENESIS_HASH, tampered), second) != h2


# --- project --------------------------------------------------------------------------------


def test_project_gives_the_searchable_columns_of_a_canonical_event() -> None:
    columns = project(_event().canonical())
    assert columns == {
        "event_id": "0192f1c2-7a9e-7c3d-9b1e-2f6a0c1d4e5f",
        "occurred_at": MOMENT,
        "actor_type": "user",
        "actor_id": "42",
        "actor_label": "ana@example.com",
        "action": "auth.login.failed",
        "target_type": "user",
        "target_id": "42",
        "outcome": "failure",
        "reason": "bad_password",
        "ip": "203.0.113.7",
        "user_agent": "Mozilla/5.0 (X11) Jörg",
        "request_id": "req-1",
    }
    assert columns["occurred_at"].tzinfo is not None


def test_project_of_an_event_without_target_or_source() -> None:
    columns = project(_event(target=None, source=Source(), reason=None).canonical())
    assert columns["target_type"] is None and columns["target_id"] is None
    assert columns["ip"] is None and columns["user_agent"] is None
    assert columns["request_id"] is None and columns["reason"] is None


def test_project_keeps_clipped_values_equal_to_the_document() -> None:
    event = _event(source=Source("198.51.100.1", "u" * 2000))
    assert project(event.canonical())["user_agent"] == "u" * 512


def _doc_without(key: str) -> str:
    doc = json.loads(_event().canonical())
    del doc[key]
    return json.dumps(doc)


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        "",
        "null",
        "[]",
        '"a string"',
        "{}",
        '{"event_id": "x"}',
        _doc_without("actor"),
        _doc_without("action"),
        _doc_without("outcome"),
        _doc_without("occurred_at"),
        _event().canonical().replace("2026-11-27T17:30:12.345678Z", "yesterday"),
        _event().canonical().replace('"actor":{', '"actor":["x"],"was":{'),
        _event().canonical().replace('"target":{', '"target":"user","t":{'),
        _event().canonical()[:-1],
    ],
)
def test_project_refuses_what_is_not_an_event(payload: str) -> None:
    with pytest.raises(MalformedPayload):
        project(payload)


# --- search cursors -------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [1, 2, 9, 10, 42, 1_000_000, 2**53])
def test_cursor_round_trip(seq: int) -> None:
    cursor = encode_cursor(seq)
    assert "=" not in cursor
    assert cursor == base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")
    assert decode_cursor(cursor) == seq


def test_no_cursor_means_the_first_page() -> None:
    assert decode_cursor(None) is None
    assert decode_cursor("") is None


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor",
        "!!!!",
        "czE@",
        _b64("s0"),
        _b64("s-5"),
        _b64("s+5"),
        _b64("x5"),
        _b64("5"),
        _b64("s"),
        _b64("s5a"),
        _b64("s 5"),
        _b64("s1.5"),
        _b64("s\u0661\u0662"),  # Arabic-Indic digits: isdigit() says yes, the cursor format says no
        _b64(b"s\xff"),
        _b64("s" + "9" * 40),  # too long to be one we gave out
        encode_cursor(5) + "A" * 30,
        "A",
    ],
)
def test_forged_cursors_are_refused(cursor: str) -> None:
    with pytest.raises(InvalidQuery) as info:
        decode_cursor(cursor)
    assert info.value.field == "cursor"
