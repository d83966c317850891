"""``echo-auth demo seed``: demo accounts and real activity on a fresh installation."""

from __future__ import annotations

import time

import click

from echo_auth.cli.main import CliContext, cli, one_line_errors, pass_ctx
from echo_auth.ops.demo import MAX_USERS, MIN_USERS, seed_demo


@cli.group()
def demo() -> None:
    """Demo data, so a fresh installation has something to show."""


@demo.command("seed")
@click.option(
    "--users",
    type=click.IntRange(MIN_USERS, MAX_USERS),
    default=30,
    show_default=True,
    help="How many users sign up (besides the admin and the auditor).",
)
@click.option("--force", is_flag=True, help="Seed even when the database already has users.")
@pass_ctx
@one_line_errors
def seed(ctx: CliContext, users: int, force: bool) -> None:
    """Create an admin, an auditor and users, then drive real activity through Echo.

    Prints every account's generated password once (they are stored only as argon2
    hashes). Refuses, with exit code 2, when the database already has users.
    """
    started = time.monotonic()
    runtime = ctx.runtime
    result = seed_demo(
        runtime, users=users, force=force, say=lambda line: click.echo(f"- {line}", err=True)
    )
    width = max(len(c.email) for c in result.credentials)
    click.echo("")
    click.echo("Demo accounts (passwords are shown only now):")
    click.echo(f"  {'email':<{width}}  {'password':<16}  {'roles':<14}  note")
    for c in result.credentials:
        roles = " ".join(c.roles)
        click.echo(f"  {c.email:<{width}}  {c.password:<16}  {roles:<14}  {c.note}".rstrip())
    click.echo("")
    status = "intact" if result.intact else "NOT intact"
    click.echo(
        f"{result.delivered} events in the audit chain, checkpoint signed at seq "
        f"{result.checkpoint_seq}, verify: {status} ({result.events_checked} events checked)"
    )
    base = runtime.settings.base_url.rstrip("/")
    admin = result.credentials[0]
    click.echo(f"Sign in at {base}/login as {admin.email}; the audit viewer is {base}/admin/audit")
    click.echo(f"(seeded in {time.monotonic() - started:.1f}s)", err=True)
