"""What every page handler gets: the signed-in session (if any), CSRF, rendering, redirects.

Pages authenticate with the ``echo_session`` cookie only (never a bearer header), resolve
it once per request, and refuse in HTML: not signed in becomes a redirect to
``/login?next=...``, a missing role a 403 page (recorded as ``access.denied``, as the API
does). Every POST goes through :func:`checked_form`, which refuses a missing or wrong
CSRF token before the form is used (see :mod:`echo_auth.web.pages.csrf`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Final
from urllib.parse import urlencode, urlsplit

import jinja2
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.datastructures import FormData

from echo_auth.audit.events import Actor, AuditEvent, Source
from echo_auth.audit.outbox import enqueue_event
from echo_auth.db.engines import transaction
from echo_auth.identity.auth import user_actor
from echo_auth.identity.sessions import CurrentSession
from echo_auth.identity.users import User
from echo_auth.runtime import Runtime
from echo_auth.web.deps import SESSION_COOKIE, get_source
from echo_auth.web.pages.csrf import CSRF_COOKIE, CSRF_FIELD, CsrfSigner

FLASH_COOKIE: Final = "echo_flash"
DEFAULT_NEXT: Final = "/account"
MAX_FIELD: Final = 4096
_NEXT_MAX: Final = 512
# Controls and whitespace: browsers drop tabs and newlines inside URLs, so "/\t/evil"
# would become "//evil".
_UNSAFE_IN_NEXT = re.compile(r"[\x00-\x20\x7f\\]")


@dataclass(frozen=True)
class PageKit:
    """Built once per app by :func:`echo_auth.web.pages.install`."""

    templates: jinja2.Environment
    csrf: CsrfSigner


class LoginRequired(Exception):
    """Not signed in: answered with a redirect to the login page."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


class PageRefused(Exception):
    """Answered with the error page and this status (403 for roles and CSRF)."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message


def safe_next(raw: str | None, default: str = DEFAULT_NEXT) -> str:
    """``raw`` when it is a path on this site, else ``default`` (no open redirect).

    Accepted: an absolute path such as ``/admin/audit?action=x``. Refused: anything with
    a scheme or host (``https://evil``), protocol-relative ``//evil``, backslashes
    (``/\\evil``, which browsers read as ``//evil``), whitespace and control characters.
    """
    if not raw or len(raw) > _NEXT_MAX or not raw.startswith("/") or raw.startswith("//"):
        return default
    if _UNSAFE_IN_NEXT.search(raw):
        return default
    parts = urlsplit(raw)
    if parts.scheme or parts.netloc:
        return default
    return raw


def login_url(next_url: str | None) -> str:
    target = safe_next(next_url, "")
    return "/login" + (f"?{urlencode({'next': target})}" if target else "")


def text_field(form: FormData, name: str, limit: int = MAX_FIELD) -> str:
    """A text field of a submitted form ('' when missing), at most ``limit`` characters."""
    value = form.get(name)
    return value[:limit] if isinstance(value, str) else ""


@dataclass
class PageContext:
    request: Request
    runtime: Runtime
    kit: PageKit
    source: Source
    session: CurrentSession | None
    nonce: str
    fresh_nonce: bool
    flash: tuple[str, str] | None
    _set_flash: tuple[str, str] | None = field(default=None, repr=False)

    @property
    def user(self) -> User | None:
        return self.session.user if self.session else None

    @property
    def csrf_token(self) -> str:
        return self.kit.csrf.token(self.nonce, self.session.id if self.session else None)

    # -- access ---------------------------------------------------------------------

    def require_user(self) -> CurrentSession:
        if self.session is None:
            url = self.request.url
            raise LoginRequired(url.path + (f"?{url.query}" if url.query else ""))
        return self.session

    def require_role(self, *roles: str) -> CurrentSession:
        """The session, when its user has one of ``roles``; else a recorded 403."""
        current = self.require_user()
        if any(role in current.user.roles for role in roles):
            return current
        with transaction(self.runtime.identity) as conn:
            enqueue_event(
                conn,
                AuditEvent(
                    action="access.denied",
                    outcome="denied",
                    reason="missing_role",
                    actor=user_actor(current.user),
                    source=self.source,
                    metadata={"route": self.request.url.path[:200], "needs": list(roles)},
                ),
            )
        raise PageRefused(
            403,
            "Not allowed",
            f"This page needs the role {' or '.join(roles)}. Ask an administrator if you "
            "should have it.",
        )

    # -- answers --------------------------------------------------------------------

    def render(
        self,
        template: str,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        **values: Any,
    ) -> HTMLResponse:
        user = self.user
        roles = user.roles if user else []
        context = {
            "user": user,
            "is_admin": "admin" in roles,
            "is_auditor": "auditor" in roles or "admin" in roles,
            "csrf_field": CSRF_FIELD,
            "csrf_token": self.csrf_token,
            "flash": self.flash,
            "path": self.request.url.path,
            **values,
        }
        html = self.kit.templates.get_template(template).render(context)
        response = HTMLResponse(html, status_code=status, headers=headers)
        self.finish(response)
        return response

    def redirect(self, url: str, *, flash: tuple[str, str] | None = None) -> RedirectResponse:
        """A 303 (the browser follows with a GET), optionally carrying a one-shot message."""
        response = RedirectResponse(url, status_code=303)
        if flash is not None:
            self._set_flash = flash
        self.finish(response)
        return response

    def finish(self, response: Response) -> None:
        """Cookies every page answer may carry: a new CSRF nonce, the flash message."""
        secure = self.runtime.settings.cookie_secure
        if self.fresh_nonce:
            response.set_cookie(
                CSRF_COOKIE, self.nonce, httponly=True, samesite="lax", secure=secure, path="/"
            )
        if self._set_flash is not None:
            response.set_cookie(
                FLASH_COOKIE,
                self.kit.csrf.sign_flash(*self._set_flash),
                max_age=60,
                httponly=True,
                samesite="lax",
                secure=secure,
                path="/",
            )
        elif self.flash is not None:
            response.delete_cookie(FLASH_COOKIE, path="/", httponly=True, samesite="lax")

    def rotate_nonce(self) -> None:
        """A new CSRF nonce (at sign-in), so tokens from before it stop working."""
        self.nonce = self.kit.csrf.new_nonce()
        self.fresh_nonce = True


def get_page(request: Request) -> PageContext:
    runtime: Runtime = request.app.state.runtime
    kit: PageKit = request.app.state.pages
    token = request.cookies.get(SESSION_COOKIE)
    session = runtime.auth.authenticate(token) if token else None
    nonce = request.cookies.get(CSRF_COOKIE)
    fresh = not kit.csrf.usable_nonce(nonce)
    page = PageContext(
        request=request,
        runtime=runtime,
        kit=kit,
        source=get_source(request),
        session=session,
        nonce=kit.csrf.new_nonce() if fresh or nonce is None else nonce,
        fresh_nonce=fresh,
        flash=kit.csrf.open_flash(request.cookies.get(FLASH_COOKIE)),
    )
    request.state.page = page
    return page


Page = Annotated[PageContext, Depends(get_page)]


def _record_csrf_refusal(page: PageContext) -> None:
    actor = user_actor(page.user) if page.user else Actor.anonymous()
    with transaction(page.runtime.identity) as conn:
        enqueue_event(
            conn,
            AuditEvent(
                action="access.denied",
                outcome="denied",
                reason="csrf",
                actor=actor,
                source=page.source,
                metadata={"route": page.request.url.path[:200], "check": "csrf"},
            ),
        )


async def checked_form(request: Request, page: Page) -> FormData:
    """The submitted form, once its CSRF token is right; else a recorded 403."""
    form = await request.form()
    presented = form.get(CSRF_FIELD)
    ok = page.kit.csrf.check(
        request.cookies.get(CSRF_COOKIE),
        page.session.id if page.session else None,
        presented if isinstance(presented, str) else None,
    )
    if not ok:
        await run_in_threadpool(_record_csrf_refusal, page)
        raise PageRefused(
            403,
            "This form has expired",
            "The form was sent without a valid security token: it may be old, or it may "
            "come from another site. Go back, reload the page and try again.",
        )
    return form


CheckedForm = Annotated[FormData, Depends(checked_form)]
