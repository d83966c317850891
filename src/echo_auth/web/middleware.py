"""Pure ASGI middleware: request ids, body size limit, security headers, metrics.

Written against ASGI directly (not BaseHTTPMiddleware) because it wraps every request,
the hot ones included.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy.exc import DBAPIError

from echo_auth.observability import request_id_var

log = logging.getLogger("echo_auth.web")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    ),
]


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


async def _read_capped(receive: Receive, limit: int) -> list[Message] | None:
    """Every body message, or None once more than ``limit`` bytes arrived."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages
        size += len(message.get("body", b""))
        if size > limit:
            return None
        if not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "echo_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.logins = Counter(
            "echo_logins",
            "Login attempts by outcome (password and MFA steps)",
            ["step", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "echo_http_request_duration_seconds",
            "HTTP request latency by route",
            ["route"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )


class EchoMiddleware:
    """Gives each request an id, caps the body, adds security headers, counts requests."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: HttpMetrics) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _incoming_request_id(scope) or secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        request_id_var.set(request_id)
        status_holder = [500]
        answered = [False]  # the whole response went out

        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            await _send_too_large(send, request_id, self.max_body)
            self._observe(scope, 413, started)
            return

        docs_page = scope["path"] in ("/docs", "/redoc", "/docs/oauth2-redirect")
        if declared is None and scope["method"] in _BODY_METHODS:
            # No Content-Length (a chunked body): read it here, up to the limit, so an
            # oversized one is refused with 413 before any route sees it.
            buffered = await _read_capped(receive, self.max_body)
            if buffered is None:
                await _send_too_large(send, request_id, self.max_body)
                self._observe(scope, 413, started)
                return
            receive = _replay(buffered, receive)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                present = {name.lower() for name, _ in headers}
                if docs_page:
                    # Swagger UI needs its own scripts; everything else gets the strict CSP.
                    present.add(b"content-security-policy")
                headers.extend(h for h in SECURITY_HEADERS if h[0] not in present)
                message["headers"] = headers
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered[0] = True

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if not answered[0]:
                raise
            # Work that runs after a complete answer (a background task, such as the
            # verification mail after a sign-up) failed, typically because a database is
            # down. The client has its answer; letting this reach the server would make it
            # drop the kept-alive connection under the client's next request.
            cause = exc.__cause__ or exc  # Starlette wraps a handled exception type
            if isinstance(cause, DBAPIError):
                log.warning("work after the answer failed: %s", type(cause).__name__)
            else:
                log.error("work after the answer failed", exc_info=cause)
        self._observe(scope, status_holder[0], started)

    def _observe(self, scope: Scope, status: int, started: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(scope["method"], path, str(status)).inc()
        self.metrics.latency.labels(path).observe(time.perf_counter() - started)


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _REQUEST_ID.match(text) else None
    return None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_too_large(send: Send, request_id: str, limit: int) -> None:
    body = json.dumps(
        {
            "type": "https://echo.dev/problems/payload_too_large",
            "title": "Content Too Large",
            "status": 413,
            "code": "payload_too_large",
            "detail": f"request bodies are limited to {limit} bytes",
            "request_id": request_id,
        }
    ).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        (b"connection", b"close"),
        *SECURITY_HEADERS,
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
