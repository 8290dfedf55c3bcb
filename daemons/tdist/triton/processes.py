"""The OS side of a Triton server beside a worker: dying with the worker (``setpriv --pdeathsig``
or a pipe watchdog), hiding the control key from ``/proc/<pid>/cmdline``, and sweeping what
servers of killed workers left (orphaned servers and python-backend stubs, scratch dirs,
shared memory). See ``tdist.triton.server`` for why no ``preexec_fn`` is used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile

from tdist.process import alive, stat_fields
from tdist.triton.install import _STUB_NAME

_PARENT_CHECK = (
    'p=$1; shift; if [ "$PPID" != "$p" ]; then '
    'echo "tdist: the worker (pid $p) died before the parent-death signal was set" >&2; exit 111; fi; '
    'exec "$@"'
)
"""Run by /bin/sh after ``setpriv --pdeathsig KILL``: a parent that died before the prctl would not
signal us, so check it is still our parent, then exec Triton (same PID)."""

_WATCHDOG = """
import os, select, signal, sys
fd, pid = int(sys.argv[1]), int(sys.argv[2])
try:
    pidfd = os.pidfd_open(pid)
except OSError:
    sys.exit(0)
ready, _, _ = select.select([fd, pidfd], [], [])
if pidfd in ready:
    sys.exit(0)
try:
    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    os.killpg(pid, signal.SIGKILL)
except OSError:
    pass
"""
"""The fallback guard: argv ``<read fd> <triton pid>``. The worker holds the pipe's only write end:
EOF (the worker died, whatever the signal) SIGKILLs Triton by pidfd, then its process group (the
python-backend stubs); Triton exiting first ends the watchdog without a kill."""

_setpriv_path: str | None | bool = False


def setpriv_with_pdeathsig() -> str | None:
    """Path of util-linux ``setpriv`` if it has ``--pdeathsig`` (util-linux >= 2.33), else None. Cached."""
    global _setpriv_path
    if _setpriv_path is False:
        path = shutil.which("setpriv")
        found: str | None = None
        if path:
            try:
                done = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10,
                                      stdin=subprocess.DEVNULL)
                found = path if "--pdeathsig" in done.stdout + done.stderr else None
            except (OSError, subprocess.TimeoutExpired):
                found = None
        _setpriv_path = found
    assert _setpriv_path is not False
    return _setpriv_path

def _scrub_argv(pid: int, secret: str) -> bool:
    """Overwrite every copy of ``secret`` in the argv memory of process ``pid`` with ``*`` (same
    length, NULs kept), through /proc/<pid>/mem; True when /proc/<pid>/cmdline no longer holds it.
    Needs ptrace access to ``pid`` (our own child: same user). Only bytes inside the argument area
    (``arg_start``..``arg_end``, fields 48 and 49 of /proc/<pid>/stat) that equal the secret are written."""
    needle = secret.encode()
    if not needle:
        return True
    try:
        fields = stat_fields(pid)
        start, end = int(fields[45]), int(fields[46])
        if not 0 < start < end:
            return False
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            area = mem.read(end - start)
            at = area.find(needle)
            while at >= 0:
                mem.seek(start + at)
                mem.write(b"*" * len(needle))
                at = area.find(needle, at + len(needle))
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return needle not in f.read()
    except (OSError, ValueError, IndexError):
        return False


def cleanup_stale() -> int:
    """Remove what servers of SIGKILLed parents left: tritonserver processes and python-backend
    stubs whose command line names a ``tdist_triton_<pid>_`` region (the parent-death guard kills
    Triton, not its stubs, which then live on as orphans; and a server whose parent died in the
    instant between its spawn and its watchdog's), scratch dirs ``<tmp>/tdist-triton-<pid>-*`` and python-backend shared
    memory ``/dev/shm/tdist_triton_<pid>_*``, each only when ``<pid>`` is gone. Runs at every
    start; returns how many stubs and entries it removed."""
    removed = 0
    for pid in _orphan_server_pids() + _stub_pids("tdist_triton_", orphans_only=True):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            removed += 1
    for base, prefix, sep in ((tempfile.gettempdir(), "tdist-triton-", "-"), ("/dev/shm", "tdist_triton_", "_")):
        try:
            entries = os.listdir(base)
        except OSError:
            continue
        for entry in entries:
            if not entry.startswith(prefix):
                continue
            pid_text = entry[len(prefix):].split(sep, 1)[0]
            if not pid_text.isdigit() or int(pid_text) == os.getpid() or alive(int(pid_text)):
                continue
            path = os.path.join(base, entry)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed += 1
            except OSError:
                pass
    return removed


def _commands(program_suffix: bytes) -> list[tuple[int, list[bytes]]]:
    """(pid, argv) of every process whose program name ends with ``program_suffix``."""
    found: list[tuple[int, list[bytes]]] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(program_suffix):
            found.append((int(entry), argv))
    return found


def _owner_gone(owner: bytes) -> bool:
    """Whether the ``<pid>`` of a ``tdist_triton_<pid>_`` name is a process that is gone (not ours)."""
    return owner.isdigit() and int(owner) != os.getpid() and not alive(int(owner))


def _orphan_server_pids() -> list[int]:
    """PIDs of tritonserver processes started by a ``TritonServer`` whose owner process is gone
    (recognised by the ``shm-region-prefix-name=tdist_triton_<owner pid>_`` option we give them)."""
    marker = b"--backend-config=python,shm-region-prefix-name=tdist_triton_"
    pids: list[int] = []
    for pid, argv in _commands(b"/tritonserver"):
        owners = [arg[len(marker):].split(b"_", 1)[0] for arg in argv[1:] if arg.startswith(marker)]
        if owners and _owner_gone(owners[0]):
            pids.append(pid)
    return pids


def _stub_pids(prefix: str, orphans_only: bool = False) -> list[int]:
    """PIDs of python-backend stubs whose command line names a shm region starting with ``prefix``
    (one server's: ``tdist_triton_<pid>_<start>_``). ``orphans_only``: only those whose region names
    a ``tdist_triton_<pid>_`` owner that is gone (and not ours)."""
    needle = prefix.encode()
    pids: list[int] = []
    for pid, argv in _commands(_STUB_NAME.encode()):
        names = [a for a in argv[1:] if a.startswith(needle)]
        if not names:
            continue
        if orphans_only and not _owner_gone(names[0][len(b"tdist_triton_"):].split(b"_", 1)[0]):
            continue
        pids.append(pid)
    return pids
