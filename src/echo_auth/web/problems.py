"""RFC 9457 problem details: the one error shape of the HTTP API.

Every error answer is ``application/problem+json`` with a stable ``code``. Domain
exceptions are mapped here and only here; anything unexpected becomes a 500 without a
traceback, and a database that cannot be reached becomes a 503 that clients may retry.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from echo_auth.audit.checkpoints import CheckpointKeyError
from echo_auth.audit.search import InvalidQuery
from echo_auth.config import ConfigurationError
from echo_auth.identity.access_tokens import InvalidAccessToken
from echo_auth.identity.admin import LastAdmin
from echo_auth.identity.auth import AccountDisabled
from echo_auth.identity.errors import (
    DomainError,
    Forbidden,
    InvalidCredentials,
    InvalidInput,
    InvalidToken,
    NotAuthenticated,
    NotFound,
    Overloaded,
)
from echo_auth.identity.mfa import InvalidMfaCode, MfaAlreadyEnabled, MfaNotEnabled
from echo_auth.identity.provisioning import EmailTaken
from echo_auth.identity.throttle import RateLimited

log = logging.getLogger("echo_auth.web")

PROBLEM_JSON = "application/problem+json"

_STATUS: dict[type[DomainError], int] = {
    InvalidCredentials: 401,
    NotAuthenticated: 401,
    AccountDisabled: 403,
    Forbidden: 403,
    NotFound: 404,
    EmailTaken: 409,
    LastAdmin: 409,
    InvalidToken: 400,
    InvalidInput: 422,
    Overloaded: 503,
    RateLimited: 429,
    InvalidMfaCode: 400,
    MfaAlreadyEnabled: 409,
    MfaNotEnabled: 409,
    InvalidAccessToken: 401,
}

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class FieldProblem(BaseModel):
    """One refused input: which field, and why."""

    field: str
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem: the body of every error answer, as ``application/problem+json``."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    code: str
    detail: str
    request_id: str | None = None
    errors: list[FieldProblem] | None = None


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error answers a route can give, all :class:`Problem`.

    FastAPI files a response ``model`` under ``application/json``; :func:`install` moves
    every error answer to ``application/problem+json``, the type actually sent.
    """
    return {status: {"model": Problem, "description": _TITLES[status]} for status in statuses}


def _document_problems(app: FastAPI) -> None:
    """Make the OpenAPI document say what the API sends on errors.

    Every 4xx/5xx answer is declared as ``application/problem+json`` with the
    :class:`Problem` schema, FastAPI's default 422 (``HTTPValidationError``, which this
    API never sends) included.
    """
    build = app.openapi
    ref = {"$ref": "#/components/schemas/Problem"}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                for status, response in operation.get("responses", {}).items():
                    if status[:1] in ("4", "5"):
                        response["content"] = {PROBLEM_JSON: {"schema": ref}}
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if "Problem" not in components:
            components["Problem"] = Problem.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            components["Problem"].pop("$defs", None)
            components["FieldProblem"] = FieldProblem.model_json_schema()
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://echo.dev/problems/{code}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "code": code,
        "detail": detail,
    }
    if request_id:
        body["request_id"] = request_id
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def status_for(exc: DomainError) -> int:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 400


def _allowed_methods(request: Request) -> str | None:
    """Every method the API documents for the path, for a 405's ``Allow`` (RFC 9110, 15.5.6).

    Starlette names only the methods of the first route that matched the path; a path
    served by several routes (``POST`` and ``DELETE /v1/me/mfa/totp``) needs all of them.
    A fixed path wins over a template that also matches it (``/v1/me/sessions/revoke-others``
    is not a session id). None for a path the OpenAPI document does not describe.
    """
    app: FastAPI = request.app
    path = request.url.path
    fixed: set[str] = set()
    templated: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        if template == path:
            fixed.update(m.upper() for m in operations)
        elif "{" in template and re.fullmatch(_template_pattern(template), path):
            templated.update(m.upper() for m in operations)
    allowed = fixed or templated
    return ", ".join(sorted(allowed)) if allowed else None


def _template_pattern(template: str) -> str:
    parts = re.split(r"(\{[^}/]+\})", template)
    return "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)


def install(app: FastAPI) -> None:
    _document_problems(app)

    async def domain_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DomainError)
        status = status_for(exc)
        headers: dict[str, str] = {}
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="echo"'
        if isinstance(exc, Overloaded):
            headers["Retry-After"] = "1"
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = str(exc.retry_after)
        extra: dict[str, Any] = {}
        if isinstance(exc, InvalidInput):
            extra["errors"] = [{"field": exc.field, "message": exc.message}]
        return problem(
            status, exc.code, exc.message, request_id=_request_id(request), headers=headers, **extra
        )

    async def invalid_query(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InvalidQuery)
        return problem(
            422,
            "validation_error",
            str(exc),
            request_id=_request_id(request),
            errors=[{"field": exc.field, "message": str(exc)}],
        )

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {
                # A JSON syntax error's location is a character offset, not a field.
                "field": "body"
                if err.get("type") == "json_invalid"
                else ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body",
                "message": str(err.get("msg", "invalid")),
            }
            for err in exc.errors()
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return problem(
            422, "validation_error", detail, request_id=_request_id(request), errors=errors
        )

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer to a body it cannot decode (not UTF-8, broken form data).
            return problem(
                422,
                "validation_error",
                "body: could not be decoded (JSON in UTF-8 expected)",
                request_id=_request_id(request),
                errors=[{"field": "body", "message": "could not be decoded"}],
            )
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
        return problem(
            exc.status_code,
            code,
            str(exc.detail),
            request_id=_request_id(request),
            headers=headers,
        )

    async def database_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("database unavailable: %s", type(exc).__name__)
        return problem(
            503,
            "service_unavailable",
            "a database is unavailable; try again shortly",
            request_id=_request_id(request),
            headers={"Retry-After": "5"},
        )

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return await database_error(request, exc)
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return problem(
            500, "internal_error", "an unexpected error occurred", request_id=_request_id(request)
        )

    async def configuration_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("configuration error: %s", exc)
        return problem(500, "configuration_error", str(exc), request_id=_request_id(request))

    app.add_exception_handler(DomainError, domain_error)
    app.add_exception_handler(InvalidQuery, invalid_query)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(OperationalError, database_error)
    app.add_exception_handler(ConfigurationError, configuration_error)
    app.add_exception_handler(CheckpointKeyError, configuration_error)
    app.add_exception_handler(Exception, unexpected)
