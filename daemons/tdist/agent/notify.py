"""systemd's notify protocol (``Type=notify``): one datagram to ``$NOTIFY_SOCKET`` per state.

With ``Type=notify`` systemd refuses ``systemctl reload`` until the agent has said
``READY=1``, which it says only once its signal handlers are installed: a reload can never
arrive while SIGHUP would still kill the process. Outside systemd this does nothing.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``STATUS=...``); False if not under systemd."""
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
