"""``echo-auth db``: migrations."""

from __future__ import annotations

import os
from pathlib import Path

import click
import pymysql

from echo_auth.cli.events import record_operator_event
from echo_auth.cli.main import CliContext, cli, fail, one_line_errors, pass_ctx
from echo_auth.db import migrate
from echo_auth.ops.grants import (
    account_urls,
    apply_statements,
    new_passwords,
    plan_grants,
    statements_for,
)


@cli.group()
def db() -> None:
    """Database schema and users."""


@db.command("upgrade")
@pass_ctx
@one_line_errors
def upgrade(ctx: CliContext) -> None:
    """Run the migrations of both databases up to head."""
    runtime = ctx.runtime
    runtime.upgrade_databases()
    identity_rev = migrate.current_revision(runtime.identity)
    audit_rev = migrate.current_revision(runtime.audit)
    record_operator_event(
        runtime, "system.db.upgraded", metadata={"identity": identity_rev, "audit": audit_rev}
    )
    click.echo(f"identity database at {identity_rev}; audit database at {audit_rev}")


@db.command("grants")
@click.option("--apply", "do_apply", is_flag=True, help="Create the accounts and grants now.")
@click.option(
    "--client-host",
    default="127.0.0.1",
    show_default=True,
    help="Host part of the accounts ('%' for any host).",
)
@click.option(
    "--admin-url",
    help="mysql:// URL of an account allowed to create users (default: the database URLs').",
)
@click.option(
    "--prefix", default="echo", show_default=True, help="Account names are PREFIX_app and so on."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the generated settings to this file (mode 0600) instead of printing them.",
)
@pass_ctx
@one_line_errors
def grants(
    ctx: CliContext,
    do_apply: bool,
    client_host: str,
    admin_url: str | None,
    prefix: str,
    out: Path | None,
) -> None:
    """Print (or --apply) the least-privilege MySQL accounts: app, relay, auditor, owner."""
    settings = ctx.settings
    plan = plan_grants(settings.identity_db_url, settings.audit_db_url, client_host, prefix)
    databases = [plan.identity_db, plan.audit_db]
    if not do_apply:
        for database in databases:
            click.echo(f"-- on the server of {database}")
            for statement in statements_for(plan, database, None):
                click.echo(statement + ";")
        click.echo("-- run with --apply to create these accounts with generated passwords")
        return
    try:
        passwords = new_passwords()
        for database, url in (
            (plan.identity_db, settings.identity_db_url),
            (plan.audit_db, settings.audit_db_url),
        ):
            apply_statements(url, statements_for(plan, database, passwords), admin_url)
    except pymysql.MySQLError as exc:
        fail(f"could not apply grants: {exc.args[-1] if exc.args else exc}")
    serving, owner = account_urls(plan, settings.identity_db_url, settings.audit_db_url, passwords)
    text = (
        "# Echo's least-privilege accounts (generated once; store them in a secret store).\n"
        "# Serving (web app and relay):\n"
        + "".join(f"{k}={v}\n" for k, v in serving.items())
        + "# Owner, for `echo-auth db upgrade` and `db grants` only:\n"
        + "".join(f"# {k}={v}\n" for k, v in owner.items())
    )
    if out is not None:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(out, 0o600)
        click.echo(f"accounts created; settings written to {out} (mode 0600)")
    else:
        click.echo(text, nl=False)
    record_operator_event(
        ctx.runtime,
        "system.grants.applied",
        metadata={
            "accounts": [plan.account(role) for role in passwords],
            "client_host": client_host[:100],
        },
    )
