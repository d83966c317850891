"""``echo-auth audit``: search, verify and the pipeline's health."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click
from sqlalchemy.exc import DBAPIError

from echo_auth.audit.checkpoints import public_key_pem
from echo_auth.audit.dead_letters import list_dead_letters, retry_dead_letters
from echo_auth.audit.events import Target
from echo_auth.audit.export import FORMATS, ExportPlan, check_format, export_events, plan_export
from echo_auth.audit.pipeline import pipeline_status
from echo_auth.audit.search import filter_from_text, search_events
from echo_auth.audit.verify import count_events, verify_audit_log
from echo_auth.cli.events import record_operator_event
from echo_auth.cli.main import EXIT_CHECK_FAILED, CliContext, cli, fail, one_line_errors, pass_ctx
from echo_auth.cli.progress import progress_bar
from echo_auth.db.engines import transaction
from echo_auth.runtime import Runtime, operator_actor


@cli.group()
def audit() -> None:
    """Review the audit log and check its integrity."""


@audit.command("search")
@click.option("--actor", help="Actor id or label (email).")
@click.option("--action", help="Exact action, or a prefix ending in '*' (auth.login.*).")
@click.option("--target", help="Target id.")
@click.option("--outcome", type=click.Choice(["success", "failure", "denied"]))
@click.option("--ip", help="Source IP address.")
@click.option("--since", help="ISO 8601 time, inclusive.")
@click.option("--until", help="ISO 8601 time, exclusive.")
@click.option("-q", "--query", "q", help="Free text found anywhere in the event.")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--cursor", help="Continue from a previous page's next cursor.")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@pass_ctx
@one_line_errors
def search(
    ctx: CliContext,
    actor: str | None,
    action: str | None,
    target: str | None,
    outcome: str | None,
    ip: str | None,
    since: str | None,
    until: str | None,
    q: str | None,
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    """Search events, newest first."""
    f = filter_from_text(
        actor=actor,
        action=action,
        target=target,
        outcome=outcome,
        ip=ip,
        since=since,
        until=until,
        q=q,
    )
    runtime = ctx.runtime
    with transaction(runtime.audit_reader, write=False) as conn:
        page = search_events(conn, f, cursor=cursor, limit=limit)
    record_operator_event(
        runtime, "audit.searched", metadata={"filters": f.describe(), "returned": len(page.events)}
    )
    for event in page.events:
        if as_json:
            click.echo(json.dumps(event, ensure_ascii=False))
        else:
            actor_text = event["actor"].get("label") or event["actor"].get("id") or "-"
            target_text = (event.get("target") or {}).get("id") or "-"
            click.echo(
                f"{event['seq']:>8}  {event['occurred_at']}  {event['action']:<28} "
                f"{event['outcome']:<8} {actor_text}  -> {target_text}"
                + (f"  ({event['reason']})" if event.get("reason") else "")
            )
    if page.next_cursor and not as_json:
        click.echo(f"more: --cursor {page.next_cursor}", err=True)


@audit.command("verify")
@click.option("--json", "as_json", is_flag=True, help="The full report as JSON.")
@pass_ctx
@one_line_errors
def verify(ctx: CliContext, as_json: bool) -> None:
    """Recompute the hash chain; exit 0 if intact, 1 if tampered, 2 if it could not run."""
    runtime = ctx.runtime
    public_key = runtime.checkpoint_public_key
    with transaction(runtime.audit_reader, write=False) as conn:
        total = count_events(conn)
        with progress_bar("verifying", total) as advance:
            report = verify_audit_log(
                conn, public_key=public_key, sink=runtime.checkpoint_sink, progress=advance
            )
    record_operator_event(
        runtime,
        "audit.verified",
        outcome="success" if report.intact else "failure",
        reason=None if report.intact else "tampered",
        metadata={
            "events_checked": report.events_checked,
            "problems": report.problems_total + len(report.checkpoint_issues),
        },
    )
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for problem in report.problems:
            click.echo(problem.describe())
        for issue in report.checkpoint_issues:
            click.echo(issue.describe())
        click.echo(report.summary())
    if not report.intact:
        sys.exit(EXIT_CHECK_FAILED)


@audit.command("pipeline")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@one_line_errors
def pipeline(ctx: CliContext, as_json: bool) -> None:
    """Outbox depth, oldest undelivered age, delivered count, dead letters."""
    runtime = ctx.runtime
    with transaction(runtime.identity, write=False) as iconn:
        try:
            with transaction(runtime.audit_reader, write=False) as aconn:
                status = pipeline_status(iconn, aconn)
        except DBAPIError:
            status = pipeline_status(iconn, None)
    record_operator_event(runtime, "audit.pipeline.viewed")
    if as_json:
        click.echo(json.dumps(status.as_dict()))
        return
    age = status.oldest_undelivered_age_s
    click.echo(f"outbox depth:          {status.outbox_depth}")
    click.echo(f"oldest undelivered:    {'-' if age is None else f'{age:.1f}s'}")
    delivered = "unreachable" if status.delivered is None else status.delivered
    click.echo(f"delivered (head seq):  {delivered}")
    click.echo(f"dead letters:          {status.dead_letters}")


@audit.command("dead-letters")
@click.option("--retry", is_flag=True, help="Put every dead letter back on the queue.")
@pass_ctx
@one_line_errors
def dead_letters(ctx: CliContext, retry: bool) -> None:
    """List events the relay gave up on, or retry them."""
    runtime = ctx.runtime
    if retry:
        actor, _ = operator_actor()
        with transaction(runtime.identity) as conn:
            moved = retry_dead_letters(conn, actor)
        if moved == 0:
            # Each retried letter records system.dead_letter.retried; with none, the
            # operator still looked at the table.
            record_operator_event(
                runtime,
                "audit.pipeline.viewed",
                target=Target("dead_letters"),
                metadata={"retried": 0},
            )
        click.echo(f"{moved} dead letters put back on the queue")
        return
    with transaction(runtime.identity, write=False) as conn:
        letters = list_dead_letters(conn)
    record_operator_event(runtime, "audit.pipeline.viewed", target=Target("dead_letters"))
    if not letters:
        click.echo("no dead letters")
    for letter in letters:
        click.echo(
            f"{letter.event_id}  attempts={letter.attempts}  "
            f"dead_at={letter.dead_at:%Y-%m-%dT%H:%M:%SZ}  error={letter.last_error}"
        )


@audit.command("checkpoint")
@click.option("--public-key", "show_key", is_flag=True, help="Print the public key (PEM) and exit.")
@pass_ctx
@one_line_errors
def checkpoint(ctx: CliContext, show_key: bool) -> None:
    """Sign a checkpoint of the chain head now (database and checkpoint directory)."""
    runtime = ctx.runtime
    if show_key:
        key = runtime.checkpoint_public_key
        if key is None:
            fail("no checkpoint key yet: nothing has been signed by this installation")
        assert key is not None
        click.echo(public_key_pem(key), nl=False)
        return
    made = runtime.checkpointer.maybe_checkpoint(force=True)
    if made is None:  # only when the log was moved to another server
        from echo_auth.ops.split import moved_to

        fail(
            f"this audit database was moved to {moved_to(runtime.audit)}: sign checkpoints "
            "there (set ECHO_AUDIT_DB_URL to the new server)",
            reason="audit_database_moved",
        )
        return
    record_operator_event(
        runtime, "system.checkpoint.signed", metadata={"seq": made.seq, "key_id": made.key_id}
    )
    click.echo(
        f"signed checkpoint at seq {made.seq} hash {made.hash} "
        f"-> {runtime.checkpoint_sink.directory / made.file_stem}.json"
    )


_F = TypeVar("_F", bound=Callable[..., Any])


def _filter_options(fn: _F) -> _F:
    """The filters of ``audit search``, for commands that select events the same way."""
    for option in reversed(
        [
            click.option("--actor", help="Actor id or label (email)."),
            click.option("--action", help="Exact action, or a prefix ending in '*'."),
            click.option("--target", help="Target id."),
            click.option("--outcome", help="success, failure or denied."),
            click.option("--ip", help="Source IP address."),
            click.option("--since", help="ISO 8601 time, inclusive."),
            click.option("--until", help="ISO 8601 time, exclusive."),
            click.option("-q", "--query", "q", help="Free text found anywhere in the event."),
        ]
    ):
        fn = option(fn)
    return fn


@audit.command("export")
@click.option(
    "--format",
    "fmt",
    default="jsonl",
    show_default=True,
    metavar="|".join(FORMATS),
    help="jsonl (events with seq and hash), csv (spreadsheet-safe) or ocsf (OCSF 1.5 JSON).",
)
@_filter_options
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to FILE (replaced only when complete) instead of stdout.",
)
@pass_ctx
@one_line_errors
def export(
    ctx: CliContext,
    fmt: str,
    actor: str | None,
    action: str | None,
    target: str | None,
    outcome: str | None,
    ip: str | None,
    since: str | None,
    until: str | None,
    q: str | None,
    output: Path | None,
) -> None:
    """Export matching events, oldest first, up to the chain head as it is now."""
    check_format(fmt)
    f = filter_from_text(
        actor=actor,
        action=action,
        target=target,
        outcome=outcome,
        ip=ip,
        since=since,
        until=until,
        q=q,
    )
    runtime = ctx.runtime
    with transaction(runtime.audit_reader, write=False) as conn:
        plan = plan_export(conn, f, fmt)
    to_file = output is not None and str(output) != "-"
    # Recorded before the first line is written: an export cut short was still taken.
    record_operator_event(
        runtime,
        "audit.exported",
        metadata={**plan.describe(), "output": str(output) if to_file else "stdout"},
    )
    if not to_file:
        try:
            _write_export(runtime, plan, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # e.g. piped into head: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)  # incomplete, but not worth a message
        return
    assert output is not None
    partial = output.with_name(output.name + ".part")
    try:
        with partial.open("w", encoding="utf-8", newline="") as out:
            _write_export(runtime, plan, out)
        partial.replace(output)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        fail(f"cannot write {output}: {exc.strerror or exc}")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    click.echo(f"exported {plan.count} events ({plan.fmt}) to {output}", err=True)


def _write_export(runtime: Runtime, plan: ExportPlan, out: TextIO) -> None:
    with (
        transaction(runtime.audit_reader, write=False) as conn,
        progress_bar("exporting", plan.count) as advance,
    ):
        lines = export_events(conn, plan.filter, plan.fmt, through_seq=plan.through_seq)
        if plan.fmt == "csv":
            out.write(next(lines))  # the header row is not an event
        pending: list[str] = []
        for line in lines:
            pending.append(line)
            if len(pending) == 500:
                out.write("".join(pending))
                advance(len(pending))
                pending.clear()
        out.write("".join(pending))
        advance(len(pending))


# Registers `audit migrate` and `audit ingest-db-log` on the group above.
from echo_auth.cli import audit_ops  # noqa: E402, F401
