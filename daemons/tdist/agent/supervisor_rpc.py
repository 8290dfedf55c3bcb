"""Drive supervisord over XML-RPC on its unix socket, and run it as a child process.

Stdlib only: an ``http.client.HTTPConnection`` that connects an ``AF_UNIX`` socket under
``xmlrpc.client``. Calls block, so each ``a*`` coroutine runs its call in a thread
(``asyncio.to_thread``); a fresh ServerProxy per call keeps concurrent calls independent.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tdist import logs
from tdist.errors import TdistError
from tdist.process import alive

log = logs.get_logger("tdist.agent.supervisor")

# supervisor.xmlrpc.Faults, the ones the agent tells apart
BAD_NAME = 10
ALREADY_STARTED = 60
NOT_RUNNING = 70
ALREADY_ADDED = 90
STILL_RUNNING = 91
SHUTDOWN_STATE = 6

RUNNING_STATES = ("STARTING", "RUNNING", "BACKOFF")
STOPPING_STATES = ("STARTING", "RUNNING", "BACKOFF", "STOPPING")


class SupervisorError(TdistError):
    """supervisord refused a call (``fault`` is supervisor's fault code) or is unreachable."""

    code = "SUPERVISOR"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__()
        self.unix_path = path
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        return _UnixConnection(self.unix_path, self.timeout)


@dataclass(frozen=True)
class ReloadDiff:
    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]


class SupervisorClient:
    """XML-RPC client of one supervisord: ``call`` blocks, the ``a*`` methods are coroutines."""

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, method: str, *args: Any) -> Any:
        proxy = xmlrpc.client.ServerProxy(
            "http://localhost/RPC2", transport=_UnixTransport(self.socket_path, self.timeout), allow_none=True
        )
        fn: Any = proxy
        for part in method.split("."):
            fn = getattr(fn, part)
        try:
            return fn(*args)
        except xmlrpc.client.Fault as exc:
            raise SupervisorError(f"{method}: {exc.faultString}", fault=exc.faultCode, method=method) from None
        except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as exc:
            raise SupervisorError(f"{method}: supervisord unreachable: {exc}", method=method) from None
        finally:
            proxy("close")()

    async def acall(self, method: str, *args: Any) -> Any:
        return await asyncio.to_thread(self.call, method, *args)

    # --- blocking helpers -------------------------------------------------------------

    def get_state(self) -> str:
        """``RUNNING``, ``RESTARTING``, ``SHUTDOWN`` or ``FATAL``."""
        return self.call("supervisor.getState")["statename"]

    def all_process_info(self) -> list[dict[str, Any]]:
        return self.call("supervisor.getAllProcessInfo")

    def process_info(self, name: str) -> dict[str, Any]:
        return self.call("supervisor.getProcessInfo", name)

    def start_process(self, name: str, wait: bool = True) -> bool:
        return self.call("supervisor.startProcess", name, wait)

    def stop_process(self, name: str, wait: bool = True) -> bool:
        return self.call("supervisor.stopProcess", name, wait)

    def signal_process(self, name: str, sig: str | int) -> bool:
        return self.call("supervisor.signalProcess", name, str(sig))

    def reload_config(self) -> ReloadDiff:
        """Make supervisord re-read its file; nothing changes in the running processes yet."""
        [[added, changed, removed]] = self.call("supervisor.reloadConfig")
        return ReloadDiff(tuple(added), tuple(changed), tuple(removed))

    def add_process_group(self, name: str) -> bool:
        return self.call("supervisor.addProcessGroup", name)

    def remove_process_group(self, name: str) -> bool:
        return self.call("supervisor.removeProcessGroup", name)

    def stop_process_group(self, name: str, wait: bool = True) -> list[dict[str, Any]]:
        return self.call("supervisor.stopProcessGroup", name, wait)

    def shutdown(self) -> bool:
        return self.call("supervisor.shutdown")

    def update(self) -> ReloadDiff:
        """``supervisorctl update`` (blocking): re-read the file, stop and drop removed and changed
        groups, add changed and new ones (autostart starts them). Unchanged programs keep running.
        Tests and tools only: the agent uses ``aupdate``, which never blocks an RPC on a stop."""
        diff = self.reload_config()
        for name in (*diff.removed, *diff.changed):
            self._stop_group(name)
            self.remove_process_group(name)
        self._add_groups(diff)
        return diff

    def _add_groups(self, diff: ReloadDiff) -> None:
        for name in (*diff.changed, *diff.added):
            try:
                self.add_process_group(name)
            except SupervisorError as exc:
                if exc.details.get("fault") != ALREADY_ADDED:
                    raise

    def _stop_group(self, name: str) -> None:
        try:
            self.stop_process_group(name, True)
        except SupervisorError as exc:
            if exc.details.get("fault") != BAD_NAME:
                raise

    def group_stopped(self, name: str) -> bool:
        """True once no process of group ``name`` runs (or the group is gone)."""
        return not any(i["group"] == name and i["statename"] in STOPPING_STATES for i in self.all_process_info())

    async def astop_group(self, name: str, timeout: float, poll: float = 0.2) -> None:
        """Stop a group without an RPC that waits: ``stopProcessGroup(wait=False)``, then poll
        its state (each call returns at once) for up to ``timeout`` s. supervisord SIGKILLs a
        program after its ``stopwaitsecs``, so ``timeout`` above that always suffices; past it,
        SupervisorError."""
        try:
            await self.acall("supervisor.stopProcessGroup", name, False)
        except SupervisorError as exc:
            if exc.details.get("fault") == BAD_NAME:
                return
            if exc.details.get("fault") != NOT_RUNNING:
                raise
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self.group_stopped, name):
            if time.monotonic() > deadline:
                raise SupervisorError(f"group {name} did not stop within {timeout:.0f} s", group=name)
            await asyncio.sleep(poll)

    async def aupdate(self, stop_timeout: float = 180.0) -> ReloadDiff:
        """``update`` without blocking RPCs: each changed or removed group is stopped with
        ``astop_group`` (a worker may take its whole stopwaitsecs to drain, longer than any
        RPC timeout), then removed; then changed and new groups are added."""
        diff = await self.areload_config()
        for name in (*diff.removed, *diff.changed):
            await self.astop_group(name, stop_timeout)
            try:
                await self.acall("supervisor.removeProcessGroup", name)
            except SupervisorError as exc:
                if exc.details.get("fault") != BAD_NAME:
                    raise
        await asyncio.to_thread(self._add_groups, diff)
        return diff

    # --- coroutine versions ----------------------------------------------------------------

    async def aget_state(self) -> str:
        return await asyncio.to_thread(self.get_state)

    async def aall_process_info(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.all_process_info)

    async def astart_process(self, name: str, wait: bool = True) -> bool:
        return await asyncio.to_thread(self.start_process, name, wait)

    async def astop_process(self, name: str, wait: bool = True) -> bool:
        return await asyncio.to_thread(self.stop_process, name, wait)

    async def areload_config(self) -> ReloadDiff:
        return await asyncio.to_thread(self.reload_config)


class Supervisord:
    """supervisord as a child process (its own session), driven through ``client``.

    ``start()`` is ``spawn()`` (the fork: from the thread that should be its parent, which
    matters for a parent-death signal) then ``wait_answering()``; ``astart`` does the fork in
    the calling (event-loop) thread and only the waiting in a worker thread.
    """

    def __init__(
        self,
        conf_path: str,
        socket_path: str,
        *,
        python: str = sys.executable,
        output_path: str | None = None,
        rpc_timeout: float = 30.0,
        command_prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.conf_path = conf_path
        self.socket_path = socket_path
        self.python = python
        self.output_path = output_path or os.path.join(os.path.dirname(os.path.abspath(conf_path)),
                                                       "supervisord.out")
        self.client = SupervisorClient(socket_path, timeout=rpc_timeout)
        self.command_prefix = tuple(command_prefix)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        """False as soon as the process has exited (checked now, not at the last tick)."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        """Start supervisord and return once its RPC answers RUNNING."""
        self.spawn()
        self.wait_answering(timeout)

    def spawn(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise SupervisorError("supervisord is already running", pid=self.proc.pid)
        if os.path.exists(self.socket_path) and self._answers():
            raise SupervisorError("another supervisord answers on the socket", socket=self.socket_path)
        env = {**os.environ, **self.env} if self.env else None
        with open(self.output_path, "ab") as out:
            self.proc = subprocess.Popen(
                [*self.command_prefix, self.python, "-m", "supervisor.supervisord", "-c", self.conf_path],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
            )
        log.info("supervisord_started", pid=self.proc.pid, conf=self.conf_path)

    def wait_answering(self, timeout: float = 20.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise SupervisorError(f"supervisord exited with {code} at start: {self._output_tail()}",
                                      conf=self.conf_path)
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise SupervisorError(f"supervisord did not answer within {timeout}s: {self._output_tail()}",
                                      conf=self.conf_path)
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            return SupervisorClient(self.socket_path, timeout=2.0).get_state() == "RUNNING"
        except SupervisorError:
            return False

    def _output_tail(self) -> str:
        try:
            with open(self.output_path, "rb") as fh:
                return fh.read()[-2000:].decode(errors="replace").strip()
        except OSError:
            return ""

    def program_pids(self) -> list[int]:
        try:
            return [p["pid"] for p in self.client.all_process_info() if p.get("pid")]
        except SupervisorError:
            return []

    def stop(self, timeout: float = 60.0) -> int | None:
        """``supervisor.shutdown`` (programs get their stop signal and stopwaitsecs), wait for the
        exit, then SIGKILL supervisord and whatever program process groups are left."""
        if self.proc is None:
            return None
        pids = self.program_pids() if self.proc.poll() is None else []
        if self.proc.poll() is None:
            try:
                self.client.shutdown()
            except SupervisorError as exc:
                log.warning("supervisord_shutdown_failed", error=str(exc))
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("supervisord_kill", pid=self.proc.pid)
        self.kill(pids)
        return self.proc.returncode

    def kill(self, pids: Sequence[int] = ()) -> None:
        """SIGKILL supervisord (by PID) and the process groups of ``pids`` (its programs)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in pids:
            if alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)  # each program leads its own process group
                except (ProcessLookupError, PermissionError):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    async def astart(self, timeout: float = 20.0) -> None:
        self.spawn()
        await asyncio.to_thread(self.wait_answering, timeout)

    async def astop(self, timeout: float = 60.0) -> int | None:
        return await asyncio.to_thread(self.stop, timeout)

    def __enter__(self) -> Supervisord:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
