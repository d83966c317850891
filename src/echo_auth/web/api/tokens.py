"""Access tokens: a short-lived JWT for the current session, and the keys that verify it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel

from echo_auth.audit.events import AuditEvent, Target
from echo_auth.audit.outbox import enqueue_event
from echo_auth.db.engines import transaction
from echo_auth.identity.auth import user_actor
from echo_auth.web.deps import CurrentSessionDep, RuntimeDep, SourceDep
from echo_auth.web.problems import problem_responses

router = APIRouter(tags=["tokens"])


class TokenOut(BaseModel):
    access_token: str
    token_type: Literal["Bearer"] = "Bearer"  # noqa: S105 - a scheme name, not a secret
    expires_in: int


class JwkOut(BaseModel):
    kty: str
    crv: str
    x: str
    kid: str
    use: str
    alg: str


class JwksOut(BaseModel):
    keys: list[JwkOut]


@router.post("/v1/token", response_model=TokenOut, responses=problem_responses(401, 403))
def issue_access_token(
    current: CurrentSessionDep, runtime: RuntimeDep, source: SourceDep, response: Response
) -> TokenOut:
    """A signed JWT (EdDSA) for the current session; verify it with the JWKS."""
    minted = runtime.access_tokens.mint(current)
    # Recorded (and committed) before the token leaves: no token without its event.
    with transaction(runtime.identity) as conn:
        enqueue_event(
            conn,
            AuditEvent(
                action="token.issued",
                outcome="success",
                actor=user_actor(current.user),
                target=Target("user", current.user.id),
                source=source,
                metadata={
                    "jti": minted.jti,
                    "kid": minted.kid,
                    "session_id": current.id,
                    "expires_at": datetime.fromtimestamp(minted.expires_at, UTC).strftime(
                        "%Y-%m-%dT%H:%M:%SZ"
                    ),
                },
            ),
        )
    # RFC 6749 §5.1: token responses are not cached.
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return TokenOut(access_token=minted.token, expires_in=minted.expires_in)


@router.get("/.well-known/jwks.json", response_model=JwksOut)
def jwks(runtime: RuntimeDep, response: Response) -> JwksOut:
    """The public keys (JWK Set, RFC 7517) that verify Echo's access tokens."""
    # Short: after a rotation, verifiers should see the new key soon (an unknown kid
    # makes well-behaved clients refetch anyway).
    response.headers["Cache-Control"] = "public, max-age=60"
    return JwksOut.model_validate(runtime.access_tokens.jwks())
