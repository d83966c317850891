"""The signed-in user's sessions and password."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from echo_auth.web.deps import CurrentSessionDep, RuntimeDep, SourceDep
from echo_auth.web.problems import problem_responses

router = APIRouter(prefix="/v1/me", tags=["account"], responses=problem_responses(401, 403))


class SessionOut(BaseModel):
    id: str
    device: str
    ip: str | None
    user_agent: str | None
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    current: bool


class SessionsOut(BaseModel):
    sessions: list[SessionOut]


class RevokedOut(BaseModel):
    revoked: int


class PasswordChangeIn(BaseModel):
    current_password: str = Field(min_length=1, max_length=4096)
    new_password: str = Field(min_length=1, max_length=4096)


@router.get("/sessions", response_model=SessionsOut)
def list_sessions(current: CurrentSessionDep, runtime: RuntimeDep) -> SessionsOut:
    infos = runtime.account.list_sessions(current)
    return SessionsOut(sessions=[SessionOut(**i.public()) for i in infos])


@router.delete(
    "/sessions/{session_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problem_responses(404),
)
def revoke_session(
    session_id: str, current: CurrentSessionDep, runtime: RuntimeDep, source: SourceDep
) -> Response:
    runtime.account.revoke(current, session_id, source)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/sessions/revoke-others", response_model=RevokedOut)
def revoke_others(current: CurrentSessionDep, runtime: RuntimeDep, source: SourceDep) -> RevokedOut:
    return RevokedOut(revoked=runtime.account.revoke_others(current, source))


@router.post(
    "/password", status_code=status.HTTP_204_NO_CONTENT, responses=problem_responses(422, 429, 503)
)
async def change_password(
    body: PasswordChangeIn, current: CurrentSessionDep, runtime: RuntimeDep, source: SourceDep
) -> Response:
    """Change the password; every other session is revoked."""
    await run_in_threadpool(
        runtime.account.change_password, current, body.current_password, body.new_password, source
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
