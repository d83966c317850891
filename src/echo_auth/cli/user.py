"""``echo-auth user``: accounts from the terminal."""

from __future__ import annotations

import sys

import click

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
    created = create_user_by_operator(ctx.runtime.auth, email, password, list(roles), actor, source)
    click.echo(f"created {created.email} ({created.id}) with roles {' '.join(created.roles)}")
