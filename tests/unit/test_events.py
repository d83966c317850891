"""The audit event model: canonical bytes, time-ordered ids, and what may never enter an event."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from echo_auth.audit.events import (
    CATALOG,
    MAX_METADATA_BYTES,
    Actor,
    AuditEvent,
    InvalidEvent,
    Source,
    Target,
    canonical_json,
    format_timestamp,
    parse_timestamp,
    uuid7,
)

MOMENT = datetime(2026, 11, 27, 17, 30, 12, 345678, tzinfo=UTC)


def _event(**overrides: Any) -> AuditEvent:
    values: dict[str, Any] = {
        "action": "auth.login.failed",
        "outcome": "failure",
        "actor": Actor("user", "42", "ana@example.com"),
    }
    values.update(overrides)
    return AuditEvent(**values)


# --- canonical JSON -------------------------------------------------------------------------


def test_canonical_json_sorts_keys_at_every_depth_and_has_no_whitespace() -> None:
    text = canonical_json({"b": 1, "a": {"z": [3, {"y": True, "x": None}], "c": "d e"}})
    assert text == '{"a":{"c":"d e","z":[3,{"x":null,"y":true}]},"b":1}'


def test_canonical_json_keeps_non_ascii_as_utf8() -> None:
    text = canonical_json({"label": "José 東京 😀"})
    assert text == '{"label":"José 東京 😀"}'
    assert "\\u" not in text
    assert (
        text.encode("utf-8") == b'{"label":"Jos\xc3\xa9 \xe6\x9d\xb1\xe4\xba\xac \xf0\x9f\x98\x80"}'
    )


def test_event_canonical_form_is_exactly_the_documented_bytes() -> None:
    event = AuditEvent(
        action="auth.login.failed",
        outcome="failure",
        actor=Actor("user", "42", "ana@example.com"),
        target=Target("user", "42"),
        reason="bad_password",
        source=Source("203.0.113.7", "Mozilla/5.0 é", "b3c1"),
        metadata={"mfa": False, "attempt": 2},
        event_id="0192f1c2-7a9e-7c3d-9b1e-2f6a0c1d4e5f",
        occurred_at=MOMENT,
    )
    expected = (
        '{"action":"auth.login.failed",'
        '"actor":{"id":"42","label":"ana@example.com","type":"user"},'
        '"event_id":"0192f1c2-7a9e-7c3d-9b1e-2f6a0c1d4e5f",'
        '"metadata":{"attempt":2,"mfa":false},'
        '"occurred_at":"2026-11-27T17:30:12.345678Z",'
        '"outcome":"failure",'
        '"reason":"bad_password",'
        '"request_id":"b3c1",'
        '"source":{"ip":"203.0.113.7","user_agent":"Mozilla/5.0 é"},'
        '"target":{"id":"42","type":"user"}}'
    )
    assert event.canonical() == expected
    # Re-encoding the parsed document gives the same bytes: the form is a fixed point.
    assert canonical_json(json.loads(expected)) == expected


def test_timestamp_has_microseconds_and_z_and_is_converted_to_utc() -> None:
    assert format_timestamp(MOMENT) == "2026-11-27T17:30:12.345678Z"
    assert format_timestamp(MOMENT.replace(microsecond=0)) == "2026-11-27T17:30:12.000000Z"
    paris = MOMENT.astimezone(timezone(timedelta(hours=1)))
    assert format_timestamp(paris) == "2026-11-27T17:30:12.345678Z"
    event = _event(occurred_at=paris)
    assert json.loads(event.canonical())["occurred_at"] == "2026-11-27T17:30:12.345678Z"
    assert parse_timestamp(format_timestamp(MOMENT)) == MOMENT


def test_naive_timestamp_is_refused() -> None:
    with pytest.raises(InvalidEvent):
        format_timestamp(datetime(2026, 11, 27, 17, 30))


def test_default_event_gets_a_fresh_uuid7_and_the_current_time() -> None:
    before = datetime.now(UTC)
    event = _event()
    after = datetime.now(UTC)
    assert uuid.UUID(event.event_id).version == 7
    assert before <= event.occurred_at <= after
    assert _event().event_id != event.event_id


# --- uuid7 ----------------------------------------------------------------------------------


def test_uuid7_has_version_7_rfc_variant_and_the_current_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    ids = [uuid7() for _ in range(200)]
    after = time.time_ns() // 1_000_000
    for value in ids:
        assert value.version == 7
        assert value.variant == uuid.RFC_4122
        assert before <= value.int >> 80 <= after
    assert len(set(ids)) == len(ids)


def test_uuid7_is_time_ordered_across_milliseconds() -> None:
    ids = []
    for _ in range(20):
        ids.append(uuid7())
        time.sleep(0.002)
    assert ids == sorted(ids, key=lambda u: u.int)
    assert [str(u) for u in ids] == sorted(str(u) for u in ids)  # text order too, for indexes
    assert len({u.int >> 80 for u in ids}) == len(ids)


# --- what may enter an event ----------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        {"password": "hunter2"},
        {"new_password": "x"},
        {"session_token": "abc"},
        {"recovery_codes": ["a", "b"]},
        {"totp_secret": "JBSWY3DP"},
        {"Private-Key": "-----BEGIN"},
        {"password_hash": "$argon2id$..."},
        {"otp": "123456"},
        {"outer": {"reset-token": "x"}},
        {"list": [{"ok": 1}, {"code": "123456"}]},
    ],
)
def test_metadata_keys_that_name_a_secret_are_refused(metadata: dict[str, Any]) -> None:
    with pytest.raises(InvalidEvent, match="secret"):
        _event(metadata=metadata)


@pytest.mark.parametrize(
    "metadata",
    [
        {"rehashed": True},
        {"session_id": "s-1"},
        {"mfa": False},
        {"attempts": 3, "error": "boom"},
        {"codebase": "x", "tokenizer": "y"},
        {"nested": {"user_agent_family": "firefox", "roles": ["admin"]}},
    ],
)
def test_ordinary_metadata_keys_are_allowed(metadata: dict[str, Any]) -> None:
    event = _event(metadata=metadata)
    assert json.loads(event.canonical())["metadata"] == metadata


@pytest.mark.parametrize("key", ["sessionToken", "passwordHash", "totpSecret", "newPassword"])
def test_camel_case_secret_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidEvent, match="secret"):
        _event(metadata={key: "x"})


@pytest.mark.parametrize(
    "metadata",
    [{"ratio": 0.5}, {"n": 2.0}, {"deep": {"list": [1, 2, 3.25]}}],
)
def test_floats_are_refused(metadata: dict[str, Any]) -> None:
    with pytest.raises(InvalidEvent, match="floating-point"):
        _event(metadata=metadata)


@pytest.mark.parametrize("value", [1e16, float("inf"), float("nan")])
def test_floats_without_a_decimal_point_are_refused(value: float) -> None:
    # 1e16 is written without a ".", and NaN / Infinity are not JSON at all.
    with pytest.raises(InvalidEvent, match="floating-point"):
        _event(metadata={"value": value})


def test_metadata_that_is_not_plain_json_is_refused() -> None:
    with pytest.raises(InvalidEvent, match="plain JSON"):
        _event(metadata={"when": MOMENT})


def test_metadata_size_is_limited_in_utf8_bytes() -> None:
    small_enough = {"t": "a" * (MAX_METADATA_BYTES - 20)}
    _event(metadata=small_enough)
    # Fewer characters than the limit, but more bytes once encoded.
    with pytest.raises(InvalidEvent, match="bytes"):
        _event(metadata={"t": "é" * (MAX_METADATA_BYTES // 2 + 10)})


@pytest.mark.parametrize("action", ["auth.login.maybe", "", "AUTH.LOGIN.FAILED", "auth.login"])
def test_unknown_action_is_refused(action: str) -> None:
    assert action not in CATALOG
    with pytest.raises(InvalidEvent, match="unknown action"):
        _event(action=action)


def test_unknown_outcome_and_actor_type_are_refused() -> None:
    with pytest.raises(InvalidEvent, match="outcome"):
        _event(outcome="maybe")
    with pytest.raises(InvalidEvent, match="actor type"):
        _event(actor=Actor("robot", "1"))  # type: ignore[arg-type]


def test_every_catalog_action_makes_an_event() -> None:
    for action in CATALOG:
        assert json.loads(_event(action=action).canonical())["action"] == action


def test_fields_are_clipped_to_their_column_widths() -> None:
    event = _event(
        actor=Actor("user", "i" * 100, "l" * 400),
        target=Target("t" * 40, "g" * 100),
        reason="r" * 100,
        source=Source("1" * 60, "Ü" * 1000, "q" * 100),
    )
    doc = json.loads(event.canonical())
    assert doc["source"]["user_agent"] == "Ü" * 512
    assert doc["actor"] == {"type": "user", "id": "i" * 64, "label": "l" * 320}
    assert doc["target"] == {"type": "t" * 32, "id": "g" * 64}
    assert doc["reason"] == "r" * 64
    assert doc["source"]["ip"] == "1" * 45
    assert doc["request_id"] == "q" * 64


def test_short_fields_and_missing_target_are_kept_as_given() -> None:
    doc = _event(source=Source(None, "curl/8", None)).to_document()
    assert doc["source"] == {"ip": None, "user_agent": "curl/8"}
    assert doc["target"] is None and doc["request_id"] is None and doc["reason"] is None
