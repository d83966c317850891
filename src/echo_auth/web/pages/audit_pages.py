"""``/admin/audit``: the audit viewer. Role ``auditor`` or ``admin``.

Search with the filters of ``GET /v1/audit/events`` (newest first, cursor paging), one
event with its chain fields, pipeline health, and export links that keep the filters.
Reads are recorded as the API records them: a page of results is ``audit.searched``
(with the filters), the health panel ``audit.pipeline.viewed``, an event's page
``audit.searched`` with its id.

Chain status: showing a fresh verification on every page view would read the whole log
each time, so the page shows the last ``audit.verified`` event (what was found, when,
by whom, and how many events were recorded after it), and a button runs a full
verification on demand (``POST /admin/audit/verify``), recorded like ``GET /v1/audit/verify``.
"""

from __future__ import annotations

import json
from datetime import UTC
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query
from fastapi.responses import Response
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from echo_auth.audit.checkpoints import CheckpointKeyError
from echo_auth.audit.events import CATALOG, GENESIS_HASH, OUTCOMES, AuditEvent, Source, Target
from echo_auth.audit.outbox import enqueue_event
from echo_auth.audit.pipeline import PipelineStatus, pipeline_status
from echo_auth.audit.search import (
    EventFilter,
    InvalidQuery,
    filter_from_text,
    get_event,
    get_event_at,
    parse_time,
    search_events,
)
from echo_auth.audit.verify import verify_audit_log
from echo_auth.db.engines import transaction
from echo_auth.identity.auth import user_actor
from echo_auth.identity.sessions import CurrentSession
from echo_auth.web.pages.context import CheckedForm, Page, PageContext, PageRefused

router = APIRouter(prefix="/admin/audit")

READERS = ("auditor", "admin")
PAGE_SIZE = 50
FILTERS = ("actor", "action", "target", "outcome", "ip", "since", "until", "q")
_LIMITS = {"actor": 320, "action": 64, "target": 64, "outcome": 16, "ip": 45, "q": 200}
EXPORT_FORMATS = (("jsonl", "JSON Lines"), ("csv", "CSV"), ("ocsf", "OCSF"))


def _events_for(
    identity: Engine,
    current: CurrentSession,
    source: Source,
    entries: list[tuple[str, dict[str, Any], Target | None]],
) -> None:
    """Record the reads of one page in one transaction, before the page is sent."""
    with transaction(identity) as conn:
        for action, metadata, target in entries:
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


def _time_input(text: str) -> str:
    """A filter time as a ``datetime-local`` value in UTC (the raw text if it is not one)."""
    try:
        moment = parse_time("time", text)
    except InvalidQuery:
        return text
    return "" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _pipeline(page: PageContext) -> PipelineStatus:
    runtime = page.runtime
    with transaction(runtime.identity, write=False) as iconn:
        try:
            with transaction(runtime.audit_reader, write=False) as aconn:
                return pipeline_status(iconn, aconn)
        except DBAPIError:  # the outbox still reports when the audit DB is down
            return pipeline_status(iconn, None)


@router.get("")
def audit_page(
    page: Page,
    actor: Annotated[str | None, Query()] = None,
    action: Annotated[str | None, Query()] = None,
    target: Annotated[str | None, Query()] = None,
    outcome: Annotated[str | None, Query()] = None,
    ip: Annotated[str | None, Query()] = None,
    since: Annotated[str | None, Query()] = None,
    until: Annotated[str | None, Query()] = None,
    q: Annotated[str | None, Query()] = None,
    cursor: Annotated[str | None, Query()] = None,
) -> Response:
    current = page.require_role(*READERS)
    raw = dict(zip(FILTERS, (actor, action, target, outcome, ip, since, until, q), strict=True))
    values = {k: (v or "").strip()[: _LIMITS.get(k, 40)] for k, v in raw.items()}
    active = {k: v for k, v in values.items() if v}
    errors: dict[str, str] = {}
    events: list[dict[str, Any]] = []
    next_url: str | None = None
    audit_error: str | None = None
    last_verified: dict[str, Any] | None = None
    try:
        f = filter_from_text(**{k: values[k] or None for k in FILTERS})
    except InvalidQuery as exc:
        f = None
        errors[exc.field] = str(exc).removeprefix(f"{exc.field}: ")
    if f is not None:
        try:
            with transaction(page.runtime.audit_reader, write=False) as conn:
                found = search_events(conn, f, cursor=(cursor or "")[:64] or None, limit=PAGE_SIZE)
                verified = search_events(conn, EventFilter(action="audit.verified"), limit=1)
        except InvalidQuery as exc:
            errors[exc.field] = str(exc).removeprefix(f"{exc.field}: ")
        except DBAPIError:
            audit_error = "The audit database cannot be reached; the outbox keeps new events."
        else:
            events = found.events
            if found.next_cursor:
                next_url = "/admin/audit?" + urlencode({**active, "cursor": found.next_cursor})
            last_verified = verified.events[0] if verified.events else None
    health = _pipeline(page)
    reads: list[tuple[str, dict[str, Any], Target | None]] = [("audit.pipeline.viewed", {}, None)]
    if f is not None and audit_error is None and not errors:
        reads.insert(
            0, ("audit.searched", {"filters": f.describe(), "returned": len(events)}, None)
        )
    _events_for(page.runtime.identity, current, page.source, reads)
    query = urlencode(active)
    return page.render(
        "audit.html",
        status=422 if errors else 200,
        values={
            **values,
            "since": _time_input(values["since"]),
            "until": _time_input(values["until"]),
        },
        errors=errors,
        events=events,
        next_url=next_url,
        first_url=("/admin/audit?" + query if query else "/admin/audit") if cursor else None,
        filtered=bool(active),
        outcomes=OUTCOMES,
        actions=sorted(CATALOG),
        exports=[
            (label, "/v1/audit/export?" + urlencode({"format": fmt, **active}))
            for fmt, label in EXPORT_FORMATS
        ],
        health=health,
        last_verified=last_verified,
        audit_error=audit_error,
    )


@router.get("/events/{event_id}")
def event_page(page: Page, event_id: str) -> Response:
    current = page.require_role(*READERS)
    if len(event_id) > 36:
        raise PageRefused(404, "No such event", "There is no audit event with this id.")
    with transaction(page.runtime.audit_reader, write=False) as conn:
        event = get_event(conn, event_id)
        seq = int(event["seq"]) if event else 0
        previous = get_event_at(conn, seq - 1) if event else None
        following = get_event_at(conn, seq + 1) if event else None
    _events_for(
        page.runtime.identity,
        current,
        page.source,
        [("audit.searched", {"event_id": event_id}, Target("audit_event", event_id))],
    )
    if event is None:
        raise PageRefused(404, "No such event", "There is no audit event with this id.")
    expected_prev = previous["hash"] if previous else GENESIS_HASH
    return page.render(
        "audit_event.html",
        event=event,
        description=CATALOG.get(event["action"], ""),
        metadata_json=json.dumps(event.get("metadata") or {}, indent=2, sort_keys=True),
        previous=previous,
        following=following,
        links_to_previous=event["prev_hash"] == expected_prev,
        first_in_chain=seq == 1,
    )


@router.post("/verify")
def verify_now(page: Page, form: CheckedForm) -> Response:
    """Verify the whole chain and every checkpoint now; recorded as ``audit.verified``."""
    current = page.require_role(*READERS)
    runtime = page.runtime
    try:
        with transaction(runtime.audit_reader, write=False) as conn:
            report = verify_audit_log(
                conn, public_key=runtime.checkpoint_public_key, sink=runtime.checkpoint_sink
            )
    except CheckpointKeyError as exc:
        return page.render("audit_verify.html", status=500, report=None, error=str(exc))
    _events_for(
        runtime.identity,
        current,
        page.source,
        [
            (
                "audit.verified",
                {
                    "intact": report.intact,
                    "events_checked": report.events_checked,
                    "problems": report.problems_total + len(report.checkpoint_issues),
                },
                None,
            )
        ],
    )
    return page.render("audit_verify.html", report=report, error=None)
