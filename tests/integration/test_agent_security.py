"""The agent is secure by default: its embedded nats-server takes the [nats] credentials and refuses
anyone else, its monitoring is off (or on loopback), and no secret reaches argv or a file others can read."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tdist.client import Client
from tdist.config import NatsConfig, RequestPlaneConfig
from tdist.errors import RequestPlaneUnavailable
from tests.support.agent import AgentProcess, agent_toml, cleanup, listening, processes_of, wait_gone

pytestmark = pytest.mark.timeout(240)

PASSWORD = "Pw-7f3a9c1e-never-seen"
TOKEN = "Tk-58d2e0b4-never-seen"


def secret_file(tmp: Path, name: str, value: str) -> Path:
    path = tmp / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def scan_argv(secret: str) -> list[str]:
    """Every process's command line that holds ``secret``."""
    hits = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                data = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if secret.encode() in data:
                argv = data.replace(b"\0", b" ").decode(errors="replace")
                hits.append(f"{entry}: {argv}")
    return hits


def readable_files_holding(secret: str, *dirs: Path) -> list[str]:
    """Files under ``dirs`` that hold ``secret`` and that group or others may read."""
    hits = []
    for top in dirs:
        for root, _, files in os.walk(top):
            for name in files:
                path = Path(root) / name
                try:
                    mode = path.lstat().st_mode
                    if not stat.S_ISREG(mode):
                        continue
                    if secret.encode() in path.read_bytes() and mode & 0o077:
                        hits.append(f"{path} {stat.S_IMODE(mode):04o}")
                except OSError:
                    continue
    return hits


async def refused(nats: NatsConfig, namespace: str) -> bool:
    try:
        async with Client(nats, namespace=namespace):
            return False
    except RequestPlaneUnavailable:
        return True


async def test_embedded_nats_takes_the_credentials_and_no_secret_leaks(tmp_path: Path, namespace: str) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)  # as systemd's StateDirectory= makes it
    state.chmod(0o755)
    pw = secret_file(tmp_path, "nats.password", PASSWORD)
    config = tmp_path / "agent.toml"
    config.write_text(agent_toml(tmp_path, namespace=namespace, count=2, nats=f"""
servers = ["nats://127.0.0.1:0"]
embedded = true
user = "tdist"
password_file = "{pw}"
"""))
    agent = AgentProcess(config)
    try:
        info = await agent.wait_ready()
        url = info["nats"]
        assert url.startswith("nats://127.0.0.1:") and not url.endswith(":0")  # port 0: a free port, dialled
        assert stat.S_IMODE(state.stat().st_mode) == 0o700  # tightened whoever made it

        # Anonymous and wrong-password clients are refused; the right one sees the two workers.
        assert await refused(NatsConfig(servers=(url,)), namespace)
        assert await refused(NatsConfig(servers=(url,), user="tdist", password="wrong"), namespace)
        rp = RequestPlaneConfig(namespace=namespace, storage="memory", max_bytes=16 << 20)
        async with Client(NatsConfig(servers=(url,), user="tdist", password=PASSWORD), request_plane=rp) as client:
            workers = {w.id for w in (await client.workers()).values() if w.node == "testnode"}
            assert workers == {"testnode-w-0", "testnode-w-1"}
            result = await client.operator("op").infer({"x": np.array([4, 2])}, timeout=30)
            assert result.outputs["x"].tolist() == [4, 2]

        # The server: its config 0600 in a 0700 dir, only its path in argv, no monitoring port.
        procs = processes_of(state)
        assert len(procs["nats-server"]) == 1 and len(procs["worker"]) == 2 and len(procs["supervisord"]) == 1
        [server] = procs["nats-server"]
        run_dir = state / "nats.run"
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((run_dir / "nats.conf").stat().st_mode) == 0o600
        port = int(url.rsplit(":", 1)[1])
        assert listening(server) == [("127.0.0.1", port)]

        # The password: in no process's argv, in no file under the state and log dirs that others can read.
        assert scan_argv(PASSWORD) == []
        assert readable_files_holding(PASSWORD, state, tmp_path / "logs") == []
        for name in ("supervisord.conf", "nats-client.toml"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
        digest_env = (state / "supervisord.conf").read_text()
        assert "TDIST_CONFIG_DIGEST" in digest_env and "nats://" not in digest_env

        # tdist-client takes the credentials from the environment or from a file, not only from flags.
        base = [sys.executable, "-m", "tdist.client.cli", "ls", "--namespace", namespace]
        env = {**os.environ, "TDIST_NATS_URL": url, "TDIST_NATS_USER": "tdist", "TDIST_NATS_PASSWORD": PASSWORD}
        by_env = subprocess.run(base, env=env, capture_output=True, text=True, timeout=60)
        assert by_env.returncode == 0 and "testnode-w-0" in by_env.stdout, by_env.stderr
        by_file = subprocess.run([*base, "--nats-url", url, "--user", "tdist", "--password-file", str(pw)],
                                 capture_output=True, text=True, timeout=60)
        assert by_file.returncode == 0 and "testnode-w-1" in by_file.stdout, by_file.stderr
        anonymous = subprocess.run([*base, "--nats-url", url], capture_output=True, text=True, timeout=60)
        assert anonymous.returncode != 0

        # SIGTERM: exit 0, nothing left running, no config directory, no secret file.
        agent.proc.terminate()
        assert await agent.wait_exit() == 0
        await wait_gone(state, timeout=10)
        assert not run_dir.exists() and not (state / "nats-client.toml").exists()
    finally:
        cleanup(state, agent)


def test_a_secret_file_others_can_read_is_refused(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("x\n")
    pw.chmod(0o644)
    config = tmp_path / "agent.toml"
    config.write_text(agent_toml(tmp_path, namespace="n", nats=f'embedded = true\nuser = "u"\npassword_file = "{pw}"'))
    run = subprocess.run([sys.executable, "-m", "tdist.agent.main", "check-config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "nats.password_file" in run.stderr and "readable by others" in run.stderr
    missing = config.read_text().replace(str(pw), str(tmp_path / "nope"))
    config.write_text(missing)
    run = subprocess.run([sys.executable, "-m", "tdist.agent.main", "check-config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "nats.password_file" in run.stderr and "cannot read" in run.stderr


def _make_certs(tmp: Path) -> tuple[str, str, str]:
    from tests.integration.test_secured_nats import _make_certs

    return _make_certs(tmp)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")
async def test_embedded_nats_with_token_tls_and_loopback_monitoring(tmp_path: Path, namespace: str) -> None:
    ca, cert, key = _make_certs(tmp_path)
    token = secret_file(tmp_path, "nats.token", TOKEN)
    config = tmp_path / "agent.toml"
    state = tmp_path / "state"
    config.write_text(agent_toml(tmp_path, namespace=namespace, count=1, nats=f"""
servers = ["tls://127.0.0.1:0"]
embedded = true
token_file = "{token}"
tls_ca_file = "{ca}"
tls_cert_file = "{cert}"
tls_key_file = "{key}"
monitor_port = 0
"""))
    agent = AgentProcess(config)
    try:
        url = (await agent.wait_ready())["nats"]
        assert url.startswith("tls://127.0.0.1:")
        assert await refused(NatsConfig(servers=(url,), tls_ca_file=ca), namespace)  # TLS but no token
        assert await refused(NatsConfig(servers=(url,), token="wrong", tls_ca_file=ca), namespace)
        plain = "nats://" + url.split("://", 1)[1]
        assert await refused(NatsConfig(servers=(plain,), token=TOKEN), namespace)  # no TLS
        async with Client(NatsConfig(servers=(url,), token=TOKEN, tls_ca_file=ca), namespace=namespace) as client:
            assert "testnode-w-0" in await client.workers()
        [server] = processes_of(state)["nats-server"]
        addresses = listening(server)
        assert len(addresses) == 2 and all(host == "127.0.0.1" for host, _ in addresses)  # client + monitoring
        assert scan_argv(TOKEN) == [] and readable_files_holding(TOKEN, state, tmp_path / "logs") == []
        agent.proc.terminate()
        assert await agent.wait_exit() == 0
        await wait_gone(state, timeout=10)
    finally:
        cleanup(state, agent)
