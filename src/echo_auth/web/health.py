"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from echo_auth.audit.checkpoints import public_key_pem
from echo_auth.db import migrate
from echo_auth.identity.errors import NotFound
from echo_auth.runtime import Runtime
from echo_auth.web.problems import problem, problem_responses

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving; says nothing about the databases."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None, responses=problem_responses(503))
def readyz(request: Request) -> dict[str, object] | Response:
    """Both databases reachable and their migrations at head; 503 otherwise."""
    runtime: Runtime = request.app.state.runtime
    checks: dict[str, str] = {}
    for name, engine in (("identity", runtime.identity), ("audit", runtime.audit_reader)):
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            at_head = migrate.is_at_head(engine, name)  # type: ignore[arg-type]
            checks[name] = "ok" if at_head else "migrations pending"
        except DBAPIError:
            checks[name] = "unreachable"
    if all(v == "ok" for v in checks.values()):
        return {"status": "ready", "checks": checks}
    return problem(
        503,
        "not_ready",
        "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok"),
        checks=checks,
    )


@router.get(
    "/.well-known/echo-checkpoint-key.pem",
    response_class=PlainTextResponse,
    responses=problem_responses(404),
)
def checkpoint_public_key(request: Request) -> str:
    """The Ed25519 public key that verifies the audit log's signed checkpoints (PEM)."""
    runtime: Runtime = request.app.state.runtime
    key = runtime.checkpoint_public_key
    if key is None:
        raise NotFound("no checkpoint has been signed by this installation yet")
    return public_key_pem(key)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
)
def metrics(request: Request) -> Response:
    registry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
