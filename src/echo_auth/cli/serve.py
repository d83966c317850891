"""``echo-auth serve`` and ``echo-auth relay``."""

from __future__ import annotations

import os
import signal
import threading
from datetime import timedelta
from types import FrameType
from typing import Any

import click

from echo_auth.audit.chain import ChainMoved
from echo_auth.audit.relay import AuditUnavailable, drain, run_relay, try_checkpoint
from echo_auth.cli.main import CliContext, cli, fail, one_line_errors, pass_ctx
from echo_auth.db import migrate
from echo_auth.db.engines import transaction
from echo_auth.identity.provisioning import issue_bootstrap_token
from echo_auth.observability import configure_logging


def _require_migrated(ctx: CliContext) -> None:
    runtime = ctx.runtime
    for name, engine in (("identity", runtime.identity), ("audit", runtime.audit)):
        if not migrate.is_at_head(engine, name):  # type: ignore[arg-type]
            fail(f"the {name} database is not migrated: run 'echo-auth db upgrade' first")


# proxy_headers off: which X-Forwarded-For hops to believe is Echo's own setting
# (ECHO_TRUSTED_PROXIES), not uvicorn's, and the extra middleware costs every request.
_UVICORN_OPTIONS: dict[str, Any] = {
    "access_log": False,
    "log_config": None,
    "proxy_headers": False,
    "server_header": False,
}


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--no-relay", is_flag=True, help="Do not run the audit relay in this process.")
@pass_ctx
@one_line_errors
def serve(ctx: CliContext, host: str, port: int, workers: int, no_relay: bool) -> None:
    """Run the web app (API and pages), with the audit relay in-process by default."""
    import uvicorn

    from echo_auth.app import create_app

    settings = ctx.settings
    settings.check_for_serving()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    _require_migrated(ctx)
    runtime = ctx.runtime
    with transaction(runtime.identity) as conn:
        token = issue_bootstrap_token(conn, timedelta(seconds=settings.bootstrap_token_ttl_s))
    if token is not None:
        base = f"http://{host}:{port}" if host not in ("0.0.0.0", "::") else settings.base_url  # noqa: S104
        click.echo(
            "\nNo users yet. Create the first admin (roles admin and auditor) with this "
            "one-time token, valid for "
            f"{settings.bootstrap_token_ttl_s // 3600} hours. Open this page in a browser:\n\n"
            f"  {base}/setup?token={token}\n\n"
            "or use the API:\n\n"
            f"  curl -X POST {base}/v1/setup -H 'content-type: application/json' \\\n"
            f'       -d \'{{"token": "{token}", "email": "you@example.com", '
            '"password": "choose-a-long-passphrase"}\'\n\n'
            "or from the terminal: echo-auth user create --email you@example.com "
            "--role admin --role auditor\n",
            err=True,
        )
    click.echo(
        f"Echo listening on http://{host}:{port} "
        f"({workers} worker{'s' if workers > 1 else ''}, relay {'off' if no_relay else 'on'})",
        err=True,
    )
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the
    # handler that was there before it started. Make that handler a no-op so that a
    # stopped server closes its resources and exits 0, as service managers expect.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    if workers == 1:
        app = create_app(
            settings, runtime=runtime, run_relay_in_process=not no_relay, freeze_gc=True
        )
        uvicorn.run(app, host=host, port=port, **_UVICORN_OPTIONS)
        return
    runtime.close()
    os.environ["ECHO_SERVE_RELAY"] = "0" if no_relay else "1"
    uvicorn.run(
        "echo_auth.app:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        **_UVICORN_OPTIONS,
    )


@cli.command()
@click.option("--once", is_flag=True, help="Deliver everything queued now, then exit.")
@pass_ctx
@one_line_errors
def relay(ctx: CliContext, once: bool) -> None:
    """Move audit events from the outbox into the hash-chained audit log."""
    _require_migrated(ctx)
    runtime = ctx.runtime
    configure_logging(ctx.settings.log_level, json_lines=ctx.settings.log_json)
    if once:
        try:
            moved = drain(runtime.relay_identity, runtime.audit, runtime.relay_policy)
        except AuditUnavailable as exc:
            if isinstance(exc.__cause__, ChainMoved):  # `audit migrate` sealed this one
                fail(str(exc))
            fail(f"the audit database is unreachable: {exc}")
        checkpoint = try_checkpoint(runtime.checkpointer)
        signed = f"; signed a checkpoint at seq {checkpoint.seq}" if checkpoint else ""
        click.echo(f"delivered {moved} events{signed}")
        return
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    click.echo("relay running; Ctrl-C to stop", err=True)
    run_relay(
        runtime.relay_identity,
        runtime.audit,
        runtime.relay_policy,
        stop,
        checkpointer=runtime.checkpointer,
    )
