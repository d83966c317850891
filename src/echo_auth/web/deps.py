"""FastAPI dependencies as ``Annotated`` aliases: the runtime, the caller, the request source."""

from __future__ import annotations

import ipaddress
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from echo_auth.audit.events import AuditEvent, Source
from echo_auth.audit.outbox import enqueue_event
from echo_auth.db.engines import transaction
from echo_auth.identity.auth import user_actor
from echo_auth.identity.errors import Forbidden, NotAuthenticated
from echo_auth.identity.sessions import CurrentSession
from echo_auth.runtime import Runtime

SESSION_COOKIE = "echo_session"
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def client_ip(request: Request, trusted_proxies: list[str]) -> str | None:
    """The peer address, or, behind a trusted proxy, the nearest untrusted X-Forwarded-For hop."""
    peer = request.client.host if request.client else None
    if not trusted_proxies or peer is None or not _trusted(peer, trusted_proxies):
        return peer
    hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted_proxies):
            return hop[:45]
    return peer


def _trusted(address: str, networks: list[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
        return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)
    except ValueError:
        return False


def get_source(request: Request) -> Source:
    runtime: Runtime = request.app.state.runtime
    return Source(
        ip=client_ip(request, runtime.settings.trusted_proxies),
        user_agent=request.headers.get("user-agent"),
        request_id=getattr(request.state, "request_id", None),
    )


SourceDep = Annotated[Source, Depends(get_source)]


def _presented_token(request: Request) -> tuple[str | None, bool]:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip(), False
        return None, False
    cookie = request.cookies.get(SESSION_COOKIE)
    return (cookie, True) if cookie else (None, False)


# Declared for the OpenAPI document only (clients and fuzzers learn how to authenticate);
# the token itself is read by _presented_token, which also decides the CSRF rule.
_BEARER = HTTPBearer(auto_error=False, description="A session token from POST /v1/login")
_COOKIE = APIKeyCookie(
    name=SESSION_COOKIE, auto_error=False, description="The session cookie set by login"
)


async def get_current_session(
    request: Request,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    _cookie: Annotated[str | None, Depends(_COOKIE)],
) -> CurrentSession:
    # Async, with the lookup on the event loop where the driver allows (MySQL) and in one
    # worker-thread hop elsewhere: every authenticated request pays for this.
    token, from_cookie = _presented_token(request)
    if token is None:
        raise NotAuthenticated()
    if from_cookie and request.method in _UNSAFE:
        _check_same_origin(request)
    runtime: Runtime = request.app.state.runtime
    current = await runtime.auth.authenticate_async(token)
    if current is None:
        raise NotAuthenticated("the session is missing, expired or revoked")
    return current


def _check_same_origin(request: Request) -> None:
    """Cookie-authenticated writes must come from our own pages (CSRF defence in depth)."""
    runtime: Runtime = request.app.state.runtime
    origin = request.headers.get("origin")
    if origin is not None:
        ours = urlsplit(runtime.settings.base_url)
        theirs = urlsplit(origin)
        if (theirs.scheme, theirs.netloc) != (ours.scheme, ours.netloc):
            raise Forbidden("cross-origin request refused")
    elif request.headers.get("sec-fetch-site") == "cross-site":
        raise Forbidden("cross-site request refused")


CurrentSessionDep = Annotated[CurrentSession, Depends(get_current_session)]


def require_role(*roles: str) -> object:
    """A dependency that lets through sessions whose user has any of ``roles``.

    A refusal is itself recorded (``access.denied``) before the 403 is sent.
    """

    def check(request: Request, current: CurrentSessionDep, source: SourceDep) -> CurrentSession:
        if any(role in current.user.roles for role in roles):
            return current
        runtime: Runtime = request.app.state.runtime
        with transaction(runtime.identity) as conn:
            enqueue_event(
                conn,
                AuditEvent(
                    action="access.denied",
                    outcome="denied",
                    reason="missing_role",
                    actor=user_actor(current.user),
                    source=source,
                    metadata={"route": request.url.path[:200], "needs": list(roles)},
                ),
            )
        raise Forbidden(f"this needs the role {' or '.join(roles)}")

    return Depends(check)


AuditReader = Annotated[CurrentSession, require_role("auditor", "admin")]
Admin = Annotated[CurrentSession, require_role("admin")]
