"""Starting one ``tdist-worker`` process and waiting until it serves: the one way the launcher,
the tests and the benchmarks do it (the agent goes through supervisord instead).

A worker prints one JSON line on stdout once it serves (``{"event": "worker_ready",
"worker_id": ...}``); a worker that exits first gets its log's tail into the error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class WorkerStartFailed(RuntimeError):
    """The worker exited before it served; the message carries the tail of its log."""


@dataclass
class SpawnedWorker:
    proc: subprocess.Popen[str]
    worker_id: str
    log_file: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (a drain), then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return int(self.proc.returncode)


def start_worker(args: Sequence[str], log_file: str | Path, *, env: Mapping[str, str] | None = None,
                 python: str = sys.executable, cwd: str | Path | None = None) -> subprocess.Popen[str]:
    """Run ``python -m tdist.worker.main ARGS --log-file LOG_FILE``; not yet waited for (start
    several, then ``wait_ready`` each: they start side by side)."""
    return subprocess.Popen([python, "-m", "tdist.worker.main", *args, "--log-file", str(log_file)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                            env=dict(env) if env is not None else None, cwd=cwd)


def wait_ready(proc: subprocess.Popen[str], log_file: str | Path) -> str:
    """Block until the worker prints its ready line; its worker id. A worker that exits first
    (or prints something else) is stopped and ``WorkerStartFailed`` carries its log's tail."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        return str(json.loads(line)["worker_id"])
    except (ValueError, KeyError, TypeError):
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log = Path(log_file)
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise WorkerStartFailed(f"worker exited with {proc.returncode} before serving (it printed {line!r:.200}); "
                                f"its log ({log}):\n{tail}") from None


def spawn_worker(args: Sequence[str], log_file: str | Path, *, env: Mapping[str, str] | None = None,
                 python: str = sys.executable, cwd: str | Path | None = None) -> SpawnedWorker:
    """Start one worker and return once it serves."""
    proc = start_worker(args, log_file, env=env, python=python, cwd=cwd)
    return SpawnedWorker(proc, wait_ready(proc, log_file), Path(log_file))
