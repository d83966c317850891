"""``echo-auth audit migrate`` and ``audit ingest-db-log``: the audit database's moves
and the database server's own audit log (split from cli/audit.py)."""

from __future__ import annotations

from pathlib import Path

import click

from echo_auth.audit.events import Target
from echo_auth.cli.audit import audit
from echo_auth.cli.events import record_operator_event
from echo_auth.cli.main import EXIT_CHECK_FAILED, CliContext, fail, one_line_errors, pass_ctx
from echo_auth.cli.progress import progress_bar

# -- moving the audit database; the database server's own audit log ------------------------


@audit.command("migrate")
@click.option(
    "--to",
    "to_url",
    required=True,
    metavar="URL",
    help="An EMPTY database on the new server, e.g. mysql://user:pass@host:3306/echo_audit.",
)
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 5000))
@pass_ctx
@one_line_errors
def migrate_to(ctx: CliContext, to_url: str, batch_size: int) -> None:
    """Copy the audit database to an empty database on another server, and verify it.

    When the copy checks out, the old audit database is sealed: relays still pointed at
    it deliver nothing more (events wait in the outbox) until they point at the new one.
    Runbook: docs/operations.md, "Moving the audit database to its own server".
    """
    from echo_auth.db.engines import make_engine
    from echo_auth.ops.split import SplitFailed, SplitRefused, move_audit_log, redact_url

    runtime, settings = ctx.runtime, ctx.settings
    target = make_engine(to_url, pool_size=2)
    try:
        result = move_audit_log(
            runtime.audit_reader,
            runtime.audit,
            target,
            public_key=runtime.checkpoint_public_key,
            sink=runtime.checkpoint_sink,
            batch_size=batch_size,
            progress=progress_bar,
            source_label=redact_url(settings.audit_db_url),
            target_label=redact_url(to_url),
        )
    except SplitRefused as exc:
        fail(str(exc), reason=exc.code)
        return
    except SplitFailed as exc:
        for problem in exc.report.problems[:20] if exc.report else []:
            click.echo(problem.describe())
        fail(
            f"{exc}; the old audit database stays in service (unsealed): switch nothing",
            EXIT_CHECK_FAILED,
            reason=exc.code,
        )
        return
    finally:
        target.dispose()
    record_operator_event(
        runtime,
        "system.audit.migrated",
        target=Target("audit_database"),
        metadata=result.as_metadata(),
    )
    new_url = redact_url(to_url)
    lines = [
        f"copied {result.events_copied} events and {result.checkpoints_copied} checkpoints "
        f"to {new_url}",
        f"the copy verifies: {result.report.summary()}",
        f"both heads: seq {result.head_seq}, hash {result.head_hash}",
    ]
    if result.events_after_start:
        lines.append(
            f"{result.events_after_start} events reached the old database during the copy "
            "(relays were running); they were copied too"
        )
    lines += [
        "the old audit database is sealed: relays still pointed at it deliver nothing; "
        "events wait in the outbox",
        "",
        "Change this one setting wherever Echo runs (web app, relays, CLI):",
        f"  ECHO_AUDIT_DB_URL={new_url}",
        "then (re)start the relays (`echo-auth relay`, or `serve` without --no-relay): they "
        "drain the outbox into the new server.",
    ]
    if settings.audit_read_db_url != settings.audit_db_url:
        lines.append(
            "ECHO_AUDIT_READ_DB_URL is set and still names the old server: point it at the "
            "new one too (search, export and verify read through it)."
        )
    lines += [
        "Least-privilege accounts: run `echo-auth db grants --apply` with ECHO_AUDIT_DB_URL "
        "set to the new server's admin URL, then use the ECHO_AUDIT_DB_URL (relay) and "
        "ECHO_AUDIT_READ_DB_URL (auditor) lines it prints.",
        'Runbook: docs/operations.md, "Moving the audit database to its own server".',
    ]
    click.echo("\n".join(lines))


@audit.command("ingest-db-log")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--accounts",
    help="Comma-separated database accounts to import (default: root and every *_owner).",
)
@click.option(
    "--tz",
    "tz_name",
    help="The database server's time zone, e.g. UTC (default: this machine's).",
)
@pass_ctx
@one_line_errors
def ingest_db_log(
    ctx: CliContext, files: tuple[Path, ...], accounts: str | None, tz_name: str | None
) -> None:
    """Import MariaDB server_audit lines of privileged accounts as audit events.

    Each CONNECT, QUERY, FAILED_CONNECT (...) line becomes a system.db.admin_access
    event. Idempotent: lines imported before are skipped, so a cron job may re-read the
    log and its rotated predecessor (server_audit.log.1 server_audit.log) every time.
    """
    from contextlib import ExitStack
    from datetime import tzinfo
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from echo_auth.ops.db_access_log import ingest

    tz: tzinfo | None = None
    if tz_name:
        try:
            tz = ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError):
            fail(f"unknown time zone {tz_name!r} (use an IANA name such as UTC)")
    wanted = None
    if accounts is not None:
        wanted = frozenset(a.strip() for a in accounts.split(",") if a.strip())
        if not wanted:
            fail("--accounts names no account")
    # A file that is not there yet (the rotated one, before the first rotation) is
    # skipped with a warning, so that a cron line can always name both.
    missing = [path for path in files if not path.is_file()]
    files = tuple(path for path in files if path.is_file())
    for path in missing:
        click.echo(f"echo-auth: warning: {path} is not a file; skipped", err=True)
    if not files:
        fail("none of the given log files exists", reason="no_log_file")
    runtime = ctx.runtime
    with ExitStack() as stack:
        sources = [
            (str(path), stack.enter_context(path.open(encoding="utf-8", errors="replace")))
            for path in files
        ]
        report = ingest(sources, runtime.identity, runtime.audit_reader, accounts=wanted, tz=tz)
    record_operator_event(
        runtime,
        "system.db.admin_log.ingested",
        metadata={
            "files": [str(path)[:200] for path in files[:10]],
            "accounts": sorted(wanted) if wanted else ["root", "*_owner"],
            **report.as_metadata(),
        },
    )
    click.echo(f"{' '.join(str(p) for p in files)}: {report.summary()}")
    if report.malformed:
        click.echo(
            f"echo-auth: warning: {report.malformed} malformed lines skipped "
            f"(first at {', '.join(report.malformed_at)})",
            err=True,
        )
    if not report.audit_checked:
        click.echo(
            "echo-auth: warning: the audit database was unreachable; lines were checked "
            "against the outbox only (the relay skips events the log already has)",
            err=True,
        )
