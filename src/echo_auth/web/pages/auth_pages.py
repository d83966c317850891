"""Signing in and out, signing up, the mailed links, and the first admin's set-up page.

Every action calls the service the JSON API calls (``runtime.auth``,
``runtime.email_flows``, ``redeem_bootstrap_token``), so it records the same events.
The mail-sending steps run after the answer, as in the API, so neither the page nor its
timing tells whether an address has an account.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query
from fastapi.responses import Response

from echo_auth.identity.auth import AccountDisabled, LoginResult, MfaChallenge
from echo_auth.identity.devices import DEVICE_COOKIE
from echo_auth.identity.errors import (
    DomainError,
    InvalidCredentials,
    InvalidInput,
    InvalidToken,
    Overloaded,
)
from echo_auth.identity.mfa import MAX_CODE_LENGTH, InvalidMfaCode
from echo_auth.identity.provisioning import redeem_bootstrap_token
from echo_auth.identity.throttle import RateLimited
from echo_auth.identity.users import normalize_email
from echo_auth.web.api.auth import DEVICE_COOKIE_MAX_AGE
from echo_auth.web.api.recovery import ACCEPTED_MESSAGE
from echo_auth.web.deps import SESSION_COOKIE
from echo_auth.web.pages.context import CheckedForm, Page, PageContext, safe_next, text_field

router = APIRouter()

EMAIL_MAX = 320
TOKEN_MAX = 256


def field_message(exc: InvalidInput) -> str:
    """The message of a field error without its ``field:`` prefix, as a sentence."""
    message = exc.message.removeprefix(f"{exc.field}: ")
    return message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")


def refusal(exc: DomainError) -> tuple[int, str]:
    """Status and sentence for refusals that are not about one field."""
    if isinstance(exc, RateLimited):
        return 429, f"Too many attempts. Try again in {exc.retry_after} seconds."
    if isinstance(exc, AccountDisabled):
        return 403, "This account is disabled. Contact your administrator."
    if isinstance(exc, Overloaded):
        return 503, "The service is busy right now. Try again in a moment."
    return 400, exc.message


def retry_headers(exc: DomainError) -> dict[str, str] | None:
    if isinstance(exc, RateLimited):
        return {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, Overloaded):
        return {"Retry-After": "1"}
    return None


def required(values: dict[str, str], labels: dict[str, str]) -> dict[str, str]:
    return {name: f"Enter {label}." for name, label in labels.items() if not values.get(name)}


def password_hint(page: PageContext) -> str:
    s = page.runtime.settings
    return f"At least {s.password_min_length} characters. A long passphrase is best."


# -- home and sign-in ------------------------------------------------------------------


@router.get("/")
def home(page: Page) -> Response:
    return page.redirect("/account" if page.session else "/login")


@router.get("/login")
def login_form(page: Page, next_url: Annotated[str | None, Query(alias="next")] = None) -> Response:
    if page.session is not None:
        return page.redirect(safe_next(next_url))
    return page.render("login.html", step="password", next=safe_next(next_url, ""), values={})


def _signed_in(page: PageContext, result: LoginResult, next_url: str) -> Response:
    """Set the session and device cookies as the API does, and go on."""
    page.rotate_nonce()
    response = page.redirect(next_url)
    secure = page.runtime.settings.cookie_secure
    response.set_cookie(
        SESSION_COOKIE,
        result.session.token,
        expires=result.session.expires_at,
        httponly=True,
        samesite="lax",
        secure=secure,
        path="/",
    )
    if result.device_token is not None:
        response.set_cookie(
            DEVICE_COOKIE,
            result.device_token,
            max_age=DEVICE_COOKIE_MAX_AGE,
            httponly=True,
            samesite="lax",
            secure=secure,
            path="/",
        )
    return response


@router.post("/login")
def login_submit(page: Page, form: CheckedForm) -> Response:
    values = {"email": text_field(form, "email", EMAIL_MAX)}
    password = text_field(form, "password")
    next_url = safe_next(text_field(form, "next"))

    def again(status: int, errors: dict[str, str], message: str | None = None) -> Response:
        return page.render(
            "login.html",
            status=status,
            step="password",
            next=next_url,
            values=values,
            errors=errors,
            form_error=message,
        )

    errors = required({**values, "password": password}, {"email": "your email address"})
    if not password:
        errors["password"] = "Enter your password."
    if errors:
        return again(422, errors)
    try:
        result = page.runtime.auth.login(
            values["email"], password, page.source, page.request.cookies.get(DEVICE_COOKIE)
        )
    except InvalidCredentials:
        return again(401, {}, "The email or password is not right.")
    except InvalidInput as exc:
        return again(422, {"email": field_message(exc)})
    except (RateLimited, AccountDisabled, Overloaded) as exc:
        status, message = refusal(exc)
        response = again(status, {}, message)
        response.headers.update(retry_headers(exc) or {})
        return response
    if isinstance(result, MfaChallenge):
        return page.render(
            "login.html", step="mfa", next=next_url, mfa_token=result.mfa_token, values=values
        )
    return _signed_in(page, result, next_url)


@router.post("/login/mfa")
def login_mfa_submit(page: Page, form: CheckedForm) -> Response:
    mfa_token = text_field(form, "mfa_token", TOKEN_MAX)
    code = text_field(form, "code", MAX_CODE_LENGTH).strip()
    next_url = safe_next(text_field(form, "next"))

    def again(status: int, errors: dict[str, str], message: str | None = None) -> Response:
        return page.render(
            "login.html",
            status=status,
            step="mfa",
            next=next_url,
            mfa_token=mfa_token,
            values={},
            errors=errors,
            form_error=message,
        )

    if not code:
        return again(422, {"code": "Enter the code from your authenticator app."})
    try:
        result = page.runtime.auth.complete_mfa(
            mfa_token, code, page.source, page.request.cookies.get(DEVICE_COOKIE)
        )
    except InvalidMfaCode:
        return again(400, {"code": "That code is not right, or was already used."})
    except InvalidToken:
        return page.render(
            "login.html",
            status=400,
            step="password",
            next=next_url,
            values={},
            form_error="That sign-in took too long. Enter your email and password again.",
        )
    except (RateLimited, AccountDisabled, Overloaded) as exc:
        status, message = refusal(exc)
        response = again(status, {}, message)
        response.headers.update(retry_headers(exc) or {})
        return response
    return _signed_in(page, result, next_url)


@router.get("/logout")
def logout_form(page: Page) -> Response:
    if page.session is None:
        return page.redirect("/login")
    return page.render("logout.html")


@router.post("/logout")
def logout_submit(page: Page, form: CheckedForm) -> Response:
    if page.session is not None:
        page.runtime.auth.logout(page.session, page.source)
    response = page.redirect("/login", flash=("info", "You are signed out."))
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax")
    return response


# -- sign-up and the verification link -------------------------------------------------


@router.get("/signup")
def signup_form(page: Page) -> Response:
    return page.render("signup.html", values={}, hint=password_hint(page))


@router.post("/signup")
def signup_submit(page: Page, form: CheckedForm, background: BackgroundTasks) -> Response:
    values = {"email": text_field(form, "email", EMAIL_MAX)}
    password = text_field(form, "password")
    errors = required(values, {"email": "your email address"})
    if not password:
        errors["password"] = "Choose a password."
    if not errors:
        try:
            user_id = page.runtime.auth.signup(values["email"], password, page.source)
        except InvalidInput as exc:
            errors[exc.field if exc.field in ("email", "password") else "email"] = field_message(
                exc
            )
        except Overloaded as exc:
            return page.render(
                "signup.html",
                status=503,
                values=values,
                hint=password_hint(page),
                form_error=refusal(exc)[1],
            )
        else:
            # As the API: a verification mail, or a notice to an existing account's owner,
            # sent after the answer (EmailFlows.after_signup).
            background.add_task(
                page.runtime.email_flows.after_signup,
                values["email"],
                page.source,
                signed_up_id=user_id,
            )
            return page.render("signup_sent.html", email=values["email"])
    return page.render(
        "signup.html", status=422, values=values, errors=errors, hint=password_hint(page)
    )


@router.get("/verify-email")
def verify_email(page: Page, token: str | None = None) -> Response:
    """Following the mailed link confirms the address (the token is single-use)."""
    if not token:
        return page.render("verify_email.html", state="resend", values={})
    if len(token) > TOKEN_MAX:
        return page.render("verify_email.html", status=400, state="invalid", values={})
    try:
        page.runtime.email_flows.confirm_verification(token, page.source)
    except InvalidToken:
        return page.render("verify_email.html", status=400, state="invalid", values={})
    return page.render("verify_email.html", state="confirmed")


@router.post("/verify-email/resend")
def resend_verification(page: Page, form: CheckedForm, background: BackgroundTasks) -> Response:
    values = {"email": text_field(form, "email", EMAIL_MAX)}
    try:
        email = normalize_email(values["email"])
    except InvalidInput as exc:
        return page.render(
            "verify_email.html",
            status=422,
            state="resend",
            values=values,
            errors={"email": field_message(exc)},
        )
    background.add_task(page.runtime.email_flows.resend_verification, email, page.source)
    return page.render("verify_email.html", state="sent", message=ACCEPTED_MESSAGE)


# -- forgotten password ----------------------------------------------------------------


@router.get("/forgot-password")
def forgot_form(page: Page) -> Response:
    return page.render("forgot_password.html", values={})


@router.post("/forgot-password")
def forgot_submit(page: Page, form: CheckedForm, background: BackgroundTasks) -> Response:
    values = {"email": text_field(form, "email", EMAIL_MAX)}
    try:
        email = normalize_email(values["email"])
    except InvalidInput as exc:
        return page.render(
            "forgot_password.html", status=422, values=values, errors={"email": field_message(exc)}
        )
    background.add_task(page.runtime.email_flows.request_reset, email, page.source)
    return page.render("forgot_password.html", sent=True, message=ACCEPTED_MESSAGE, values={})


@router.get("/reset-password")
def reset_form(page: Page, token: str | None = None) -> Response:
    if not token or len(token) > TOKEN_MAX:
        return page.render("reset_password.html", status=400, state="invalid")
    return page.render("reset_password.html", state="form", token=token, hint=password_hint(page))


@router.post("/reset-password")
def reset_submit(page: Page, form: CheckedForm) -> Response:
    token = text_field(form, "token", TOKEN_MAX)
    new_password = text_field(form, "new_password")
    repeat = text_field(form, "new_password_repeat")
    errors: dict[str, str] = {}
    if not new_password:
        errors["new_password"] = "Choose a new password."
    elif new_password != repeat:
        errors["new_password_repeat"] = "The two passwords are not the same."
    if not errors:
        try:
            page.runtime.email_flows.complete_reset(token, new_password, page.source)
        except InvalidToken:
            return page.render("reset_password.html", status=400, state="invalid")
        except InvalidInput as exc:
            errors["new_password"] = field_message(exc)
        except (AccountDisabled, Overloaded) as exc:
            status, message = refusal(exc)
            return page.render(
                "reset_password.html",
                status=status,
                state="form",
                token=token,
                hint=password_hint(page),
                form_error=message,
            )
        else:
            return page.redirect(
                "/login",
                flash=("success", "Your password is changed. Sign in with the new one."),
            )
    return page.render(
        "reset_password.html",
        status=422,
        state="form",
        token=token,
        errors=errors,
        hint=password_hint(page),
    )


# -- the first admin -------------------------------------------------------------------


@router.get("/setup")
def setup_form(page: Page, token: str | None = None) -> Response:
    values = {"token": (token or "")[:TOKEN_MAX]}
    return page.render("setup.html", values=values, hint=password_hint(page))


@router.post("/setup")
def setup_submit(page: Page, form: CheckedForm) -> Response:
    values = {
        "token": text_field(form, "token", TOKEN_MAX),
        "email": text_field(form, "email", EMAIL_MAX),
    }
    password = text_field(form, "password")
    errors = required(values, {"token": "the set-up token", "email": "your email address"})
    if not password:
        errors["password"] = "Choose a password."
    status = 422
    if not errors:
        try:
            redeem_bootstrap_token(
                page.runtime.auth, values["token"], values["email"], password, page.source
            )
        except InvalidToken:
            status = 400
            errors["token"] = "This set-up token is unknown, used or expired."
        except InvalidInput as exc:
            errors[exc.field if exc.field in ("email", "password") else "email"] = field_message(
                exc
            )
        except Overloaded as exc:
            status, message = refusal(exc)
            return page.render(
                "setup.html",
                status=status,
                values=values,
                hint=password_hint(page),
                form_error=message,
            )
        else:
            return page.redirect(
                "/login",
                flash=("success", "Your administrator account is ready. Sign in."),
            )
    return page.render(
        "setup.html", status=status, values=values, errors=errors, hint=password_hint(page)
    )
