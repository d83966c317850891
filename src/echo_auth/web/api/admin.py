"""The admin API: users, their state, roles and sessions. Role ``admin`` only."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from pydantic import BaseModel, Field

from echo_auth.audit.events import Actor
from echo_auth.identity.auth import user_actor
from echo_auth.identity.users import User
from echo_auth.web.deps import Admin, RuntimeDep, SourceDep
from echo_auth.web.problems import problem_responses

router = APIRouter(
    prefix="/v1/admin/users", tags=["admin"], responses=problem_responses(401, 403, 404, 422)
)


class AdminUserOut(BaseModel):
    id: str
    email: str
    email_verified: bool
    roles: list[str]
    mfa_enabled: bool
    disabled: bool
    created_at: datetime


class AdminUserDetail(AdminUserOut):
    live_sessions: int


class UserPageOut(BaseModel):
    users: list[AdminUserOut]
    next_cursor: str | None


class RolesIn(BaseModel):
    roles: list[Annotated[str, Field(max_length=16)]] = Field(max_length=8)


class CountOut(BaseModel):
    revoked: int


def _out(user: User) -> AdminUserOut:
    return AdminUserOut(**user.public(), disabled=user.disabled)


def _actor(current: Admin) -> Actor:
    actor = user_actor(current.user)
    return Actor("admin", actor.id, actor.label)


@router.get("", response_model=UserPageOut)
def list_users(
    current: Admin,
    runtime: RuntimeDep,
    source: SourceDep,
    q: Annotated[str | None, Query(max_length=320)] = None,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query()] = 50,
) -> UserPageOut:
    page = runtime.admin.list_users(_actor(current), source, q=q, cursor=cursor, limit=limit)
    return UserPageOut(users=[_out(u) for u in page.users], next_cursor=page.next_cursor)


@router.get("/{user_id}", response_model=AdminUserDetail)
def view_user(
    user_id: str, current: Admin, runtime: RuntimeDep, source: SourceDep
) -> AdminUserDetail:
    user, live = runtime.admin.view_user(_actor(current), source, user_id)
    return AdminUserDetail(**_out(user).model_dump(), live_sessions=live)


@router.post("/{user_id}/disable", response_model=CountOut, responses=problem_responses(409))
def disable(user_id: str, current: Admin, runtime: RuntimeDep, source: SourceDep) -> CountOut:
    """Disable the user: login refused and every session revoked."""
    return CountOut(revoked=runtime.admin.disable(_actor(current), source, user_id))


@router.post("/{user_id}/enable", status_code=status.HTTP_204_NO_CONTENT)
def enable(user_id: str, current: Admin, runtime: RuntimeDep, source: SourceDep) -> Response:
    runtime.admin.enable(_actor(current), source, user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{user_id}/unlock", status_code=status.HTTP_204_NO_CONTENT)
def unlock(user_id: str, current: Admin, runtime: RuntimeDep, source: SourceDep) -> Response:
    """Lift a brute-force lock on the user's address."""
    runtime.admin.unlock(_actor(current), source, user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.put("/{user_id}/roles", response_model=AdminUserOut, responses=problem_responses(409))
def set_roles(
    user_id: str, body: RolesIn, current: Admin, runtime: RuntimeDep, source: SourceDep
) -> AdminUserOut:
    return _out(runtime.admin.set_roles(_actor(current), source, user_id, body.roles))


@router.delete("/{user_id}/sessions", response_model=CountOut)
def revoke_sessions(
    user_id: str, current: Admin, runtime: RuntimeDep, source: SourceDep
) -> CountOut:
    return CountOut(revoked=runtime.admin.revoke_sessions(_actor(current), source, user_id))
