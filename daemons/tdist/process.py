"""Processes and ports on this host, read from /proc and the socket API (no subprocess, no psutil).

One place for what the agent, the Triton runner, the launcher and the tests each needed:
whether a PID is alive (a zombie is not), its start time (to tell a recycled PID from the
process we recorded), its command line, and free or taken TCP ports.
"""

from __future__ import annotations

import socket


def stat_fields(pid: int) -> list[bytes]:
    """Fields of ``/proc/<pid>/stat`` after the command name: index 0 is field 3 (``state``).
    Raises OSError if there is no such process."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return fh.read().rsplit(b")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22), None if gone or a zombie."""
    try:
        fields = stat_fields(pid)
    except OSError:
        return None
    if not fields or fields[0] == b"Z":
        return None  # a zombie is gone for our purposes
    return int(fields[19])


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie does not)."""
    return start_time(pid) is not None


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at this moment (the kernel's pick)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be listened on now (0 is never "free": it means "any")."""
    if not port:
        return False
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True
