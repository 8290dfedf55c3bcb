"""What the agent starts cannot outlive it, and what an earlier agent left is found and stopped.

Three mechanisms, each covering what the others miss:

* **Parent-death signal.** supervisord, the embedded nats-server and every worker are started
  through ``setpriv --pdeathsig KILL --`` (util-linux): the kernel sends SIGKILL when the
  parent dies, even when the parent was SIGKILLed. No Python runs between fork and exec
  (``preexec_fn`` would force a plain fork, a trap with gRPC threads: see tdist.triton.server).
  The signal is tied to the parent *thread*, so the agent spawns these children from its
  main thread only. Triton servers already die with their worker the same way.
* **A marker in the environment.** Every child gets ``TDIST_AGENT_STATE_DIR=<state dir>``,
  which their own children (workers, Triton servers) inherit. A starting agent scans
  ``/proc/*/environ`` for it, so it finds even processes whose parent died before the
  parent-death signal was armed (the short window between fork and ``prctl``).
* **A PID file** (``agent.pids`` in the state dir, mode 0600) records each child's PID with its
  start time from ``/proc/PID/stat``: a recorded PID is only signalled if that very process
  still runs (PIDs are reused).

``agent.lock`` (``flock``, released by the kernel when the agent dies, even by SIGKILL) makes
sure a second agent on the same state dir refuses to start instead of killing the first one's
children.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from tdist.errors import TdistError
from tdist.logs import get_logger

from tdist.process import alive, cmdline, start_time  # noqa: F401 - re-exported for the agent

log = get_logger("tdist.agent.processes")

MARKER = "TDIST_AGENT_STATE_DIR"
PIDS_FILE = "agent.pids"
LOCK_FILE = "agent.lock"

_PDEATHSIG_FALLBACK = (
    "import ctypes, os, signal, sys;"
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(getattr(signal, 'SIG' + sys.argv[1])));"
    "os.execvp(sys.argv[3], sys.argv[3:])"
)


class AgentStartError(TdistError):
    """The agent cannot start (a port in use, another agent on the state dir): nothing was started."""

    code = "AGENT_START"


def die_with_parent(sig: str = "KILL") -> tuple[str, ...]:
    """The argv prefix that makes the program get ``SIG<sig>`` when its parent dies.

    ``setpriv`` (util-linux, present on every Debian) sets PR_SET_PDEATHSIG and execs the
    program: same PID, no Python after fork. Without it, a one-line Python does the same
    ``prctl`` before ``exec`` (it runs after exec, in a fresh interpreter).
    """
    setpriv = shutil.which("setpriv")
    if setpriv:
        return (setpriv, "--pdeathsig", sig, "--")
    return (sys.executable, "-c", _PDEATHSIG_FALLBACK, sig, "--")


def marker_env(state_dir: str) -> dict[str, str]:
    return {MARKER: os.path.abspath(state_dir)}


# -- /proc --------------------------------------------------------------------------------


def marked_pids(state_dir: str, exclude: Iterable[int] = ()) -> list[int]:
    """PIDs of the processes (of this user) whose environment names ``state_dir`` as their agent's."""
    needle = f"\0{MARKER}={os.path.abspath(state_dir)}\0".encode()
    skip = {os.getpid(), *exclude}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = b"\0" + fh.read()
        except OSError:  # gone, or another user's
            continue
        if needle in env and alive(int(entry)):
            found.append(int(entry))
    return sorted(found)


# -- the PID file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcRecord:
    role: str
    """``supervisord``, ``nats-server`` or ``worker:<program>``."""
    pid: int
    start_time: int

    def running(self) -> bool:
        """True only if this very process (PID and start time) still runs."""
        return start_time(self.pid) == self.start_time


def record(role: str, pid: int | None) -> ProcRecord | None:
    if not pid:
        return None
    started = start_time(pid)
    return ProcRecord(role, pid, started) if started is not None else None


class PidFile:
    """``<state>/agent.pids``: the agent's children, rewritten (atomically, 0600) when they change."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(os.path.abspath(state_dir), PIDS_FILE)
        self._records: dict[str, ProcRecord] = {}

    def read(self) -> list[ProcRecord]:
        try:
            with open(self.path) as fh:
                raw = json.load(fh)
            return [ProcRecord(**r) for r in raw.get("children", [])]
        except (OSError, ValueError, TypeError):
            return []

    def set(self, role: str, pid: int | None) -> None:
        rec = record(role, pid)
        if self._records.get(role) == rec:
            return
        if rec is None:
            self._records.pop(role, None)
        else:
            self._records[role] = rec
        self._write()

    def keep_only(self, roles: Iterable[str]) -> None:
        wanted = set(roles)
        if set(self._records) - wanted:
            self._records = {r: v for r, v in self._records.items() if r in wanted}
            self._write()

    def _write(self) -> None:
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"agent": os.getpid(), "children": [asdict(r) for r in self._records.values()]}, fh)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self._records = {}
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# -- the lock -----------------------------------------------------------------------------


class StateLock:
    """An exclusive ``flock`` on ``<state>/agent.lock`` for the agent's lifetime."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(os.path.abspath(state_dir), LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AgentStartError(f"another tdist-agent (pid {holder}) runs with the state dir "
                                  f"{os.path.dirname(self.path)}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None


# -- stopping leftovers -----------------------------------------------------------------


def kill_and_wait(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """SIGKILL each process (its start time checked first), wait until all are gone; returns
    the ones still there at the deadline (none, unless the kernel is stuck on them)."""
    targets = [r for pid in pids if (r := record("leftover", pid)) is not None]
    for rec in targets:
        if rec.running():
            try:
                os.kill(rec.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    while True:
        left = [r.pid for r in targets if r.running()]
        if not left or time.monotonic() > deadline:
            return left
        for pid in left:  # our own children must be reaped to stop being zombies
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.02)


def stop_leftovers(state_dir: str, pidfile: PidFile, *, exclude: Iterable[int] = (), timeout: float = 20.0
                   ) -> list[str]:
    """Stop every process an earlier agent of ``state_dir`` left: the recorded ones (verified by
    start time) and every process carrying the state dir's marker (workers, Triton servers).
    supervisord goes first, so that it cannot restart a worker meanwhile. Returns what was stopped."""
    skip = set(exclude)
    stopped: list[str] = []
    recorded = [r for r in pidfile.read() if r.pid not in skip and r.running()]
    supervisors = [r.pid for r in recorded if r.role == "supervisord"]
    supervisors += [p for p in marked_pids(state_dir, skip) if _is_supervisord(p) and p not in supervisors]
    deadline = time.monotonic() + timeout
    if supervisors:
        stopped += [f"supervisord:{p}" for p in supervisors]
        kill_and_wait(supervisors, max(1.0, deadline - time.monotonic()))
    for _ in range(5):  # a process may fork while we look: look again until nothing is left
        rest = {r.pid: r.role for r in recorded if r.running()}
        rest.update({p: " ".join(cmdline(p)[:3]) or "process" for p in marked_pids(state_dir, skip) if p not in rest})
        if not rest:
            break
        stopped += [f"{role}:{pid}" for pid, role in rest.items()]
        kill_and_wait(rest, max(1.0, deadline - time.monotonic()))
    if stopped:
        log.warning("leftovers_stopped", state_dir=state_dir, processes=stopped)
    return stopped


def _is_supervisord(pid: int) -> bool:
    return any("supervisord" in a for a in cmdline(pid)[:4])
