"""Which workers crash-loop, and the last lines they wrote.

A worker *fails* while supervisord reports it ``BACKOFF`` (it died within ``startsecs`` and
is being retried) or ``FATAL`` (it gave up after ``startretries``), or while its process
has been replaced ``EXITS`` times within ``WINDOW`` seconds (a worker that serves for a
moment and dies again, which supervisord does not call a failed start). The agent reports
each failing worker once when it starts failing and again when its state changes (BACKOFF
to FATAL), with the last ``TAIL_LINES`` lines of the file its stdout and stderr go to
(supervisord's ``stdout_logfile``, ``redirect_stderr``), in its log and in ``/ready``.

``CrashWatch`` is pure: the caller passes the states and the times.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field

FAILED_STATES = frozenset({"BACKOFF", "FATAL"})
EXITS = 3
WINDOW = 60.0
TAIL_LINES = 20
TAIL_BYTES = 64 << 10
"""Read at most this much of the end of the file (20 lines of a Python traceback fit)."""


@dataclass
class Failing:
    """One failing worker, as ``/ready`` shows it."""

    program: str
    worker: str
    state: str
    exits: int
    """Process replacements seen within the window."""
    log: str
    tail: list[str] = field(default_factory=list)
    spawn_error: str = ""
    """supervisord's reason when it could not even start the command."""

    def to_json(self) -> dict[str, object]:
        return {"worker": self.worker, "state": self.state, "exits": self.exits, "log": self.log,
                "spawn_error": self.spawn_error, "tail": self.tail}


class CrashWatch:
    def __init__(self, exits: int = EXITS, window: float = WINDOW) -> None:
        self.exits = exits
        self.window = window
        self._exits: dict[str, deque[float]] = {}

    def exited(self, program: str, now: float) -> None:
        """``program``'s process was replaced (or is gone) at ``now``."""
        self._exits.setdefault(program, deque()).append(now)

    def recent_exits(self, program: str, now: float) -> int:
        times = self._exits.get(program)
        if not times:
            return 0
        while times and now - times[0] > self.window:
            times.popleft()
        return len(times)

    def failing(self, program: str, state: str | None, now: float) -> bool:
        return state in FAILED_STATES or self.recent_exits(program, now) >= self.exits

    def forget(self, program: str) -> None:
        self._exits.pop(program, None)


def tail(path: str, lines: int = TAIL_LINES, max_bytes: int = TAIL_BYTES) -> list[str]:
    """The last ``lines`` lines of ``path`` (decoded leniently, without line ends); [] if it is missing."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and text:
        text = text[1:]  # the first line read is probably cut
    return text[-lines:] if lines > 0 else []
