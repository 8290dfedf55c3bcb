"""The one place that configures logging: structlog JSON lines, one event per line.

Entry points call ``configure`` once. Per-request context (request_id, trace_id,
operator) is bound with ``structlog.contextvars`` inside the task serving the
request, so every line logged while serving it carries those keys.

Records of the standard ``logging`` module (nats-py, ucxx, asyncio, tritonclient)
go through the same JSON renderer, to the same file, so every line of every
``*.log`` is JSON. A file rotates by size (``rotate_bytes``, ``backups`` kept);
without a file, lines go to standard error (journald under systemd).

structlog's own events skip the stdlib machinery (a ``WriteLogger`` on the same
stream, behind a lock shared with the stdlib handler): the per-request summary
line is on the hot path, and going through ``logging.Logger`` costs about 3x more.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import threading
from typing import IO, Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
           "critical": logging.CRITICAL}
# Third-party loggers that are chatty at info: only their warnings reach our logs.
_QUIET = ("asyncio", "nats", "ucxx", "urllib3", "grpc", "tritonclient")
ROTATE_BYTES = 64 << 20
BACKUPS = 5


class _RotatingStream:
    """A text stream over a size-rotated file, shared by structlog and the stdlib handler."""

    def __init__(self, handler: logging.Handler) -> None:
        self._handler = handler
        self.lock = threading.RLock()

    def write(self, line: str) -> None:
        with self.lock:
            record = logging.makeLogRecord({"msg": line.rstrip("\n")})
            handler = self._handler
            if isinstance(handler, logging.handlers.RotatingFileHandler) and handler.shouldRollover(record):
                handler.doRollover()
            stream = handler.stream  # type: ignore[attr-defined]
            stream.write(line)

    def flush(self) -> None:
        with self.lock:
            self._handler.flush()


class _LockedHandler(logging.Handler):
    """The stdlib side: render with structlog's JSON and write through the shared stream."""

    def __init__(self, out: _RotatingStream, level: int) -> None:
        super().__init__(level)
        self._out = out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._out.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def configure(level: str = "info", *, stream: IO[str] | None = None, file: str | None = None,
              rotate_bytes: int = ROTATE_BYTES, backups: int = BACKUPS, **static: Any) -> None:
    """Send JSON lines to ``file`` (appending, rotated by size) or ``stream`` (default stderr).

    ``static`` keys (component, node, worker) are added to every event.
    """
    global _level
    numeric = _level = _LEVELS[level.lower()]
    if file:
        base: logging.Handler = logging.handlers.RotatingFileHandler(
            file, maxBytes=max(0, rotate_bytes), backupCount=max(0, backups), encoding="utf-8")
    else:
        base = logging.StreamHandler(stream or sys.stderr)
    out = _RotatingStream(base)
    structlog.contextvars.clear_contextvars()
    if static:
        structlog.contextvars.bind_contextvars(**static)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, _logger_key, structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer(sort_keys=False)],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(out),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    handler = _LockedHandler(out, numeric)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=structlog.processors.JSONRenderer(sort_keys=False),
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder(),
                           structlog.processors.format_exc_info],
    ))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    logging.captureWarnings(True)


_level = logging.INFO
"""The level ``configure`` set (structlog's own default until then)."""


def enabled(level: int) -> bool:
    """Whether events at ``level`` (``logging.INFO``...) are written: lets a hot path skip
    building an event that would be dropped."""
    return level >= _level


def get_logger(name: str) -> Any:
    return structlog.get_logger(logger_name=name)


def _logger_key(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog's events say ``logger`` like the stdlib's records (``logger_name`` is taken as an
    initial value so that module-level loggers stay lazy)."""
    name = event.pop("logger_name", None)
    if name is not None:
        event["logger"] = name
    return event
