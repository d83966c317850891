"""``echo-auth``: the command line. Errors are one line on stderr; exit codes 0, 1, 2.

Settings are loaded lazily, when a command first needs them, so ``--help`` works anywhere.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click
from sqlalchemy.exc import DBAPIError

from echo_auth.audit.checkpoints import CheckpointKeyError
from echo_auth.audit.events import Outcome
from echo_auth.audit.search import InvalidQuery
from echo_auth.config import ConfigurationError, Settings, load_settings
from echo_auth.identity.errors import DomainError
from echo_auth.runtime import Runtime

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


class CliContext:
    def __init__(self) -> None:
        self._settings: Settings | None = None
        self._runtime: Runtime | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings()
        return self._settings

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            self._runtime = Runtime(self.settings, pool_size=2)
        return self._runtime

    def close(self) -> None:
        if self._runtime is not None:
            self._runtime.close()


def fail(
    message: str,
    code: int = EXIT_USAGE,
    *,
    reason: str = "refused",
    outcome: Outcome = "failure",
    recorded: bool = False,
) -> None:
    """One line on stderr, then exit. A refused operator command is an audit event too
    (see cli/events.py): ``reason`` is its short code; ``recorded=True`` when the refusal's
    event was already written (a domain refusal that keeps its work). Where it cannot be
    recorded (the identity database is unreachable) the line says so."""
    from echo_auth.cli.events import record_refusal  # events imports this module

    note = "" if recorded else record_refusal(message, reason, outcome)
    click.echo(f"echo-auth: {message}{note}", err=True)
    sys.exit(code)


# MySQL errors that mean "not allowed": the refusal is recorded as denied.
_ACCESS_DENIED = {1044, 1045, 1142, 1143, 1227, 1370}
_DENIED_CODES = {"forbidden", "last_admin"}


def one_line_errors(fn: F) -> F:
    """Turn the errors a user can cause into one line on stderr and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DomainError as exc:
            outcome: Outcome = "denied" if exc.code in _DENIED_CODES else "failure"
            fail(exc.message, reason=exc.code, outcome=outcome, recorded=exc.keep_work)
        except ConfigurationError as exc:
            fail(str(exc), reason="configuration_error")
        except InvalidQuery as exc:
            fail(str(getattr(exc, "message", exc)), reason="invalid_query")
        except CheckpointKeyError as exc:
            fail(str(exc), reason="checkpoint_key")
        except DBAPIError as exc:
            reason = str(getattr(exc, "orig", exc)).splitlines()[0][:300]
            orig_args: tuple[Any, ...] = getattr(exc.orig, "args", ())
            denied = bool(orig_args) and orig_args[0] in _ACCESS_DENIED
            fail(
                f"database error: {reason}",
                reason="database_access_denied" if denied else "database_error",
                outcome="denied" if denied else "failure",
            )

    return wrapper  # type: ignore[return-value]


pass_ctx = click.make_pass_decorator(CliContext)


# Command groups and the module that defines each. Modules are imported when their command
# runs, so `echo-auth relay` does not pay for importing the web app, alembic or backups.
_COMMAND_MODULES = {
    "audit": "echo_auth.cli.audit",
    "backup": "echo_auth.cli.backup",
    "db": "echo_auth.cli.db",
    "demo": "echo_auth.cli.demo",
    "keys": "echo_auth.cli.keys",
    "relay": "echo_auth.cli.serve",
    "serve": "echo_auth.cli.serve",
    "user": "echo_auth.cli.user",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_COMMAND_MODULES))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in _COMMAND_MODULES:
            importlib.import_module(_COMMAND_MODULES[cmd_name])  # registers it on `cli`
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="echo-auth")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Echo: identity service with a tamper-evident audit log."""
    obj = CliContext()
    ctx.obj = obj
    ctx.call_on_close(obj.close)


def main() -> None:
    try:
        # Not standalone: click's own reports of a bad argument take four lines (usage,
        # hint, blank, error); the contract is one line on stderr.
        returned = cli.main(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # a group named without a command: its help, as click shows it
        sys.exit(EXIT_USAGE)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "echo-auth"
        click.echo(f"echo-auth: {_one_line(exc.format_message())} (see '{where} --help')", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        click.echo(f"echo-auth: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort as exc:
        interrupted = isinstance(exc.__cause__, KeyboardInterrupt)
        click.echo(f"echo-auth: {'interrupted' if interrupted else 'aborted'}", err=True)
        sys.exit(130 if interrupted else EXIT_CHECK_FAILED)
    except KeyboardInterrupt:
        click.echo("echo-auth: interrupted", err=True)
        sys.exit(130)
    # --help and --version end with an exit code; commands return None or exit themselves.
    sys.exit(returned if isinstance(returned, int) else EXIT_OK)


def _one_line(message: str) -> str:
    return " ".join(message.split())
