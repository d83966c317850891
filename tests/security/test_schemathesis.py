"""Schemathesis against ``/openapi.json``: every operation, in-process, on SQLite.

The engine that ``st run`` uses runs its four phases (explicit examples, the coverage
phase's boundary and negative values, random fuzzing, and stateful sequences through
inferred links) against the real app over the ASGI transport. Protected operations are
really exercised: every case carries a fresh session token of an ``admin`` + ``auditor``
user, so a fuzzed logout or "revoke other sessions" cannot lock the run out, and the
user is restored (enabled, both roles) before each case in case a fuzzed admin call
changed it.

Checks: no 5xx; status codes, content types, headers and bodies as the document says;
an operation that declares authentication refuses a request without it; invalid input
is refused; ``Allow`` lists what the path supports. Failures are shown with the request
that caused them. ``ECHO_FUZZ_EXAMPLES`` and ``ECHO_FUZZ_SEED`` tune a run by hand.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from schemathesis.engine import Status, events, from_schema
from sqlalchemy import update

from echo_auth.app import create_app
from echo_auth.audit.verify import verify_audit_log
from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import users
from echo_auth.identity.provisioning import create_user_by_operator
from echo_auth.identity.sessions import create_session
from echo_auth.runtime import Runtime, operator_actor
from tests.fixtures.app import PASSWORD, deliver
from tests.fixtures.db import Databases, make_settings

# About a minute of CPU for the four phases (one core of the CI machine); more finds more.
MAX_EXAMPLES = int(os.environ.get("ECHO_FUZZ_EXAMPLES", "30"))
SEED = int(os.environ.get("ECHO_FUZZ_SEED", "20260808"))
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
    "ignored_auth",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    "ensure_resource_availability",
)
# Operations that answer 2xx to any authenticated admin + auditor, whatever the input:
# seeing a 2xx from each proves the fuzzer got past authentication.
MUST_SUCCEED = {
    "GET /v1/me",
    "GET /v1/me/sessions",
    "POST /v1/me/sessions/revoke-others",
    "POST /v1/token",
    "POST /v1/logout",
    "POST /v1/me/mfa/totp",
    "GET /v1/admin/users",
    "GET /v1/audit/events",
    "GET /v1/audit/pipeline",
    "GET /v1/audit/verify",
    "GET /v1/audit/export",
    "POST /v1/signup",
    "POST /v1/password-reset",
}


@dataclass
class World:
    runtime: Runtime
    app: Any
    admin_id: str


@dataclass
class Outcome:
    failures: dict[tuple[str, str], str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    statuses: defaultdict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    phases: dict[str, str] = field(default_factory=dict)
    transitions: int = 0  # links between operations the stateful phase could follow
    stop_reason: str = ""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("fuzz")
    dbs = Databases("sqlite", f"sqlite:///{base / 'identity.db'}", f"sqlite:///{base / 'audit.db'}")
    settings = make_settings(base / "var", dbs)
    runtime = Runtime(settings, pool_size=4)
    runtime.upgrade_databases()
    actor, source = operator_actor()
    admin = create_user_by_operator(
        runtime.auth, "root@example.com", PASSWORD, ["admin", "auditor"], actor, source
    )
    app = create_app(settings, runtime=runtime)
    try:
        yield World(runtime, app, admin.id)
    finally:
        from schemathesis.python import asgi

        asgi.shutdown_lifespans()  # the app's lifespan, started by the ASGI transport
        runtime.close()


def _config() -> schemathesis.Config:
    checks: dict[str, Any] = {"enabled": False}
    checks.update({name: {"enabled": True} for name in CHECKS})
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "cache": {"enabled": False},
            "checks": checks,
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
        }
    )


def _fresh_session(world: World) -> str:
    """A new session of the admin, who is first put back as the run began."""
    runtime = world.runtime
    with transaction(runtime.identity) as conn:
        conn.execute(
            update(users)
            .where(users.c.id == world.admin_id)
            .values(disabled_at=None, roles="admin auditor user")
        )
        return create_session(
            conn, world.admin_id, runtime.session_policy, ip=None, user_agent="schemathesis"
        ).token


def _run(world: World) -> Outcome:
    schema = schemathesis.openapi.from_asgi("/openapi.json", world.app, config=_config())

    @schema.auth(refresh_interval=None)
    class FreshAdminSession:
        def get(self, case: schemathesis.Case, ctx: schemathesis.AuthContext) -> str:
            return _fresh_session(world)

        def set(self, case: schemathesis.Case, data: str, ctx: schemathesis.AuthContext) -> None:
            case.headers = case.headers or {}
            case.headers["Authorization"] = f"Bearer {data}"

    outcome = Outcome()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            _record(outcome, event)
        elif isinstance(event, events.NonFatalError | events.FatalError):
            outcome.errors.append(repr(event)[:2000])
        elif isinstance(event, events.PhaseStarted) and event.payload is not None:
            outcome.transitions = event.payload.transitions_total
        elif isinstance(event, events.PhaseFinished):
            outcome.phases[event.phase.name.value] = event.status.value
        elif isinstance(event, events.EngineFinished):
            outcome.stop_reason = event.stop_reason.value
    return outcome


def _record(outcome: Outcome, event: events.ScenarioFinished) -> None:
    recorder = event.recorder
    for case_id, interaction in recorder.interactions.items():
        if interaction.response is not None and case_id in recorder.cases:
            label = recorder.cases[case_id].value.operation.label
            outcome.statuses[label][interaction.response.status_code] += 1
    if event.status not in (Status.FAILURE, Status.ERROR):
        return
    for case_id, checks in recorder.checks.items():
        for check in checks:
            if check.failure_info is None:
                continue
            case = recorder.cases[case_id].value if case_id in recorder.cases else None
            label = case.operation.label if case is not None else str(recorder.label)
            key = (label, check.name)
            if key not in outcome.failures:
                shown = case.as_curl_command() if case is not None else "?"
                outcome.failures[key] = f"{check.failure_info.failure}\n    {shown}"[:3000]


@pytest.mark.slow
def test_every_operation_holds_to_its_schema(world: World) -> None:
    outcome = _run(world)

    report = "\n\n".join(
        f"[{label}] {check}:\n{text}" for (label, check), text in outcome.failures.items()
    )
    assert not outcome.failures, f"{len(outcome.failures)} schemathesis failures:\n\n{report}"
    assert not outcome.errors, "\n".join(outcome.errors)
    assert outcome.stop_reason == "completed"
    assert {"examples", "coverage", "fuzzing", "stateful"} <= {
        name for name, status in outcome.phases.items() if status in ("success", "failure")
    }, outcome.phases
    assert outcome.transitions > 0, "the stateful phase found no link to follow"

    # Every documented operation was called, and none ever answered 5xx.
    documented = {
        f"{method.upper()} {path}"
        for path, item in world.app.openapi()["paths"].items()
        for method in item
    }
    assert documented - set(outcome.statuses) == set()
    server_errors = {
        label: [s for s in counts if s >= 500] for label, counts in outcome.statuses.items()
    }
    assert not {k: v for k, v in server_errors.items() if v}, server_errors
    # The protected operations were exercised past authentication.
    never_ok = {
        label for label in MUST_SUCCEED if not any(200 <= s < 300 for s in outcome.statuses[label])
    }
    assert never_ok == set(), {label: dict(outcome.statuses[label]) for label in never_ok}

    # What the fuzzer did was recorded, and the audit chain it left still verifies.
    deliver(world.runtime)
    runtime = world.runtime
    with transaction(runtime.audit, write=False) as conn:
        verified = verify_audit_log(
            conn, public_key=runtime.checkpoint_public_key, sink=runtime.checkpoint_sink
        )
    assert verified.intact, verified.as_dict()
    assert verified.events_checked > 100
