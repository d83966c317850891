"""``echo-auth audit``: search, verify and the pipeline's health."""

from __future__ import annotations

import json
import sys

import click
from sqlalchemy.exc import DBAPIError

from echo_auth.audit.checkpoints import public_key_pem
from echo_auth.audit.dead_letters import list_dead_letters, retry_dead_letters
from echo_auth.audit.events import Target
from echo_auth.audit.pipeline import pipeline_status
from echo_auth.audit.search import EventFilter, parse_time, search_events
from echo_auth.audit.verify import count_events, verify_audit_log
from echo_auth.cli.events import record_operator_event
from echo_auth.cli.main import EXIT_CHECK_FAILED, CliContext, cli, one_line_errors, pass_ctx
from echo_auth.cli.progress import progress_bar
from echo_auth.db.engines import transaction
from echo_auth.runtime import operator_actor


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
    f = EventFilter(
        actor=actor,
        action=action,
        target=target,
        outcome=outcome,
        ip=ip,
        since=parse_time("since", since),
        until=parse_time("until", until),
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
        click.echo(public_key_pem(runtime.checkpoint_key.public_key()), nl=False)
        return
    made = runtime.checkpointer.maybe_checkpoint(force=True)
    assert made is not None
    record_operator_event(
        runtime, "system.checkpoint.signed", metadata={"seq": made.seq, "key_id": made.key_id}
    )
    click.echo(
        f"signed checkpoint at seq {made.seq} hash {made.hash} "
        f"-> {runtime.checkpoint_sink.directory / made.file_stem}.json"
    )
