"""``echo-auth db``: migrations."""

from __future__ import annotations

import click

from echo_auth.cli.events import record_operator_event
from echo_auth.cli.main import CliContext, cli, one_line_errors, pass_ctx
from echo_auth.db import migrate


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
