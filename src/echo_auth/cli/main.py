"""``echo-auth``: the command line. Errors are one line on stderr; exit codes 0, 1, 2.

Settings are loaded lazily, when a command first needs them, so ``--help`` works anywhere.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click
from sqlalchemy.exc import DBAPIError

from echo_auth.audit.checkpoints import CheckpointKeyError
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


def fail(message: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"echo-auth: {message}", err=True)
    sys.exit(code)


def one_line_errors(fn: F) -> F:
    """Turn the errors a user can cause into one line on stderr and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigurationError, DomainError, InvalidQuery, CheckpointKeyError) as exc:
            fail(str(getattr(exc, "message", exc)))
        except DBAPIError as exc:
            reason = str(getattr(exc, "orig", exc)).splitlines()[0][:300]
            fail(f"database error: {reason}")

    return wrapper  # type: ignore[return-value]


pass_ctx = click.make_pass_decorator(CliContext)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="echo-auth")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Echo: identity service with a tamper-evident audit log."""
    obj = CliContext()
    ctx.obj = obj
    ctx.call_on_close(obj.close)


def main() -> None:
    from echo_auth.cli import audit, db, keys, serve, user  # noqa: F401 - registers the commands

    try:
        cli.main(standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("echo-auth: interrupted", err=True)
        sys.exit(130)
