"""``/account``: the signed-in user's profile, password, sessions and second factor.

The actions call ``runtime.account`` and :mod:`echo_auth.identity.mfa` as the JSON API
does. The TOTP secret and the recovery codes are shown only in the answer to the POST
that made them (never in a URL or a cookie), with ``no-store``.
"""

from __future__ import annotations

import base64

from fastapi import APIRouter
from fastapi.responses import Response

from echo_auth.db.engines import transaction
from echo_auth.identity import mfa
from echo_auth.identity.errors import InvalidCredentials, InvalidInput, NotFound
from echo_auth.identity.mfa import InvalidMfaCode, MfaAlreadyEnabled, MfaNotEnabled
from echo_auth.identity.sessions import CurrentSession
from echo_auth.identity.throttle import RateLimited
from echo_auth.web.deps import SESSION_COOKIE
from echo_auth.web.pages.auth_pages import field_message, password_hint, refusal, retry_headers
from echo_auth.web.pages.context import CheckedForm, Page, PageContext, text_field

router = APIRouter()

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _account(
    page: PageContext,
    current: CurrentSession,
    *,
    status: int = 200,
    errors: dict[str, str] | None = None,
    mfa_errors: dict[str, str] | None = None,
    mfa_error: str | None = None,
) -> Response:
    return page.render(
        "account.html",
        status=status,
        current=current,
        sessions=page.runtime.account.list_sessions(current),
        hint=password_hint(page),
        errors=errors or {},
        mfa_errors=mfa_errors or {},
        mfa_error=mfa_error,
    )


@router.get("/account")
def account(page: Page) -> Response:
    return _account(page, page.require_user())


@router.post("/account/password")
def change_password(page: Page, form: CheckedForm) -> Response:
    current = page.require_user()
    old = text_field(form, "current_password")
    new = text_field(form, "new_password")
    errors: dict[str, str] = {}
    if not old:
        errors["current_password"] = "Enter your current password."
    if not new:
        errors["new_password"] = "Choose a new password."
    elif new != text_field(form, "new_password_repeat"):
        errors["new_password_repeat"] = "The two passwords are not the same."
    if not errors:
        try:
            revoked = page.runtime.account.change_password(current, old, new, page.source)
        except InvalidCredentials:
            errors["current_password"] = "This is not your current password."
        except InvalidInput as exc:
            errors["new_password"] = field_message(exc)
        else:
            others = f" {revoked} other session{'s' if revoked != 1 else ''} signed out."
            return page.redirect(
                "/account#password",
                flash=("success", "Your password is changed." + (others if revoked else "")),
            )
    return _account(page, current, status=422, errors=errors)


@router.post("/account/sessions/revoke-others")
def revoke_other_sessions(page: Page, form: CheckedForm) -> Response:
    current = page.require_user()
    count = page.runtime.account.revoke_others(current, page.source)
    noun = "session" if count == 1 else "sessions"
    return page.redirect(
        "/account#sessions", flash=("success", f"Signed out {count} other {noun}.")
    )


@router.post("/account/sessions/{session_id}/revoke")
def revoke_session(page: Page, form: CheckedForm, session_id: str) -> Response:
    current = page.require_user()
    try:
        page.runtime.account.revoke(current, session_id, page.source)
    except NotFound:
        return page.redirect(
            "/account#sessions", flash=("error", "That session was already signed out.")
        )
    if session_id == current.id:
        response = page.redirect("/login", flash=("info", "You are signed out."))
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax")
        return response
    return page.redirect("/account#sessions", flash=("success", "The session is signed out."))


# -- TOTP ------------------------------------------------------------------------------


@router.post("/account/mfa/totp")
def begin_totp(page: Page, form: CheckedForm) -> Response:
    current = page.require_user()
    try:
        with transaction(page.runtime.identity) as conn:
            enrolment = mfa.begin_enrolment(
                conn, current.user, page.runtime.settings.totp_issuer, page.source
            )
    except MfaAlreadyEnabled:
        return page.redirect(
            "/account#mfa", flash=("error", "Two-step sign-in is already on. Remove it first.")
        )
    qr = base64.b64encode(enrolment.qr_svg.encode()).decode("ascii")
    return page.render(
        "totp_enrol.html",
        headers=NO_STORE,
        qr_data_uri=f"data:image/svg+xml;base64,{qr}",
        secret=enrolment.secret,
        otpauth_uri=enrolment.otpauth_uri,
    )


@router.post("/account/mfa/totp/confirm")
def confirm_totp(page: Page, form: CheckedForm) -> Response:
    current = page.require_user()
    code = text_field(form, "code", mfa.MAX_CODE_LENGTH).strip()
    if not code:
        return page.render(
            "totp_enrol.html",
            status=422,
            headers=NO_STORE,
            errors={"code": "Enter the 6-digit code from your app."},
        )
    try:
        with transaction(page.runtime.identity) as conn:
            codes = mfa.confirm_enrolment(conn, current.user, code, page.source)
    except InvalidMfaCode:
        return page.render(
            "totp_enrol.html",
            status=400,
            headers=NO_STORE,
            errors={"code": "That code is not right. Check the time on your phone and retry."},
        )
    except (MfaNotEnabled, MfaAlreadyEnabled) as exc:
        return page.redirect("/account#mfa", flash=("error", exc.message))
    return page.render("recovery_codes.html", headers=NO_STORE, codes=codes)


@router.post("/account/mfa/totp/remove")
def remove_totp(page: Page, form: CheckedForm) -> Response:
    current = page.require_user()
    password = text_field(form, "password") or None
    code = text_field(form, "code", mfa.MAX_CODE_LENGTH).strip() or None
    errors: dict[str, str] = {}
    if (password is None) == (code is None):
        errors["password"] = "Enter your password, or a code instead (not both)."
    else:
        try:
            mfa.remove_after_verification(
                page.runtime.identity,
                page.runtime.auth.hasher,
                page.runtime.throttle,
                current.user,
                page.source,
                password=password,
                code=code,
            )
        except InvalidCredentials:
            errors["password"] = "This is not your password."
        except InvalidMfaCode:
            errors["code"] = "That code is not right, or was already used."
        except MfaNotEnabled as exc:
            return page.redirect("/account#mfa", flash=("error", exc.message))
        except RateLimited as exc:
            status, message = refusal(exc)
            response = _account(page, current, status=status, mfa_error=message)
            response.headers.update(retry_headers(exc) or {})
            return response
        else:
            return page.redirect("/account#mfa", flash=("success", "Two-step sign-in is off."))
    return _account(page, current, status=422, mfa_errors=errors)
