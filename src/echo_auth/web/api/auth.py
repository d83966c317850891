"""Sign-up, login, logout, the current user, and first-admin setup."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from fastapi import APIRouter, BackgroundTasks, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from echo_auth.identity.auth import LoginResult, MfaChallenge
from echo_auth.identity.devices import DEVICE_COOKIE
from echo_auth.identity.errors import DomainError
from echo_auth.identity.provisioning import redeem_bootstrap_token
from echo_auth.web.deps import SESSION_COOKIE, CurrentSessionDep, RuntimeDep, SourceDep
from echo_auth.web.problems import problem_responses

router = APIRouter(prefix="/v1", tags=["auth"])
DEVICE_COOKIE_MAX_AGE = 60 * 60 * 24 * 365


class Credentials(BaseModel):
    email: str = Field(min_length=1, max_length=320, examples=["ana@example.com"])
    password: str = Field(min_length=1, max_length=4096, examples=["correct horse battery staple"])


class SignupOut(BaseModel):
    user_id: str


class UserOut(BaseModel):
    id: str
    email: str
    email_verified: bool
    roles: list[str]
    mfa_enabled: bool
    created_at: datetime


class LoginOut(BaseModel):
    session_token: str
    expires_at: datetime
    user: UserOut


class MfaRequiredOut(BaseModel):
    mfa_required: bool = True
    mfa_token: str


class MfaLoginIn(BaseModel):
    mfa_token: str = Field(min_length=1, max_length=256)
    code: str = Field(min_length=1, max_length=64, description="A TOTP code or a recovery code")


class SetupIn(Credentials):
    token: str = Field(min_length=1, max_length=256)


def _set_session_cookie(
    response: Response, runtime: RuntimeDep, token: str, expires: datetime
) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        expires=expires,
        httponly=True,
        samesite="lax",
        secure=runtime.settings.cookie_secure,
        path="/",
    )


@router.post(
    "/signup",
    status_code=status.HTTP_201_CREATED,
    response_model=SignupOut,
    responses=problem_responses(422, 503),
)
async def signup(
    body: Credentials, background: BackgroundTasks, runtime: RuntimeDep, source: SourceDep
) -> SignupOut:
    """Create an account; a verification mail follows (sent after this answer)."""
    user_id = await run_in_threadpool(runtime.auth.signup, body.email, body.password, source)
    # After the response (in the threadpool): a verification mail, or, for an address that
    # is already verified, a notice to its owner. See EmailFlows.after_signup.
    background.add_task(runtime.email_flows.after_signup, body.email, source, signed_up_id=user_id)
    return SignupOut(user_id=user_id)


@contextmanager
def count_outcome(request: Request, step: str) -> Iterator[None]:
    """Count a login step's outcome (``echo_logins_total``) by its domain result."""
    counter = request.app.state.http_metrics.logins
    try:
        yield
    except DomainError as exc:
        counter.labels(step, exc.code).inc()
        raise
    counter.labels(step, "success").inc()


def _logged_in(response: Response, runtime: RuntimeDep, result: LoginResult) -> LoginOut:
    _set_session_cookie(response, runtime, result.session.token, result.session.expires_at)
    if result.device_token is not None:
        response.set_cookie(
            DEVICE_COOKIE,
            result.device_token,
            max_age=DEVICE_COOKIE_MAX_AGE,
            httponly=True,
            samesite="lax",
            secure=runtime.settings.cookie_secure,
            path="/",
        )
    return LoginOut(
        session_token=result.session.token,
        expires_at=result.session.expires_at,
        user=UserOut(**result.user.public()),
    )


@router.post(
    "/login",
    response_model=LoginOut | MfaRequiredOut,
    responses=problem_responses(401, 403, 422, 429, 503),
)
async def login(
    body: Credentials,
    request: Request,
    response: Response,
    runtime: RuntimeDep,
    source: SourceDep,
) -> LoginOut | MfaRequiredOut:
    """Password step. Answers a session, or ``mfa_required`` with a token for ``/login/mfa``."""
    device = request.cookies.get(DEVICE_COOKIE)
    with count_outcome(request, "password"):
        result = await run_in_threadpool(
            runtime.auth.login, body.email, body.password, source, device
        )
    if isinstance(result, MfaChallenge):
        return MfaRequiredOut(mfa_token=result.mfa_token)
    return _logged_in(response, runtime, result)


@router.post("/login/mfa", response_model=LoginOut, responses=problem_responses(400, 403, 422, 429))
async def login_mfa(
    body: MfaLoginIn,
    request: Request,
    response: Response,
    runtime: RuntimeDep,
    source: SourceDep,
) -> LoginOut:
    """Second step: a TOTP code or a recovery code completes the login."""
    device = request.cookies.get(DEVICE_COOKIE)
    with count_outcome(request, "mfa"):
        result = await run_in_threadpool(
            runtime.auth.complete_mfa, body.mfa_token, body.code, source, device
        )
    return _logged_in(response, runtime, result)


@router.post(
    "/logout", status_code=status.HTTP_204_NO_CONTENT, responses=problem_responses(401, 403)
)
def logout(current: CurrentSessionDep, runtime: RuntimeDep, source: SourceDep) -> Response:
    runtime.auth.logout(current, source)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax")
    return response


@router.get("/me", response_model=UserOut, responses=problem_responses(401))
async def me(current: CurrentSessionDep) -> UserOut:
    return UserOut(**current.user.public())


@router.post(
    "/setup",
    status_code=status.HTTP_201_CREATED,
    response_model=UserOut,
    responses=problem_responses(400, 409, 422, 503),
)
async def setup(body: SetupIn, runtime: RuntimeDep, source: SourceDep) -> UserOut:
    """Create the first admin with the one-time token printed at first start."""
    user = await run_in_threadpool(
        redeem_bootstrap_token, runtime.auth, body.token, body.email, body.password, source
    )
    return UserOut(**user.public())
