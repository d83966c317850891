"""Reading the audit log over HTTP: search, one event, pipeline health, chain verification.

Every read here is itself an audit event, written to the outbox before the answer is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError

from echo_auth.audit.events import AuditEvent, Source, Target
from echo_auth.audit.export import (
    MEDIA_TYPES,
    ExportPlan,
    check_format,
    chunked,
    export_events,
    plan_export,
)
from echo_auth.audit.outbox import enqueue_event
from echo_auth.audit.pipeline import pipeline_status
from echo_auth.audit.search import (
    EventFilter,
    InvalidQuery,
    filter_from_text,
    get_event,
    search_events,
)
from echo_auth.audit.verify import verify_audit_log
from echo_auth.db.engines import transaction
from echo_auth.identity.auth import user_actor
from echo_auth.identity.errors import NotFound
from echo_auth.identity.sessions import CurrentSession
from echo_auth.runtime import Runtime
from echo_auth.web.deps import AuditReader, RuntimeDep, SourceDep
from echo_auth.web.problems import problem_responses

router = APIRouter(prefix="/v1/audit", tags=["audit"], responses=problem_responses(401, 403))


class EventPage(BaseModel):
    events: list[dict[str, Any]]
    next_cursor: str | None


def _record(
    runtime: Runtime,
    current: CurrentSession,
    source: Source,
    action: str,
    metadata: dict[str, Any],
    target: Target | None = None,
) -> None:
    with transaction(runtime.identity) as conn:
        enqueue_event(
            conn,
            AuditEvent(
                action=action,
                outcome="success",
                actor=user_actor(current.user),
                target=target,
                source=source,
                metadata=metadata,
            ),
        )


def event_filter(
    actor: Annotated[str | None, Query(max_length=320)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    target: Annotated[str | None, Query(max_length=64)] = None,
    outcome: Annotated[str | None, Query(max_length=16)] = None,
    ip: Annotated[str | None, Query(max_length=45)] = None,
    since: Annotated[str | None, Query(max_length=40)] = None,
    until: Annotated[str | None, Query(max_length=40)] = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
) -> EventFilter:
    """The search filters shared by search and export, as query parameters."""
    return filter_from_text(
        actor=actor,
        action=action,
        target=target,
        outcome=outcome,
        ip=ip,
        since=since,
        until=until,
        q=q,
    )


EventFilterQuery = Annotated[EventFilter, Depends(event_filter)]


@router.get("/events", response_model=EventPage)
def list_events(
    current: AuditReader,
    runtime: RuntimeDep,
    source: SourceDep,
    f: EventFilterQuery,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int | None, Query()] = None,
) -> EventPage:
    with transaction(runtime.audit_reader, write=False) as conn:
        page = search_events(conn, f, cursor=cursor, limit=limit)
    _record(
        runtime,
        current,
        source,
        "audit.searched",
        {"filters": f.describe(), "returned": len(page.events)},
    )
    return EventPage(events=page.events, next_cursor=page.next_cursor)


@router.get("/events/{event_id}", responses=problem_responses(404, 422))
def one_event(
    event_id: str, current: AuditReader, runtime: RuntimeDep, source: SourceDep
) -> dict[str, Any]:
    if len(event_id) > 36:
        raise InvalidQuery("event_id", "not an event id")
    with transaction(runtime.audit_reader, write=False) as conn:
        event = get_event(conn, event_id)
    _record(
        runtime,
        current,
        source,
        "audit.searched",
        {"event_id": event_id},
        Target("audit_event", event_id),
    )
    if event is None:
        raise NotFound("no such event")
    return event


@router.get("/pipeline")
def pipeline(current: AuditReader, runtime: RuntimeDep, source: SourceDep) -> dict[str, Any]:
    with transaction(runtime.identity, write=False) as iconn:
        try:
            with transaction(runtime.audit_reader, write=False) as aconn:
                status = pipeline_status(iconn, aconn)
        except DBAPIError:  # the outbox still reports when the audit DB is down
            status = pipeline_status(iconn, None)
    _record(runtime, current, source, "audit.pipeline.viewed", {})
    return status.as_dict()


@router.get("/verify")
def verify(current: AuditReader, runtime: RuntimeDep, source: SourceDep) -> dict[str, Any]:
    with transaction(runtime.audit_reader, write=False) as conn:
        report = verify_audit_log(
            conn, public_key=runtime.checkpoint_public_key, sink=runtime.checkpoint_sink
        )
    _record(
        runtime,
        current,
        source,
        "audit.verified",
        {
            "intact": report.intact,
            "events_checked": report.events_checked,
            "problems": report.problems_total + len(report.checkpoint_issues),
        },
    )
    return report.as_dict()


_EXPORT_CONTENT: dict[str, Any] = {media: {} for media in sorted(set(MEDIA_TYPES.values()))}


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={
        200: {"content": _EXPORT_CONTENT, "description": "The events, streamed"},
        **problem_responses(422),
    },
)
def export(
    current: AuditReader,
    runtime: RuntimeDep,
    source: SourceDep,
    f: EventFilterQuery,
    fmt: Annotated[str, Query(alias="format", max_length=16)] = "jsonl",
) -> StreamingResponse:
    """Every matching event, oldest first, as ``jsonl``, ``csv`` or ``ocsf`` (streamed).

    The export ends at the chain head as it was when the request came in. Its
    ``audit.exported`` event (format, filters, event count, last seq) is committed before
    the first byte is sent: an export cut short was still handed out. The database is
    read in batches by Starlette's thread pool (this is a sync generator), never on the
    event loop.
    """
    check_format(fmt)
    with transaction(runtime.audit_reader, write=False) as conn:
        plan = plan_export(conn, f, fmt)
    _record(runtime, current, source, "audit.exported", plan.describe())
    return StreamingResponse(
        _stream_export(runtime, plan),
        media_type=MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="{plan.filename()}"'},
    )


def _stream_export(runtime: Runtime, plan: ExportPlan) -> Iterator[str]:
    with transaction(runtime.audit_reader, write=False) as conn:
        lines = export_events(conn, plan.filter, plan.fmt, through_seq=plan.through_seq)
        yield from chunked(lines)
