"""Structured logs: one JSON object a line, with the request id, never a secret.

The request id is carried in a context variable set by the HTTP middleware; Starlette
copies the context into its worker threads, so service code logs it without knowing it.
As a last line of defence the formatter masks anything that looks like a bearer token,
a session cookie or a password field, in case a message ever quotes one.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

request_id_var: ContextVar[str | None] = ContextVar("echo_request_id", default=None)

_SECRET_PATTERNS = (
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1***"),
    (re.compile(r"(?i)(echo_session=|echo_device=)[^;\s]+"), r"\1***"),
    (
        re.compile(
            r'(?i)("?(?:password|new_password|current_password|token|code)"?\s*[:=]\s*)'
            r'("[^"]*"|\S+)'
        ),
        r"\1***",
    ),
)


def mask_secrets(text: str) -> str:
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": mask_secrets(record.getMessage()),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            # The type and message only: a traceback can quote local variables' values.
            exc = record.exc_info[1]
            entry["error"] = mask_secrets(f"{type(exc).__name__}: {exc}")[:2000]
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO", *, json_lines: bool = True) -> None:
    """Send Echo's (and uvicorn's) logs to stderr, as JSON lines unless told otherwise."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
