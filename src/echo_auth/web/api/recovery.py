"""Mailed links: confirming an address, resending that mail, resetting a password.

The two routes that take an address answer 202 at once with the same body whatever the
address, and do their work (look-up, token, event, mail) after the response has been
sent, so neither the answer nor its timing says whether the address has an account.
Malformed addresses are still refused up front (422): that reveals nothing.
"""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from echo_auth.identity.users import normalize_email
from echo_auth.web.deps import RuntimeDep, SourceDep
from echo_auth.web.problems import problem_responses

router = APIRouter(prefix="/v1", tags=["recovery"])

ACCEPTED_MESSAGE = "If this address belongs to an account, a mail is on its way."


class TokenIn(BaseModel):
    token: str = Field(min_length=1, max_length=256, description="The token from the mail")


class EmailIn(BaseModel):
    email: str = Field(min_length=1, max_length=320, examples=["ana@example.com"])


class ResetConfirmIn(BaseModel):
    token: str = Field(min_length=1, max_length=256, description="The token from the mail")
    new_password: str = Field(min_length=1, max_length=4096)


class AcceptedOut(BaseModel):
    message: str = ACCEPTED_MESSAGE


@router.post(
    "/email-verification/confirm",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problem_responses(400, 422),
)
async def confirm_email_verification(
    body: TokenIn, runtime: RuntimeDep, source: SourceDep
) -> Response:
    """Confirm an address with the token from the verification mail."""
    await run_in_threadpool(runtime.email_flows.confirm_verification, body.token, source)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/email-verification/resend",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=AcceptedOut,
    responses=problem_responses(422),
)
def resend_email_verification(
    body: EmailIn, background: BackgroundTasks, runtime: RuntimeDep, source: SourceDep
) -> AcceptedOut:
    """Mail a new verification link, if the address has an account that is not verified."""
    email = normalize_email(body.email)
    background.add_task(runtime.email_flows.resend_verification, email, source)
    return AcceptedOut()


@router.post(
    "/password-reset",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=AcceptedOut,
    responses=problem_responses(422),
)
def request_password_reset(
    body: EmailIn, background: BackgroundTasks, runtime: RuntimeDep, source: SourceDep
) -> AcceptedOut:
    """Mail a single-use reset link, if the address has an account. Always 202."""
    email = normalize_email(body.email)
    background.add_task(runtime.email_flows.request_reset, email, source)
    return AcceptedOut()


@router.post(
    "/password-reset/confirm",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problem_responses(400, 403, 422, 503),
)
async def confirm_password_reset(
    body: ResetConfirmIn, runtime: RuntimeDep, source: SourceDep
) -> Response:
    """Set a new password with the token from the reset mail; every session is revoked."""
    await run_in_threadpool(
        runtime.email_flows.complete_reset, body.token, body.new_password, source
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
