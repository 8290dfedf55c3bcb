"""systemd/tdist-agent.service under a real systemd: a Debian 12 rootfs booted with systemd-nspawn.

The rootfs, systemd-nspawn and the wheelhouse come from tests/e2e/nspawn.py (what the host
needs, what is cached and where; the Debian mirror comes from the host's apt sources). Where
something is missing the test is skipped, with the reason.

Inside the container (commands run through ``nsenter -t <container PID 1> -a``): create the
``tdist`` user, install tdist into /opt/tdist/venv from the wheelhouse, install the unit file as it
is in the repository and an agent.toml with two CPU workers of ``tdist.operators.builtin:Echo``,
then ``systemctl start`` (ready, two workers registered, requests served, tensors above the inline
threshold read by the workers from a same-host client's shared memory), ``systemctl reload``
with three workers (the two running ones keep their PIDs), and ``systemctl stop`` with requests
in flight (every one answered, ``Result=success``, exit status 0, nothing left in the unit).

Set ``TDIST_TEST_MIRROR`` for another Debian mirror than the host's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.nspawn import (
    ROOT,
    TIMINGS,
    Container,
    cache_lock,
    ensure_nspawn,
    ensure_rootfs,
    ensure_wheelhouse,
    log,
    require_root_tools,
    timed,
    wait_for,
)

pytestmark = pytest.mark.timeout(3600)

NAMESPACE = "e2e"
NODE = "e2e-node"
VENV = "/opt/tdist/venv"
UNIT = "tdist-agent"


# --------------------------------------------------------------------------------------------
# The container


def agent_toml(count: int) -> str:
    return f"""
[node]
name = "{NODE}"
gpus = "none"

[nats]
servers = ["nats://127.0.0.1:4222"]
embedded = true

[request_plane]
namespace = "{NAMESPACE}"
storage = "file"

[directories]
state_dir = "/var/lib/tdist"
log_dir = "/var/log/tdist"

[http]
host = "127.0.0.1"
port = 9090

[logging]
level = "info"

[[workers]]
name = "echo"
count = {count}
gpus_per_instance = 0
registry_ttl = 3.0
drain_timeout = 30.0

[[workers.operators]]
name = "echo"
implementation = "tdist.operators.builtin:Echo"
max_inflight = 4
"""


LIST_WORKERS = f"""
import asyncio, json
from tdist.client import Client
from tdist.config import NatsConfig

async def main():
    async with Client(NatsConfig(servers=("nats://127.0.0.1:4222",)), namespace="{NAMESPACE}") as c:
        ws = await c.workers()
    print(json.dumps({{w.id: {{"node": w.node, "pid": w.pid, "state": w.state, "served": w.served,
                              "operators": [o.name for o in w.operators]}} for w in ws.values()}}))

asyncio.run(main())
"""

class AgentHost:
    """The container with tdist-agent's unit: what the test asks of it."""

    def __init__(self, box: Container) -> None:
        self.box = box
        self.root = box.root

    def exec(self, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return self.box.exec(argv, unit=UNIT, **kw)  # type: ignore[arg-type]

    def popen(self, argv: list[str]) -> subprocess.Popen[str]:
        return self.box.popen(argv)

    def journal(self, lines: int = 80) -> str:
        return self.box.journal(UNIT, lines)

    def show(self, *props: str) -> dict[str, str]:
        return self.box.show(UNIT, *props)

    def http(self, path: str) -> tuple[int, str]:
        return self.box.http_get(f"http://127.0.0.1:9090{path}", python=f"{VENV}/bin/python")

    def workers(self) -> dict[str, dict]:  # type: ignore[type-arg]
        out = self.exec([f"{VENV}/bin/python", "/root/e2e/list_workers.py"], timeout=60).stdout
        return {k: w for k, w in json.loads(out.strip().splitlines()[-1]).items()
                if w["node"] == NODE and w["state"] == "serving"}


def _wait(what: str, probe, timeout: float, c: AgentHost):  # type: ignore[no-untyped-def]
    return wait_for(what, probe, timeout, lambda: f"--- journal of {UNIT} ---\n{c.journal()}")


def _install_files(root: Path) -> None:
    """The unit and sysusers file as they are in the repository, and the agent's file."""
    shutil.copy2(ROOT / "systemd/tdist-agent.service", root / "etc/systemd/system/tdist-agent.service")
    (root / "usr/lib/sysusers.d").mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "systemd/tdist.sysusers", root / "usr/lib/sysusers.d/tdist.conf")
    (root / "etc/tdist").mkdir(exist_ok=True)
    (root / "etc/tdist/agent.toml").write_text(agent_toml(2))
    e2e = root / "root/e2e"
    e2e.mkdir(parents=True, exist_ok=True)
    (e2e / "list_workers.py").write_text(LIST_WORKERS)


# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def container() -> Iterator[AgentHost]:
    require_root_tools()
    TIMINGS.clear()
    t0 = time.monotonic()
    run_dir = Path(tempfile.mkdtemp(prefix="tdist-nspawn-", dir="/var/tmp"))
    box: Container | None = None
    try:
        with cache_lock():
            rootfs = ensure_rootfs()
            nspawn, libdir = ensure_nspawn()
            wheelhouse = ensure_wheelhouse(run_dir)
        box = Container(f"tdist-e2e-{os.getpid()}", rootfs, nspawn, libdir, run_dir / "host",
                        binds={"/wheelhouse": wheelhouse})
        with timed("per-run rootfs"):
            box.prepare()
            _install_files(box.root)
        with timed("boot"):
            box.boot()
        yield AgentHost(box)
        with timed("poweroff"):
            box.poweroff()
    finally:
        if box is not None:
            box.cleanup()
        shutil.rmtree(run_dir, ignore_errors=True)
        TIMINGS["total"] = round(time.monotonic() - t0, 1)
        log("timings (s): " + json.dumps(TIMINGS))


def test_agent_unit_start_reload_stop(container: AgentHost) -> None:
    c = container
    with timed("users and venv"):
        # The user and its GPU groups come from the repository's sysusers file, as on a real host.
        c.exec(["systemd-sysusers", "/usr/lib/sysusers.d/tdist.conf"])
        groups = c.exec(["id", "-nG", "tdist"]).stdout.split()
        assert {"video", "render"} <= set(groups), groups
        c.exec(["python3", "-m", "venv", VENV])
        c.exec([f"{VENV}/bin/pip", "install", "--quiet", "--no-index", "--find-links", "/wheelhouse", "tdist"],
               timeout=900)
    c.exec(["systemd-analyze", "verify", "tdist-agent.service"])
    c.exec(["systemctl", "daemon-reload"])

    # start: ready, two workers registered, requests answered
    with timed("start until ready"):
        c.exec(["systemctl", "start", "tdist-agent"], timeout=120)
        _wait("/ready 200", lambda: (lambda r: (r[0] == 200, r))(c.http("/ready")), 120, c)
    props = c.show("ActiveState", "SubState", "MainPID", "User")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    main_pid = props["MainPID"]
    workers = _wait("2 serving workers", lambda: (lambda w: (len(w) == 2, w))(c.workers()), 60, c)
    assert all(w["operators"] == ["echo"] for w in workers.values()), workers
    owners = c.exec(["ps", "-o", "user=", "-p", ",".join(str(w["pid"]) for w in workers.values())]).stdout.split()
    assert owners == ["tdist", "tdist"], owners  # the workers run as the unit's user
    served = c.exec([f"{VENV}/bin/tdist-client", "--nats-url", "nats://127.0.0.1:4222", "--namespace", NAMESPACE,
                     "--operator", "echo", "--requests", "10", "--concurrency", "4", "--no-progress"], timeout=120)
    assert "answered: 10  errors: 0" in served.stdout, served.stdout
    assert "10 of 10 echoed the input" in served.stdout, served.stdout
    metrics = c.http("/metrics")[1]
    assert 'tdist_agent_workers{state="RUNNING"} 2' in metrics and "tdist_agent_ready 1" in metrics, metrics

    # Same-host tensors under the unit's sandboxing: a client running as the unit's user sends
    # inputs above the inline threshold (160 KB); the worker reads each from the client's
    # shared-memory segment (/dev/shm stays shared and writable under ProtectSystem=strict).
    big = c.exec(["runuser", "-u", "tdist", "--", f"{VENV}/bin/tdist-client", "--nats-url", "nats://127.0.0.1:4222",
                  "--namespace", NAMESPACE, "--operator", "echo", "--requests", "4", "--concurrency", "2",
                  "--input-size-mean", "20000", "--no-progress"], timeout=120)
    assert "answered: 4  errors: 0" in big.stdout and "4 of 4 echoed the input" in big.stdout, big.stdout
    shm_pulls = re.search(r'^tdist_data_plane_pulls_total\{path="shm"\} (\S+)$', c.http("/metrics")[1], re.M)
    assert shm_pulls is not None and float(shm_pulls.group(1)) >= 4, c.http("/metrics")[1]

    # reload: one more worker; the two running ones are left alone; the agent itself is not restarted
    (c.root / "etc/tdist/agent.toml").write_text(agent_toml(3))
    with timed("reload until 3 workers"):
        c.exec(["systemctl", "reload", "tdist-agent"], timeout=60)
        after = _wait("3 serving workers and /ready 200",
                         lambda: (lambda w: (len(w) == 3 and c.http("/ready")[0] == 200, w))(c.workers()), 90, c)
    assert all(after[i]["pid"] == w["pid"] for i, w in workers.items()), (workers, after)
    props = c.show("ActiveState", "MainPID", "NRestarts")
    assert props["ActiveState"] == "active" and props["MainPID"] == main_pid and props["NRestarts"] == "0", props
    assert "tdist_agent_reloads_total 1" in c.http("/metrics")[1]

    # stop with requests in flight: they are all answered, the unit ends clean
    client = c.popen([f"{VENV}/bin/tdist-client", "--nats-url", "nats://127.0.0.1:4222", "--namespace", NAMESPACE,
                      "--operator", "echo", "--requests", "6", "--concurrency", "6", "--delay", "4",
                      "--timeout", "60", "--no-progress"])
    try:
        assert client.stdout is not None
        first = client.stdout.readline()
        assert "live worker(s) serve echo" in first, first + (client.stderr.read() if client.stderr else "")
        time.sleep(1.5)  # the six requests are now being executed (4 s each)
        with timed("stop (drain)"):
            t0 = time.monotonic()
            c.exec(["systemctl", "stop", "tdist-agent"], timeout=180)
            stop_s = time.monotonic() - t0
        out, err = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(30)
    assert client.returncode == 0, f"client exit {client.returncode}\n{first}{out}\n{err}\n{c.journal()}"
    assert "answered: 6  errors: 0" in out, out
    props = c.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus", "NRestarts")
    assert props["ActiveState"] == "inactive", props
    assert props["Result"] == "success", f"{props}\n{c.journal()}"
    assert props["ExecMainStatus"] == "0", props
    log(f"stop took {stop_s:.1f} s (a drain of 4 s requests)")
    left = c.exec(["pgrep", "-u", "tdist"], check=False).stdout.split()
    assert left == [], f"processes of user tdist left after stop: {left}"
    journal = c.journal(400)
    assert '"agent_stopped"' in journal, journal
    assert "SIGKILL" not in journal and "Killing process" not in journal, journal


def test_agent_unit_notify_and_watchdog(container: AgentHost) -> None:
    """Type=notify: ``systemctl start`` returns only once the node is ready. WatchdogSec: an agent
    whose main loop stops (SIGSTOP) is killed by systemd when the watchdog fires, and restarted."""
    c = container
    (c.root / "etc/tdist/agent.toml").write_text(agent_toml(2))
    with timed("notify start"):
        c.exec(["systemctl", "start", "tdist-agent"], timeout=300)
    code, body = c.http("/ready")  # no wait: start returned, so the agent said READY=1
    assert code == 200, f"/ready {code} right after systemctl start returned: {body}\n{c.journal()}"
    props = c.show("Type", "WatchdogUSec", "MainPID", "NRestarts", "ActiveState")
    assert props["Type"] == "notify" and props["WatchdogUSec"] not in ("0", "infinity", ""), props
    first_pid, restarts = props["MainPID"], int(props["NRestarts"])
    c.exec(["kill", "-STOP", first_pid])
    with timed("watchdog restart"):
        after = _wait("the watchdog's restart of the agent",
                      lambda: (lambda p: (p["MainPID"] not in ("0", first_pid) and int(p["NRestarts"]) > restarts
                                          and p["ActiveState"] == "active", p))(
                          c.show("MainPID", "NRestarts", "ActiveState")), 180, c)
    journal = c.journal(400)
    assert "watchdog timeout" in journal.lower(), journal
    _wait("/ready 200 after the restart", lambda: (lambda r: (r[0] == 200, r))(c.http("/ready")), 120, c)
    workers = _wait("2 serving workers after the restart", lambda: (lambda w: (len(w) == 2, w))(c.workers()), 60, c)
    assert len(workers) == 2, workers
    log(f"watchdog: agent {first_pid} stopped, restarted as {after['MainPID']}")
    c.exec(["systemctl", "stop", "tdist-agent"], timeout=300)
    assert c.exec(["pgrep", "-u", "tdist"], check=False).stdout.split() == []
