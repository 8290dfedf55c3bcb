"""systemd's notify protocol (``Type=notify``): one datagram to ``$NOTIFY_SOCKET`` per state.

What the agent says, and when (see ``Agent.run``):

- ``READY=1`` once ``/ready`` would answer 200 (NATS connected, every worker running,
  registered and answering the canary), so ``systemctl start`` returns only then;
- ``RELOADING=1`` with ``MONOTONIC_USEC=`` (sd_notify(3): lets systemd tie the message to the
  reload cycle it belongs to) from the SIGHUP handler, then ``READY=1`` once the reload is done;
- ``STOPPING=1`` when it starts to stop;
- ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` (``WatchdogSec=``), sent by a task of the
  agent's event loop only while the agent's main loop goes round (``Watchdog``): a blocked
  event loop sends nothing, a main loop stuck on an await stops the pings after ``stale``
  seconds, and systemd kills and restarts the agent.

With ``Type=notify`` systemd refuses ``systemctl reload`` until ``READY=1``: a reload never
arrives before the SIGHUP handler is installed. Outside systemd (no ``$NOTIFY_SOCKET``) all
of this does nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable


def notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``, newline-separated); False if
    not under systemd or the socket is gone."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
        return True
    except OSError:
        return False


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock systemd compares ``MONOTONIC_USEC`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading() -> bool:
    """``RELOADING=1`` with ``MONOTONIC_USEC``: a reload starts (end it with ``READY=1``)."""
    return notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}")


def watchdog_interval() -> float | None:
    """Seconds between pings (half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises), or
    None when systemd asks for none (or asks another PID: ``$WATCHDOG_PID``)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    owner = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or not os.environ.get("NOTIFY_SOCKET"):
        return None
    if owner and owner != str(os.getpid()):
        return None
    return int(usec) / 2e6


class Watchdog:
    """``WATCHDOG=1`` every ``interval`` s while the owner's main loop ``beat()``s.

    The pings come from a task of the event loop (``run``), so a blocked event loop (SIGSTOP,
    a blocking call) sends none; and the task pings only if the main loop beat within the last
    ``stale`` s, so a main loop stuck on an await stops them too. ``stale`` must exceed the
    longest healthy gap between two beats (for the agent: its tick timeout plus one tick).
    """

    def __init__(self, interval: float | None, stale: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.stale = stale
        self._clock = clock
        self._last_beat: float | None = None
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def beat(self) -> None:
        """The main loop went round once."""
        self._last_beat = self._clock()

    def healthy(self) -> bool:
        """Whether the main loop beat recently enough to vouch for it."""
        return self._last_beat is not None and self._clock() - self._last_beat <= self.stale

    def ping(self) -> bool:
        """One ``WATCHDOG=1`` if the main loop is healthy; whether it was sent."""
        if not self.healthy() or not notify("WATCHDOG=1"):
            return False
        self.sent += 1
        return True

    async def run(self) -> None:
        """Ping every ``interval`` s until cancelled (returns at once when disabled)."""
        if self.interval is None:
            return
        while True:
            self.ping()
            await asyncio.sleep(self.interval)
