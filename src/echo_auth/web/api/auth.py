"""Sign-up, login, logout, the current user, and first-admin setup."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from echo_auth.identity.provisioning import redeem_bootstrap_token
from echo_auth.web.deps import SESSION_COOKIE, CurrentSessionDep, RuntimeDep, SourceDep

router = APIRouter(prefix="/v1", tags=["auth"])


class Credentials(BaseModel):
    email: str = Field(min_length=1, max_length=320, examples=["ana@example.com"])
    password: str = Field(min_length=1, max_length=4096)


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


@router.post("/signup", status_code=status.HTTP_201_CREATED, response_model=SignupOut)
async def signup(body: Credentials, runtime: RuntimeDep, source: SourceDep) -> SignupOut:
    user_id = await run_in_threadpool(runtime.auth.signup, body.email, body.password, source)
    return SignupOut(user_id=user_id)


@router.post("/login", response_model=LoginOut)
async def login(
    body: Credentials, response: Response, runtime: RuntimeDep, source: SourceDep
) -> LoginOut:
    result = await run_in_threadpool(runtime.auth.login, body.email, body.password, source)
    _set_session_cookie(response, runtime, result.session.token, result.session.expires_at)
    return LoginOut(
        session_token=result.session.token,
        expires_at=result.session.expires_at,
        user=UserOut(**result.user.public()),
    )


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT)
def logout(current: CurrentSessionDep, runtime: RuntimeDep, source: SourceDep) -> Response:
    runtime.auth.logout(current, source)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax")
    return response


@router.get("/me", response_model=UserOut)
def me(current: CurrentSessionDep) -> UserOut:
    return UserOut(**current.user.public())


@router.post("/setup", status_code=status.HTTP_201_CREATED, response_model=UserOut)
async def setup(body: SetupIn, runtime: RuntimeDep, source: SourceDep) -> UserOut:
    """Create the first admin with the one-time token printed at first start."""
    user = await run_in_threadpool(
        redeem_bootstrap_token, runtime.auth, body.token, body.email, body.password, source
    )
    return UserOut(**user.public())
