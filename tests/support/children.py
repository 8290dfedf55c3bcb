"""Stopping a helper process a test started (by its Popen, never by name)."""

from __future__ import annotations

import subprocess
from typing import Any


def stop_by_stdin(proc: subprocess.Popen[Any], line: str = "quit\n", timeout: float = 30.0) -> None:
    """Ask a helper that reads commands on stdin to end (``line``); kill it if it has not within
    ``timeout`` s. A helper that already exited is reaped."""
    if proc.poll() is not None:
        proc.wait(timeout)
        return
    try:
        proc.communicate(line, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
