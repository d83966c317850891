"""Operator commands are audited: each writes an event with the OS user and host as actor.

Which commands write one (docs/operations.md, "Operator access logging", has the table):

* every command that reads or changes data as an operator: ``db upgrade``,
  ``db grants --apply``, ``user *``, ``keys rotate-jwt``, ``audit search|export|verify|
  pipeline|dead-letters|checkpoint|migrate|ingest-db-log``, ``backup *``;
* not ``serve`` and ``relay`` (``--once`` too): they are the system at work, and what they
  do is recorded as system events (``system.started``, the events they deliver, signed
  checkpoints); not ``db grants`` without ``--apply`` and ``audit checkpoint
  --public-key``: they print from configuration and public key material, no data.

A refused command is recorded too (:func:`record_refusal`, called by ``fail``): under its
own action when it has one (``user disable`` -> ``admin.user.disabled``), else
``admin.command.refused``, with outcome ``failure`` (or ``denied``), the reason code and
the error line. Click's own usage errors (unknown option, bad choice) are not: they stop
before the command runs and touch nothing.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import click

from echo_auth.audit.events import AuditEvent, Outcome, Target
from echo_auth.audit.outbox import enqueue_event
from echo_auth.db.engines import transaction
from echo_auth.runtime import Runtime, operator_actor

_SECRET_OPTIONS = ("--password",)
# user:password@ in any database URL given on the command line (--to, --admin-url, ...).
# Greedy to the last "@": over-hiding is harmless, a password holding "@" must not leak.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)\S*@")

# The action a refused command is recorded under: its own, so that a search for the
# action shows the attempts as well as the successes.
REFUSAL_ACTIONS: dict[str, str] = {
    "db upgrade": "system.db.upgraded",
    "db grants": "system.grants.applied",
    "user create": "user.signed_up",
    "user disable": "admin.user.disabled",
    "user enable": "admin.user.enabled",
    "user roles": "admin.user.roles_changed",
    "user unlock": "account.unlocked",
    "keys rotate-jwt": "system.jwt_key.rotated",
    "audit search": "audit.searched",
    "audit export": "audit.exported",
    "audit verify": "audit.verified",
    "audit pipeline": "audit.pipeline.viewed",
    "audit dead-letters": "audit.pipeline.viewed",
    "audit checkpoint": "system.checkpoint.signed",
    "audit migrate": "system.audit.migrated",
    "audit ingest-db-log": "system.db.admin_log.ingested",
    "backup create": "system.backup.created",
    "backup restore": "system.backup.restored",
}
FALLBACK_REFUSAL_ACTION = "admin.command.refused"
# System work, not an operator's access to data (see the module docstring).
NOT_OPERATOR_ACCESS = frozenset({"serve", "relay"})
# Flags that make a command a print-out of configuration or public material.
_PRINT_ONLY = {"db grants": ("do_apply", False), "audit checkpoint": ("show_key", True)}
_RECORDED = "echo_auth.recorded_outcomes"


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
    return " ".join(["echo-auth", *(hide_url_passwords(a) for a in args)])[:500]


def operator_context() -> dict[str, Any]:
    """Metadata that ties an event made by a domain service to the command that made it."""
    return {"command": command_line()}


def hide_url_passwords(text: str) -> str:
    """``mysql://u:secret@h/db`` -> ``mysql://u:***@h/db``, anywhere in ``text``."""
    return _URL_PASSWORD.sub(lambda m: m.group("head") + "***@", text)


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
    context = click.get_current_context(silent=True)
    if context is not None:
        # Seen by record_refusal: a command that recorded its own failure is not recorded twice.
        context.meta.setdefault(_RECORDED, []).append(outcome)
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


def command_path(context: click.Context) -> str:
    """``user create`` for ``echo-auth user create ...`` (however the program was named)."""
    names: list[str] = []
    while context.parent is not None:
        names.append(context.info_name or "")
        context = context.parent
    return " ".join(reversed(names))


def is_operator_access(path: str, params: dict[str, Any]) -> bool:
    if path.split(" ", 1)[0] in NOT_OPERATOR_ACCESS:
        return False
    flag = _PRINT_ONLY.get(path)
    return flag is None or params.get(flag[0]) != flag[1]


def record_refusal(message: str, reason: str, outcome: Outcome = "failure") -> str:
    """Record the refusal of the running command; never raises.

    Returns ``""`` when it was recorded (or there was nothing to record), else a note for
    the error line saying that it could not be, and why (the identity database, where
    the outbox lives, is unreachable or not set up; the settings are invalid).
    """
    context = click.get_current_context(silent=True)
    if context is None:
        return ""
    path = command_path(context)
    if not path or not is_operator_access(path, context.params):
        return ""
    if any(o != "success" for o in context.meta.get(_RECORDED, [])):
        return ""  # the command recorded this failure itself
    cli_context = context.find_root().obj
    try:
        runtime: Runtime = cli_context.runtime
        record_operator_event(
            runtime,
            REFUSAL_ACTIONS.get(path, FALLBACK_REFUSAL_ACTION),
            outcome=outcome,
            reason=reason[:64],
            metadata={"error": hide_url_passwords(message)[:300]},
        )
    except Exception as exc:  # whatever it is, the refusal itself must still be shown
        lines = str(getattr(exc, "orig", None) or exc).splitlines()
        why = lines[0][:120] if lines else type(exc).__name__
        if why in message:  # the same trouble that refused the command
            return "; this refusal could not be recorded in the audit log either"
        return f"; this refusal could not be recorded in the audit log ({why})"
    return ""
