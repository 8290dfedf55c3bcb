"""A secured cluster works: user/password, token and TLS against a real nats-server."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tdist.client import Client
from tdist.config import NatsConfig, RequestPlaneConfig
from tdist.errors import RequestPlaneUnavailable
from tdist.nats_server import EmbeddedNatsServer, NatsServerOptions
from tests.conftest import operator

pytestmark = pytest.mark.timeout(120)


def _server(**options: object) -> Iterator[EmbeddedNatsServer]:
    server = EmbeddedNatsServer(NatsServerOptions(**options))  # type: ignore[arg-type]
    try:
        server.start()
        yield server
    finally:
        server.stop()


async def _echo_round_trip(nats: NatsConfig, namespace: str) -> None:
    from tdist.config import WorkerConfig
    from tdist.worker.worker import Worker

    rp = RequestPlaneConfig(namespace=namespace, storage="memory", max_bytes=1 << 20)
    worker = Worker(WorkerConfig(name="w", operators=(operator("count", "Counting"),)), nats=nats, request_plane=rp)
    try:
        await worker.start()
        async with Client(nats, request_plane=rp) as client:
            resp = await client.operator("count").infer({"x": np.array([1, 2])}, timeout=30)
            assert resp.outputs["x"].tolist() == [1, 2]
    finally:
        await worker.stop()


async def test_user_and_password(namespace: str) -> None:
    for server in _server(user="tdist", password="s3cret"):
        await _echo_round_trip(NatsConfig(servers=(server.url,), user="tdist", password="s3cret"), namespace)
        with pytest.raises(RequestPlaneUnavailable):
            async with Client(NatsConfig(servers=(server.url,), user="tdist", password="wrong"), namespace=namespace):
                pass


async def test_token(namespace: str) -> None:
    for server in _server(token="t0ken"):
        await _echo_round_trip(NatsConfig(servers=(server.url,), token="t0ken"), namespace)
        with pytest.raises(RequestPlaneUnavailable):
            async with Client(NatsConfig(servers=(server.url,)), namespace=namespace):
                pass


def _make_certs(tmp: Path) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1."""
    ca_key, ca, key, csr, cert = (str(tmp / n) for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = tmp / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=tdist-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "1",
        "-extfile", str(ext))
    return ca, cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")
async def test_tls(namespace: str, tmp_path: Path) -> None:
    ca, cert, key = _make_certs(tmp_path)
    for server in _server(tls_cert_file=cert, tls_key_file=key):
        assert server.url.startswith("tls://")
        await _echo_round_trip(NatsConfig(servers=(server.url,), tls_ca_file=ca), namespace)
        with pytest.raises(RequestPlaneUnavailable):  # a client that does not trust the CA
            async with Client(NatsConfig(servers=(server.url,)), namespace=namespace):
                pass
