"""Operator commands are audited: each writes an event with the OS user and host as actor."""

from __future__ import annotations

import sys
from typing import Any

from echo_auth.audit.events import AuditEvent, Outcome, Target
from echo_auth.audit.outbox import enqueue_event
from echo_auth.db.engines import transaction
from echo_auth.runtime import Runtime, operator_actor

_SECRET_OPTIONS = ("--password",)


def command_line() -> str:
    """The command as typed, without values of options that could carry a secret."""
    args: list[str] = []
    skip = False
    for arg in sys.argv[1:]:
        if skip:
            args.append("***")
            skip = False
            continue
        if arg in _SECRET_OPTIONS:
            skip = True
        args.append(
            arg.split("=", 1)[0] + "=***" if arg.startswith(_SECRET_OPTIONS) and "=" in arg else arg
        )
    return " ".join(["echo-auth", *args])[:500]


def record_operator_event(
    runtime: Runtime,
    action: str,
    *,
    outcome: Outcome = "success",
    target: Target | None = None,
    reason: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    actor, source = operator_actor()
    with transaction(runtime.identity) as conn:
        enqueue_event(
            conn,
            AuditEvent(
                action=action,
                outcome=outcome,
                actor=actor,
                target=target,
                reason=reason,
                source=source,
                metadata={"command": command_line(), **(metadata or {})},
            ),
        )
