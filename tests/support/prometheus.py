"""A real Prometheus server for tests: Debian's ``prometheus`` package, never installed on the host.

The binary is taken from the package with ``apt-get download`` + ``dpkg-deb -x`` (as tests/e2e does
for systemd-nspawn), from the machine's own apt sources, and cached under ``$TDIST_TEST_CACHE``
(default ``/var/cache/tdist-test``) in ``prometheus/``. Installing the package would start its
service wherever systemd runs, and pull in a dozen JavaScript packages for its web console; the
extracted binary needs only libc. A ``prometheus`` on ``PATH`` is used as it is.

``PrometheusServer`` runs it on 127.0.0.1 with a TSDB in a directory of the test's, and stops it by
PID.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

CACHE = Path(os.environ.get("TDIST_TEST_CACHE", "/var/cache/tdist-test"))


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def _cache_root() -> Path:
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        if os.access(CACHE, os.W_OK):
            return CACHE
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"tdist-test-{os.getuid()}"


def ensure_prometheus() -> Path:
    """The prometheus binary (skips the test, with the reason, if it cannot be had)."""
    on_path = shutil.which("prometheus")
    if on_path:
        return Path(on_path)
    root = _cache_root() / "prometheus"
    binary = root / "usr" / "bin" / "prometheus"
    if not (root / ".tdist-complete").exists():
        for tool in ("apt-get", "dpkg-deb"):
            if shutil.which(tool) is None:
                pytest.skip(f"prometheus is not installed and {tool} is missing to extract Debian's package")
        tmp = Path(tempfile.mkdtemp(prefix="prometheus.", dir=root.parent))
        try:
            debs = tmp / "debs"
            debs.mkdir()
            os.chmod(debs, 0o777)  # apt-get download drops privileges to _apt when it can
            download = ["apt-get", "download", "prometheus"]
            proc = subprocess.run(download, cwd=debs, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0 and os.geteuid() == 0:
                subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=600)
                proc = subprocess.run(download, cwd=debs, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                pytest.skip(f"cannot obtain prometheus: apt-get download failed: {_tail(proc.stderr)}")
            [deb] = debs.glob("prometheus_*.deb")
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], check=True, timeout=300)
            (tmp / "x" / ".tdist-complete").write_text(deb.name + "\n")
            try:
                os.rename(tmp / "x", root)
            except OSError:  # another session extracted it meanwhile
                if not (root / ".tdist-complete").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    run = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        pytest.skip(f"the extracted prometheus does not run here: {_tail(run.stderr)}")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusServer:
    """``prometheus`` scraping ``targets`` every ``interval`` s, on 127.0.0.1; stop() by PID."""

    def __init__(self, binary: Path, workdir: Path, targets: list[str], interval: float = 1.0) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": f"{interval:g}s", "evaluation_interval": f"{interval:g}s"},
            "scrape_configs": [{"job_name": "tdist", "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.port = _free_port()
        self.log = workdir / "prometheus.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [str(binary), f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}: {_tail(self.output(), 10)}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready: {_tail(self.output(), 10)}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """``/api/v1/query``: the instant vector's elements (``metric``, ``value`` [time, "string"])."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as r:
            answer = json.load(r)
        assert answer["status"] == "success", answer
        assert answer["data"]["resultType"] == "vector", answer
        return list(answer["data"]["result"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
