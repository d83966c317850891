"""``/admin/users``: search and page through users, disable and enable them, set roles.

Role ``admin`` only. Every call goes through ``runtime.admin`` with the admin as an
``admin`` actor, exactly as ``/v1/admin/users`` does, so listing the page records
``admin.user.listed`` and each action its own event.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query
from fastapi.responses import Response

from echo_auth.audit.events import Actor
from echo_auth.identity.admin import LastAdmin
from echo_auth.identity.auth import user_actor
from echo_auth.identity.errors import InvalidInput, NotFound
from echo_auth.identity.sessions import CurrentSession
from echo_auth.identity.users import ROLES
from echo_auth.web.pages.context import CheckedForm, Page, PageContext, safe_next, text_field

router = APIRouter(prefix="/admin/users")

PAGE_SIZE = 25
GRANTABLE = tuple(role for role in ROLES if role != "user")


def _actor(current: CurrentSession) -> Actor:
    actor = user_actor(current.user)
    return Actor("admin", actor.id, actor.label)


def _back(q: str, cursor: str) -> str:
    params = {k: v for k, v in (("q", q), ("cursor", cursor)) if v}
    return "/admin/users" + (f"?{urlencode(params)}" if params else "")


@router.get("")
def users_page(
    page: Page,
    q: Annotated[str | None, Query()] = None,
    cursor: Annotated[str | None, Query()] = None,
) -> Response:
    current = page.require_role("admin")
    q = (q or "").strip()[:320]
    cursor = (cursor or "")[:64]
    try:
        found = page.runtime.admin.list_users(
            _actor(current), page.source, q=q or None, cursor=cursor or None, limit=PAGE_SIZE
        )
    except InvalidInput as exc:
        return page.render(
            "admin_users.html",
            status=422,
            q=q,
            users=[],
            next_url=None,
            first_url=None,
            back=_back(q, ""),
            grantable=GRANTABLE,
            search_error=exc.message,
        )
    next_url = _back(q, found.next_cursor) if found.next_cursor else None
    return page.render(
        "admin_users.html",
        q=q,
        users=found.users,
        next_url=next_url,
        first_url=_back(q, "") if cursor else None,
        back=_back(q, cursor),
        grantable=GRANTABLE,
        me=current.user.id,
    )


def _return_to(form_back: str) -> str:
    """Back to the list the form was on (only ever an /admin/users address)."""
    if form_back.startswith("/admin/users") and not form_back.startswith("/admin/users/"):
        return safe_next(form_back, "/admin/users")
    return "/admin/users"


def _act(
    page: PageContext, form_back: str, action: str, user_id: str, roles: list[str]
) -> Response:
    current = page.require_role("admin")
    admin, actor, source = page.runtime.admin, _actor(current), page.source
    back = _return_to(form_back)
    try:
        if action == "disable":
            revoked = admin.disable(actor, source, user_id)
            message = f"The user is disabled; {revoked} session{'s' if revoked != 1 else ''} ended."
        elif action == "enable":
            admin.enable(actor, source, user_id)
            message = "The user is enabled."
        elif action == "roles":
            user = admin.set_roles(actor, source, user_id, roles)
            message = f"{user.email} now has the roles {', '.join(user.roles)}."
        elif action == "revoke":
            revoked = admin.revoke_sessions(actor, source, user_id)
            message = f"Ended {revoked} session{'s' if revoked != 1 else ''} of the user."
        else:  # pragma: no cover - the routes below pass only the names above
            raise ValueError(action)
    except (LastAdmin, NotFound, InvalidInput) as exc:
        return page.redirect(back, flash=("error", exc.message))
    return page.redirect(back, flash=("success", message))


@router.post("/{user_id}/disable")
def disable_user(page: Page, form: CheckedForm, user_id: str) -> Response:
    return _act(page, text_field(form, "back", 512), "disable", user_id, [])


@router.post("/{user_id}/enable")
def enable_user(page: Page, form: CheckedForm, user_id: str) -> Response:
    return _act(page, text_field(form, "back", 512), "enable", user_id, [])


@router.post("/{user_id}/roles")
def set_roles(page: Page, form: CheckedForm, user_id: str) -> Response:
    roles = [r for r in form.getlist("roles") if isinstance(r, str)][: len(ROLES)]
    return _act(page, text_field(form, "back", 512), "roles", user_id, roles)


@router.post("/{user_id}/sessions/revoke")
def revoke_user_sessions(page: Page, form: CheckedForm, user_id: str) -> Response:
    return _act(page, text_field(form, "back", 512), "revoke", user_id, [])
