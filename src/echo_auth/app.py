"""``create_app(settings)``: the one composition root of the HTTP service."""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import DBAPIError

from echo_auth import __version__
from echo_auth.audit.events import Actor, AuditEvent
from echo_auth.audit.outbox import enqueue_event
from echo_auth.audit.relay import RelayStats, run_relay
from echo_auth.config import Settings
from echo_auth.db.engines import transaction
from echo_auth.runtime import Runtime
from echo_auth.web import health, pages, problems
from echo_auth.web.api import account as account_api
from echo_auth.web.api import admin as admin_api
from echo_auth.web.api import audit as audit_api
from echo_auth.web.api import auth as auth_api
from echo_auth.web.api import mfa as mfa_api
from echo_auth.web.api import recovery as recovery_api
from echo_auth.web.api import tokens as tokens_api
from echo_auth.web.metrics import PipelineCollector
from echo_auth.web.middleware import EchoMiddleware, HttpMetrics

log = logging.getLogger("echo_auth")


def create_app(
    settings: Settings,
    *,
    runtime: Runtime | None = None,
    run_relay_in_process: bool = False,
    freeze_gc: bool = False,
) -> FastAPI:
    """Build the ASGI app. ``run_relay_in_process`` starts a relay thread with the app.

    ``freeze_gc`` (for a serving process, not for tests that build many apps) exempts
    what exists at start-up from garbage collection.
    """
    owns_runtime = runtime is None
    runtime = runtime or Runtime(settings)
    relay_stats = RelayStats()
    registry = CollectorRegistry()
    registry.register(PipelineCollector(runtime, relay_stats))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        relay_thread: threading.Thread | None = None
        _record_start(runtime)
        if run_relay_in_process:
            relay_thread = threading.Thread(
                target=run_relay,
                args=(runtime.relay_identity, runtime.audit, runtime.relay_policy, stop),
                kwargs={"stats": relay_stats, "checkpointer": runtime.checkpointer},
                name="echo-relay",
                daemon=True,
            )
            relay_thread.start()
        # Everything built so far (modules, routes, schemas) lives as long as the process:
        # move it out of the collector's sight, so a full collection under load walks
        # only request garbage instead of pausing every request for tens of milliseconds.
        if freeze_gc:
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            stop.set()
            if relay_thread is not None:
                relay_thread.join(timeout=10)
            await runtime.aclose()
            if owns_runtime:
                runtime.close()

    app = FastAPI(
        title="Echo",
        version=__version__,
        summary="Identity service with a tamper-evident audit log",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.metrics_registry = registry
    problems.install(app)
    app.include_router(auth_api.router)
    app.include_router(account_api.router)
    app.include_router(admin_api.router)
    app.include_router(audit_api.router)
    app.include_router(mfa_api.router)
    app.include_router(recovery_api.router)
    app.include_router(tokens_api.router)
    app.include_router(health.router)
    pages.install(app, settings)
    http_metrics = HttpMetrics(registry)
    app.state.http_metrics = http_metrics
    app.add_middleware(
        EchoMiddleware,
        max_body_bytes=settings.max_body_bytes,
        metrics=http_metrics,
    )
    return app


def _record_start(runtime: Runtime) -> None:
    try:
        with transaction(runtime.identity) as conn:
            enqueue_event(
                conn,
                AuditEvent(
                    action="system.started",
                    outcome="success",
                    actor=Actor.system(),
                    metadata={"version": __version__, "pid": os.getpid()},
                ),
            )
    except DBAPIError as exc:
        log.warning("could not record system.started: %s", type(exc).__name__)


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (used by ``echo-auth serve --workers N``)."""
    from echo_auth.config import load_settings

    settings = load_settings()
    settings.check_for_serving()
    relay = os.environ.get("ECHO_SERVE_RELAY", "1") == "1"
    return create_app(settings, run_relay_in_process=relay, freeze_gc=True)
