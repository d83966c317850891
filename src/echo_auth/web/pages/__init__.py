"""The HTML pages: server-rendered (Jinja2), no JavaScript, CSRF-protected forms.

One module per area (``auth_pages``, ``account_pages``, ``admin_pages``,
``audit_pages``); every action calls the same services as the JSON API, so it leaves the
same audit events. :func:`install` wires them into the app: routers, ``/static``, and
error pages for browsers (the API keeps its problem+json answers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from echo_auth.config import Settings
from echo_auth.identity.errors import DomainError
from echo_auth.web.pages import account_pages as account_pages
from echo_auth.web.pages import admin_pages as admin_pages
from echo_auth.web.pages import audit_pages as audit_pages
from echo_auth.web.pages import auth_pages as auth_pages
from echo_auth.web.pages.context import LoginRequired, PageContext, PageKit, PageRefused, login_url
from echo_auth.web.pages.csrf import KEY_FILE_NAME, CsrfSigner

PAGE_TAG = "pages"
_WEB = Path(__file__).resolve().parent.parent
_NOT_PAGES = ("/v1/", "/.well-known/", "/static/", "/docs", "/redoc", "/openapi.json")
_NOT_PAGES_EXACT = ("/healthz", "/readyz", "/metrics")
_MESSAGES = {
    404: ("Page not found", "There is no page at this address. Check the link, or start over."),
    405: ("Not here", "This page cannot be used that way."),
    500: ("Something went wrong", "An unexpected error occurred. It has been logged."),
    503: ("Try again shortly", "A database is unavailable right now. Try again in a moment."),
}


class CachedStaticFiles(StaticFiles):
    """The stylesheet may be cached for an hour (the app otherwise says ``no-store``)."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["cache-control"] = "public, max-age=3600"
        return response


def template_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_WEB / "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env


def _is_page_request(request: Request) -> bool:
    """A browser asking for a page (not the API, docs, probes or static files)."""
    path = request.url.path
    if path.startswith(_NOT_PAGES) or path in _NOT_PAGES_EXACT:
        return False
    route = request.scope.get("route")
    if isinstance(route, APIRoute) and PAGE_TAG in route.tags:
        return True
    return "text/html" in request.headers.get("accept", "")


def error_page(request: Request, status: int, title: str, message: str) -> HTMLResponse:
    page: PageContext | None = getattr(request.state, "page", None)
    if page is not None:
        return page.render("error.html", status=status, title=title, message=message)
    kit: PageKit = request.app.state.pages
    html = kit.templates.get_template("error.html").render(
        user=None, path=request.url.path, title=title, message=message, flash=None
    )
    return HTMLResponse(html, status_code=status)


def install(app: FastAPI, settings: Settings) -> None:
    """Add the pages, ``/static`` and the browser error pages to ``app``.

    Call after :func:`echo_auth.web.problems.install`: its handlers stay in charge of
    everything that is not a page request.
    """
    app.state.pages = PageKit(
        templates=template_environment(), csrf=CsrfSigner(settings.keys_dir / KEY_FILE_NAME)
    )
    for module in (auth_pages, account_pages, admin_pages, audit_pages):
        app.include_router(module.router, tags=[PAGE_TAG], include_in_schema=False)
    app.mount("/static", CachedStaticFiles(directory=_WEB / "static"), name="static")

    async def login_required(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginRequired)
        return RedirectResponse(login_url(exc.next_url), status_code=303)

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PageRefused)
        return error_page(request, exc.status, exc.title, exc.message)

    app.add_exception_handler(LoginRequired, login_required)
    app.add_exception_handler(PageRefused, refused)
    for exc_class in list(app.exception_handlers):
        if exc_class in (LoginRequired, PageRefused):
            continue
        original = app.exception_handlers[exc_class]
        app.exception_handlers[exc_class] = _for_browsers(original)


def _for_browsers(original: Any) -> Any:
    """Wrap an API error handler: page requests get the HTML error page instead."""

    async def handler(request: Request, exc: Exception) -> Response:
        answer: Response = await original(request, exc)
        if not _is_page_request(request):
            return answer
        status = answer.status_code
        if isinstance(exc, DomainError):
            title, message = _MESSAGES.get(status, ("Not possible", ""))[0], exc.message
        else:
            title, message = _MESSAGES.get(status, ("Something went wrong", ""))
            if isinstance(exc, StarletteHTTPException) and status not in _MESSAGES:
                message = str(exc.detail)
        page = error_page(request, status, title, message or title)
        for name in ("retry-after", "allow"):
            if name in answer.headers:
                page.headers[name] = answer.headers[name]
        return page

    return handler
