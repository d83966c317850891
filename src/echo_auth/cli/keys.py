"""``echo-auth keys``: signing keys."""

from __future__ import annotations

import click

from echo_auth.audit.events import Target
from echo_auth.cli.events import record_operator_event
from echo_auth.cli.main import CliContext, cli, fail, one_line_errors, pass_ctx
from echo_auth.identity.access_tokens import JwtKeyError


@cli.group()
def keys() -> None:
    """Signing keys (JWT access tokens)."""


@keys.command("rotate-jwt")
@pass_ctx
@one_line_errors
def rotate_jwt(ctx: CliContext) -> None:
    """Make a new JWT signing key; earlier keys stay in the JWKS until their tokens expire.

    Running servers pick the new key up on their next request.
    """
    tokens = ctx.runtime.access_tokens
    try:
        previous = tokens.signing_key.kid
        new = tokens.rotate()
    except JwtKeyError as exc:
        fail(str(exc))
        return
    published = [k.kid for k in tokens.live_keys()]
    record_operator_event(
        ctx.runtime,
        "system.jwt_key.rotated",
        target=Target("jwt_key", new.kid),
        metadata={"kid": new.kid, "previous_kid": previous, "published": published},
    )
    overlap = int(tokens.overlap.total_seconds())
    click.echo(
        f"new signing key {new.kid}; {previous} stays published for {overlap} s "
        f"(keys in {tokens.key_dir})"
    )
