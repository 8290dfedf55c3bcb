"""The one place that configures logging: structlog JSON lines, one event per line.

Entry points call ``configure`` once. Per-request context (request_id, trace_id,
operator) is bound with ``structlog.contextvars`` inside the task serving the
request, so every line logged while serving it carries those keys.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
           "critical": logging.CRITICAL}


def configure(level: str = "info", *, stream: IO[str] | None = None, file: str | None = None, **static: Any) -> None:
    """Send JSON lines to ``file`` (appending) or ``stream`` (default stderr).

    ``static`` keys (component, node, worker) are added to every event.
    """
    out: IO[str] = open(file, "a", buffering=1) if file else (stream or sys.stderr)  # noqa: SIM115 - lives as long as the process
    structlog.contextvars.clear_contextvars()
    if static:
        structlog.contextvars.bind_contextvars(**static)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level.lower()]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(logger_name=name)
