"""``echo-auth user``: accounts from the terminal."""

from __future__ import annotations

import sys

import click

from echo_auth.cli.events import operator_context
from echo_auth.cli.main import CliContext, cli, fail, one_line_errors, pass_ctx
from echo_auth.identity.provisioning import create_user_by_operator
from echo_auth.identity.users import ROLES
from echo_auth.runtime import operator_actor


@cli.group()
def user() -> None:
    """Create and manage accounts."""


def read_password() -> str:
    """From a prompt on a terminal (asked twice), else the first line of stdin."""
    if sys.stdin.isatty():
        return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))
    line = sys.stdin.readline()
    if not line:
        fail("no password on stdin")
    return line.rstrip("\r\n")


@user.command("create")
@click.option("--email", required=True, help="The account's email address.")
@click.option(
    "--role",
    "roles",
    multiple=True,
    type=click.Choice(ROLES),
    help="A role to grant (repeatable); every account has 'user'.",
)
@pass_ctx
@one_line_errors
def create(ctx: CliContext, email: str, roles: tuple[str, ...]) -> None:
    """Create an account; the password comes from a prompt or stdin."""
    password = read_password()
    actor, source = operator_actor()
    created = create_user_by_operator(
        ctx.runtime.auth, email, password, list(roles), actor, source, context=operator_context()
    )
    click.echo(f"created {created.email} ({created.id}) with roles {' '.join(created.roles)}")


@user.command("disable")
@click.argument("email")
@pass_ctx
@one_line_errors
def disable(ctx: CliContext, email: str) -> None:
    """Disable an account: login refused, every session revoked."""
    admin = ctx.runtime.admin
    actor, source = operator_actor()
    revoked = admin.disable(actor, source, admin.find_by_email(email), context=operator_context())
    click.echo(f"disabled {email}; {revoked} sessions revoked")


@user.command("enable")
@click.argument("email")
@pass_ctx
@one_line_errors
def enable(ctx: CliContext, email: str) -> None:
    """Enable a disabled account."""
    admin = ctx.runtime.admin
    actor, source = operator_actor()
    admin.enable(actor, source, admin.find_by_email(email), context=operator_context())
    click.echo(f"enabled {email}")


@user.command("roles")
@click.argument("email")
@click.argument("roles", nargs=-1, type=click.Choice(ROLES))
@pass_ctx
@one_line_errors
def roles(ctx: CliContext, email: str, roles: tuple[str, ...]) -> None:
    """Set an account's roles (every account keeps 'user')."""
    admin = ctx.runtime.admin
    actor, source = operator_actor()
    updated = admin.set_roles(
        actor, source, admin.find_by_email(email), list(roles), context=operator_context()
    )
    click.echo(f"{email}: {' '.join(updated.roles)}")


@user.command("unlock")
@click.argument("email")
@pass_ctx
@one_line_errors
def unlock(ctx: CliContext, email: str) -> None:
    """Lift a brute-force lock on an account."""
    admin = ctx.runtime.admin
    actor, source = operator_actor()
    lifted = admin.unlock(actor, source, admin.find_by_email(email), context=operator_context())
    click.echo(f"{email}: {'unlocked' if lifted else 'was not locked'}")
