"""The caller's own second factor: TOTP enrolment, confirmation (recovery codes), removal."""

from __future__ import annotations

from typing import Self

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, Field, model_validator

from echo_auth.db.engines import transaction
from echo_auth.identity import mfa
from echo_auth.web.deps import CurrentSessionDep, RuntimeDep, SourceDep
from echo_auth.web.problems import problem_responses

router = APIRouter(prefix="/v1/me/mfa", tags=["mfa"], responses=problem_responses(401, 403, 409))

# Answers carrying a secret or the recovery codes must never be stored by a cache.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class EnrolmentOut(BaseModel):
    secret: str = Field(description="Base32 TOTP secret, for typing into an app by hand")
    otpauth_uri: str
    qr_svg: str = Field(description="The otpauth URI as a QR code, a standalone SVG document")


class CodeIn(BaseModel):
    code: str = Field(min_length=1, max_length=mfa.MAX_CODE_LENGTH, examples=["123456"])


class RecoveryCodesOut(BaseModel):
    recovery_codes: list[str] = Field(description="Shown once; each works once")


class RemoveIn(BaseModel):
    """Re-verification for removing the factor: the password, or a TOTP or recovery code."""

    password: str | None = Field(default=None, min_length=1, max_length=4096)
    code: str | None = Field(default=None, min_length=1, max_length=mfa.MAX_CODE_LENGTH)

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.password is None) == (self.code is None):
            raise ValueError("give either password or code")
        return self


@router.post("/totp", response_model=EnrolmentOut)
def begin_totp_enrolment(
    current: CurrentSessionDep, runtime: RuntimeDep, source: SourceDep, response: Response
) -> EnrolmentOut:
    """Start enrolment: a new secret, not active until confirmed with a first code."""
    with transaction(runtime.identity) as conn:
        enrolment = mfa.begin_enrolment(conn, current.user, runtime.settings.totp_issuer, source)
    response.headers.update(NO_STORE)
    return EnrolmentOut(
        secret=enrolment.secret, otpauth_uri=enrolment.otpauth_uri, qr_svg=enrolment.qr_svg
    )


@router.post(
    "/totp/confirm", response_model=RecoveryCodesOut, responses=problem_responses(400, 422)
)
def confirm_totp_enrolment(
    body: CodeIn,
    current: CurrentSessionDep,
    runtime: RuntimeDep,
    source: SourceDep,
    response: Response,
) -> RecoveryCodesOut:
    """Confirm with a code from the app; turns MFA on and returns the recovery codes once."""
    with transaction(runtime.identity) as conn:
        codes = mfa.confirm_enrolment(conn, current.user, body.code, source)
    response.headers.update(NO_STORE)
    return RecoveryCodesOut(recovery_codes=codes)


@router.delete(
    "/totp",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problem_responses(400, 401, 422, 429, 503),
)
def remove_totp(
    body: RemoveIn, current: CurrentSessionDep, runtime: RuntimeDep, source: SourceDep
) -> Response:
    """Remove the factor and its recovery codes, after the password or a code."""
    mfa.remove_after_verification(
        runtime.identity,
        runtime.auth.hasher,
        runtime.throttle,
        current.user,
        source,
        password=body.password,
        code=body.code,
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
