"""ansible/site.yml on three hosts made on this machine, over real SSH, with real systemd.

Each host is a network namespace with a veth on one bridge (a private /24; no route beyond the
bridge) booting Debian 12 under systemd-nspawn from an overlay of the cached rootfs, with sshd.
The controller is this process: it runs ``ansible-playbook site.yml`` with a generated SSH key
(0600, in a temporary directory) and a known_hosts file of the hosts' own keys, then calls the
cluster with ``tdist-client`` over the bridge. tests/e2e/nspawn.py makes the hosts (what the
machine needs; without it the test is skipped, with the reason).

Layout: node1 runs the hello world's encoder (Triton), node2 its decoder (Triton), node3
encoder_decoder; every node runs an echo worker (tdist.operators.builtin:Echo) for the load,
and a member of the NATS cluster. Checked, in order:

1. the NATS cluster has three routed members with JetStream and one meta leader; the stream and
   registry buckets have 3 replicas;
2. every agent is active under systemd, ready, with its workers registered;
3. ``tdist-client`` runs the hello world across the hosts; the decoder pulled the encoder's output
   from node1 (data-plane counters), encoder_decoder pulled nothing;
4. a second ``site.yml`` changes nothing on any host (its PLAY RECAP is printed);
5. a client without credentials is refused; the agents' (workers') credentials cannot publish
   outside their namespace, a client's cannot take requests;
6. a config-only change (NATS limits and an echo worker's setting) rolled with ``site.yml`` while
   clients keep sending: every request is answered;
7. node3's link is cut with 64 requests in flight: every request gets exactly one final result
   (those node3 held are redelivered), and nodes 1 and 2 keep serving with a JetStream leader.

Timings (cluster boot, first site.yml, second run, host-loss recovery) are printed at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.nspawn import (
    ROOT,
    TIMINGS,
    Container,
    Network,
    apt_install,
    cache_lock,
    ensure_nspawn,
    ensure_rootfs,
    ensure_wheelhouse,
    log,
    require_root_tools,
    tail,
    timed,
    wait_for,
)

pytestmark = pytest.mark.timeout(3600)

NAMESPACE = "hello"
NODES = ("node1", "node2", "node3")
VENV = "/opt/tdist/venv"
ANSIBLE_DIR = ROOT / "ansible"
BIN = Path(sys.executable).parent

# The hello world's stages, one per host (etc/tdist/agent.toml has them on one machine).
TRITON_CONFIG = {"instance_group": [{"count": 1, "kind": "KIND_CPU"}],
                 "parameters": {"delay": "0", "input_copies": "1"}}


def triton_worker(name: str) -> dict[str, Any]:
    return {"name": name, "count": 1, "operators": [{
        "name": name, "implementation": "tdist.operators.triton:TritonOperator", "max_inflight": 16,
        "parameters": {"model_repository": "{{ tdist_agent_model_repository }}", "config": TRITON_CONFIG}}]}


def echo_worker(drain_timeout: float = 30.0) -> dict[str, Any]:
    return {"name": "echo", "count": 1, "registry_ttl": 3.0, "drain_timeout": drain_timeout, "operators": [{
        "name": "echo", "implementation": "tdist.operators.builtin:Echo", "max_inflight": 16}]}


STAGES = {
    "node1": triton_worker("encoder"),
    "node2": triton_worker("decoder"),
    "node3": {"name": "encoder_decoder", "count": 1, "operators": [{
        "name": "encoder_decoder", "implementation": "tdist.hello_world.operators:EncodeDecode", "max_inflight": 64}]},
}

# tdist-client, with its arguments (a password among them) read from standard input: never in argv.
CLIENT = "import json, sys; from tdist.client.cli import main; sys.exit(main(json.load(sys.stdin)))"

RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


@dataclass
class Cluster:
    run_dir: Path
    network: Network
    hosts: dict[str, Container] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    inventory: Path | None = None
    credentials: Path | None = None
    ansible_env: dict[str, str] = field(default_factory=dict)
    tls_ca: Path | None = None
    """The CA of the members' certificates: clients and routes use TLS (None: plain TCP)."""

    # -- ansible ----------------------------------------------------------------------------

    def playbook(self, *extra: str, name: str, playbook: str = "site.yml", timeout: float = 1800
                 ) -> tuple[str, dict[str, dict[str, int]]]:
        """Run ``ansible-playbook site.yml``; returns its output and the PLAY RECAP per host."""
        assert self.inventory is not None
        out_file = self.run_dir / f"ansible-{name}-{time.monotonic_ns()}.log"
        cmd = [str(BIN / "ansible-playbook"), "-i", str(self.inventory), playbook, *extra]
        with open(out_file, "w") as out:
            proc = subprocess.run(cmd, cwd=ANSIBLE_DIR, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                  env=self.ansible_env, stdin=subprocess.DEVNULL)
        text = out_file.read_text()
        recap = {m[1]: {"ok": int(m[2]), "changed": int(m[3]), "unreachable": int(m[4]), "failed": int(m[5])}
                 for m in RECAP.finditer(text)}
        if proc.returncode != 0:
            raise AssertionError(f"ansible-playbook {name} exited with {proc.returncode}:\n{tail(text, 80)}\n"
                                 + self.journals())
        return text, recap

    def journals(self) -> str:
        """The agents' journals and the workers' error lines, for failure messages."""
        parts = []
        for n, h in self.hosts.items():
            if not h.running:
                continue
            parts.append(f"--- {n}: journal of tdist-agent ---\n{h.journal('tdist-agent', 30)}")
            errors = h.sh("grep -h -i -E 'error|unreach|traceback' /var/log/tdist/*.log /var/log/tdist/*.out "
                          "| tail -n 15", check=False, timeout=30).stdout
            parts.append(f"--- {n}: worker errors ---\n{errors}")
        return "\n".join(parts)

    # -- callers on the controller ----------------------------------------------------------

    def password(self, user: str) -> str:
        assert self.credentials is not None
        return (self.credentials / f"nats-{user}.password").read_text().strip()

    def urls(self, *nodes: str) -> list[str]:
        scheme = "tls" if self.tls_ca else "nats"
        return [f"{scheme}://{self.addresses[n]}:4222" for n in (nodes or NODES)]

    def client_args(self, *args: str, nodes: tuple[str, ...] = ()) -> list[str]:
        urls = [a for u in self.urls(*nodes) for a in ("--nats-url", u)]
        tls = ["--tls-ca", str(self.tls_ca)] if self.tls_ca else []
        return [*args, *urls, *tls, "--namespace", NAMESPACE, "--user", f"{NAMESPACE}-client",
                "--password", self.password(f"{NAMESPACE}-client")]

    def client(self, *args: str, nodes: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``tdist-client ARGS`` on the controller, with the client user's credentials."""
        return subprocess.run([sys.executable, "-c", CLIENT], input=json.dumps(self.client_args(*args, nodes=nodes)),
                              capture_output=True, text=True, timeout=timeout, env=self.client_env())

    def client_popen(self, *args: str, nodes: tuple[str, ...] = ()) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.client_env())
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(self.client_args(*args, nodes=nodes)))
        proc.stdin.close()
        proc.stdin = None  # communicate() later must not flush it
        return proc

    def client_env(self) -> dict[str, str]:
        # UCX on the controller: only the bridge reaches the hosts (the tensors a client pulls);
        # UCX leaves bridge devices out unless told.
        return {**os.environ, "UCX_NET_DEVICES": self.network.bridge, "UCX_TCP_BRIDGE_ENABLE": "y",
                "PYTHONUNBUFFERED": "1"}

    def workers(self) -> dict[str, dict[str, Any]]:
        """The registry, as ``tdist-client ls --json`` shows it: live workers by name@node."""
        proc = self.client("ls", "--json", timeout=120)
        assert proc.returncode == 0, f"tdist-client ls: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return {f"{w['name']}@{w['node']}": w for w in json.loads(proc.stdout.strip().splitlines()[-1])["workers"]}

    # -- inside the hosts --------------------------------------------------------------------

    def nats(self, node: str, path: str) -> Any:
        return self.hosts[node].http_json(f"http://127.0.0.1:8222{path}")


def write_inventory(c: Cluster, key: Path, known_hosts: Path, wheelhouse: Path) -> Path:
    inv = c.run_dir / "inventory"
    (inv / "group_vars").mkdir(parents=True)
    (inv / "host_vars").mkdir()
    hosts = {"all": {"children": {
        "nats": {"hosts": {n: None for n in NODES}},
        "gpu_nodes": {"hosts": {n: {"ansible_host": c.addresses[n]} for n in NODES}},
    }}}
    (inv / "hosts.yml").write_text(json.dumps(hosts, indent=1))
    ssh_args = (f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes "
                f"-o ControlMaster=auto -o ControlPersist=30s -o ConnectTimeout=10")
    group_all = {
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(key),
        "ansible_ssh_common_args": ssh_args,
        "tdist_namespace": NAMESPACE,
        "tdist_wheelhouse": str(wheelhouse),
        "tdist_credentials_dir": str(c.credentials),
        "tdist_nats_group": "nats",
        "tdist_nats_client_port": 4222,
        "tdist_nats_tls": c.tls_ca is not None,
        **({"tdist_nats_tls_ca_file": str(c.tls_ca)} if c.tls_ca else {}),
    }
    (inv / "group_vars/all.yml").write_text(json.dumps(group_all, indent=1))
    (inv / "group_vars/nats.yml").write_text(json.dumps({
        "nats_server_lame_duck_duration": 30, "nats_server_lame_duck_grace_period": 5,
        "nats_server_jetstream_max_memory": "256M", "nats_server_jetstream_max_file": "2G",
        "nats_server_route_tls": c.tls_ca is not None,
    }, indent=1))
    (inv / "group_vars/gpu_nodes.yml").write_text(json.dumps({
        "tdist_agent_gpus": "none",
        # Redelivery 10 s after a worker goes silent (the host-loss check waits for it).
        "tdist_agent_request_plane": {"ack_wait": 10.0, "max_deliver": 5, "storage": "file"},
        # The hello world's 8 kB tensors go by reference, so that they travel on the data plane.
        "tdist_agent_data_plane": {"inline_threshold": 1024},
    }, indent=1))
    for n in NODES:
        write_host_vars(inv, n)
    return inv


def write_host_vars(inv: Path, node: str, echo_drain: float = 30.0) -> None:
    host: dict[str, Any] = {"tdist_agent_workers": [STAGES[node], echo_worker(echo_drain)]}
    tls = inv.parent / "tls"
    if (tls / f"{node}.pem").exists():
        host.update(nats_server_tls_cert_file=str(tls / f"{node}.pem"),
                    nats_server_tls_key_file=str(tls / f"{node}-key.pem"))
    (inv / "host_vars" / f"{node}.yml").write_text(json.dumps(host, indent=1))


def make_certificates(c: Cluster) -> Path | None:
    """A CA and one certificate per member naming its address (clients and routes verify it).

    None (plain TCP) where openssl is missing."""
    if not shutil.which("openssl"):
        log("openssl is not installed: the cluster runs without TLS")
        return None
    tls = c.run_dir / "tls"
    tls.mkdir(mode=0o700)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tls)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=tdist-test-ca")
    for n in NODES:
        (tls / f"{n}.ext").write_text(f"subjectAltName=IP:{c.addresses[n]},DNS:{n}\n"
                                      "extendedKeyUsage=serverAuth,clientAuth\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{n}-key.pem", "-out", f"{n}.csr",
                "-subj", f"/CN={n}")
        openssl("x509", "-req", "-in", f"{n}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
                "-out", f"{n}.pem", "-days", "2", "-extfile", f"{n}.ext")
    return tls / "ca.pem"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require_root_tools("ip", "ssh-keygen")
    apt_install("openssh-client", "ssh")
    if not (BIN / "ansible-playbook").exists():
        pytest.skip(f"ansible-playbook is not installed in {BIN} (make test installs ansible-core)")
    TIMINGS.clear()
    t0 = time.monotonic()
    run_dir = Path(tempfile.mkdtemp(prefix="tdist-cluster-", dir="/var/tmp"))
    os.chmod(run_dir, 0o700)
    network = Network(tag=f"{os.getpid() % 100000}")
    c = Cluster(run_dir, network)
    try:
        with cache_lock():
            rootfs = ensure_rootfs()
            nspawn, libdir = ensure_nspawn()
            wheelhouse = ensure_wheelhouse(run_dir)

        # The controller's SSH key and the hosts' keys.
        (run_dir / "ssh").mkdir(mode=0o700)
        key = run_dir / "ssh" / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tdist-test-controller", "-f", str(key)],
                       check=True, capture_output=True)
        os.chmod(key, 0o600)
        known_hosts = run_dir / "ssh" / "known_hosts"

        with timed("cluster boot"):
            network.create()
            lines = []
            for i, n in enumerate(NODES, start=1):
                ns = network.add_host(i)
                c.addresses[n] = network.address(i)
                host = Container(f"tdist{network.tag}{n}", rootfs, nspawn, libdir, run_dir / n, netns=ns)
                c.hosts[n] = host
                host.prepare()
                lines.append(f"{c.addresses[n]} {host.authorize_ssh((key.with_suffix('.pub')).read_text())}")
                host.start()
            known_hosts.write_text("\n".join(" ".join(line.split()[:3]) for line in lines) + "\n")
            for host in c.hosts.values():
                host.wait_booted()
        log(f"hosts: {c.addresses} on bridge {network.bridge}")

        c.credentials = run_dir / "credentials"
        c.tls_ca = make_certificates(c)
        c.inventory = write_inventory(c, key, known_hosts, wheelhouse)
        home = run_dir / "ansible-home"
        c.ansible_env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "ANSIBLE_HOME": str(home),
            "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(run_dir / "cp"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_CALLBACK_PLUGINS": str(Path(__file__).parent / "ansible_plugins"),
            "ANSIBLE_CALLBACKS_ENABLED": "task_times",
        }
        yield c
    finally:
        for host in c.hosts.values():
            host.terminate()
        for host in c.hosts.values():
            host.cleanup()
        network.destroy()
        _stop_ssh_masters(run_dir / "cp")
        shutil.rmtree(run_dir, ignore_errors=True)
        TIMINGS["total"] = round(time.monotonic() - t0, 1)
        log("timings (s): " + json.dumps(TIMINGS))


def _stop_ssh_masters(control_dir: Path) -> None:
    """The ControlPersist ssh processes Ansible left on the controller: ours, stopped by PID."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"ssh") and any(str(control_dir).encode() in a for a in argv):
            try:
                os.kill(int(entry), 15)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployed(cluster: Cluster) -> Cluster:
    with timed("first site.yml"):
        out, recap = cluster.playbook(name="first")
    print(_recap(out), flush=True)
    assert set(recap) == set(NODES), recap
    assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in recap.values()), recap
    return cluster


def _recap(out: str) -> str:
    """The PLAY RECAP and, after it, the slowest tasks."""
    return out[out.rindex("PLAY RECAP"):].strip()


def test_nats_cluster_routed_with_jetstream_and_a_meta_leader(deployed: Cluster) -> None:
    c = deployed
    leaders = set()
    for n in NODES:
        varz = c.nats(n, "/varz")
        assert varz["server_name"] == n, varz["server_name"]
        assert varz["cluster"]["name"] == "tdist"
        assert varz["max_payload"] == 4194304 and varz["jetstream"]["config"]["store_dir"].startswith("/var/lib/nats")
        routez = c.nats(n, "/routez")
        peers = {r.get("remote_name") for r in routez["routes"]}
        assert peers == set(NODES) - {n}, (n, routez["routes"])
        jsz = c.nats(n, "/jsz")
        assert jsz["meta_cluster"]["cluster_size"] == 3, jsz["meta_cluster"]
        leaders.add(jsz["meta_cluster"]["leader"])
        state = c.hosts[n].exec(["systemctl", "is-active", "nats-server"], check=False).stdout.strip()
        assert state == "active", (n, state)
        owner = c.hosts[n].sh("stat -c '%U %a' /etc/nats-server.conf").stdout.split()
        assert owner == ["nats", "600"], owner
    assert len(leaders) == 1 and leaders <= set(NODES), leaders
    streams = c.nats("node1", "/jsz?accounts=true&streams=true&config=true")
    found = {s["name"]: s["config"]["num_replicas"]
             for a in streams["account_details"] for s in a.get("stream_detail", [])}
    for name in (f"TDIST_{NAMESPACE}", f"KV_tdist_{NAMESPACE}_workers", f"KV_tdist_{NAMESPACE}_nodes"):
        assert found.get(name) == 3, found
    log(f"NATS: 3 routed members, meta leader {leaders.pop()}, streams {found}")


def test_agents_active_with_workers_registered(deployed: Cluster) -> None:
    c = deployed
    for n in NODES:
        h = c.hosts[n]
        props = h.show("tdist-agent", "ActiveState", "SubState", "User", "NRestarts")
        assert props["ActiveState"] == "active" and props["SubState"] == "running", (n, props)
        assert props["User"] == "tdist", props
        code, body = h.http_get("http://127.0.0.1:9090/ready")
        assert code == 200, (n, body)
        mode = h.sh("stat -c '%U %a' /etc/tdist/agent.toml").stdout.split()
        assert mode == ["tdist", "600"], mode
    want = {f"{STAGES[n]['name']}@{n}" for n in NODES} | {f"echo@{n}" for n in NODES}
    workers = wait_for("every worker registered and serving",
                       lambda: (lambda w: ({k for k, v in w.items() if v["state"] == "serving"} >= want, w))(c.workers()),
                       120, c.journals)
    log("workers: " + ", ".join(sorted(workers)))


def test_hello_world_across_hosts(deployed: Cluster) -> None:
    c = deployed
    # Measured: a Triton worker registers as serving (and the agent's /ready turns 200) before
    # its model is loaded; calls fail with TRITON_MODEL_NOT_READY for a few seconds. Wait for
    # one answer of each stage first (the time it took is printed).
    t0 = time.monotonic()
    for stage in ("encoder", "decoder"):
        wait_for(f"the {stage} model to answer", lambda stage=stage: (lambda p: (p.returncode == 0, tail(
            p.stdout + p.stderr, 3)))(c.client("--operator", stage, "--requests", "1", "--timeout", "20",
                                               "--no-progress", timeout=120)), 180)
    log(f"Triton models answering {time.monotonic() - t0:.1f} s after the agents were ready")
    before = c.workers()
    proc = c.client("--requests", "40", "--concurrency", "8", "--timeout", "60", "--no-progress", "--json",
                    timeout=300)
    print(proc.stdout, flush=True)
    assert proc.returncode == 0, f"tdist-client exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n{c.journals()}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["answered"] == 40 and summary["errors"] == 0, summary

    def grown(w: dict[str, dict[str, Any]]) -> tuple[bool, dict[str, Any]]:
        delta = {k: {f: w[k][f] - before[k][f] for f in ("served", "bytes_pulled", "bytes_served")}
                 for k in ("encoder@node1", "decoder@node2", "encoder_decoder@node3") if k in w and k in before}
        ok = len(delta) == 3 and all(d["served"] >= 40 for d in delta.values()) and (
            delta["encoder@node1"]["bytes_served"] >= 40 * 8000 and delta["decoder@node2"]["bytes_pulled"] >= 40 * 8000)
        return ok, delta  # bytes too: a pull served after the heartbeat that reported the last request lags one

    # Registry entries refresh with each heartbeat: wait for the counters of this run.
    delta = wait_for("the data-plane counters of the run", lambda: grown(c.workers()), 60)
    log(f"data-plane counters of the run: {delta}")
    # 40 encoder outputs of 8,000 bytes went from node1 to node2, not through node3.
    assert delta["encoder@node1"]["bytes_served"] >= 40 * 8000, delta
    assert delta["decoder@node2"]["bytes_pulled"] >= 40 * 8000, delta
    assert delta["encoder_decoder@node3"]["bytes_pulled"] == 0, delta


def test_second_run_changes_nothing(deployed: Cluster) -> None:
    with timed("second site.yml"):
        out, recap = deployed.playbook(name="second")
    print(_recap(out), flush=True)
    assert set(recap) == set(NODES), recap
    changed = {h: r["changed"] for h, r in recap.items()}
    assert all(v == 0 for v in changed.values()), f"second run changed something: {changed}\n{_changed_tasks(out)}"


def _changed_tasks(out: str) -> str:
    lines = out.splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.startswith("changed:"):
            task = next((lines[j] for j in range(i, -1, -1) if lines[j].startswith("TASK [")), "?")
            found.append(f"{task} {line}")
    return "\n".join(found)


async def _nats_checks(c: Cluster) -> dict[str, Any]:
    import ssl

    import nats
    from nats.errors import TimeoutError as NatsTimeout

    seen: dict[str, Any] = {}
    urls = c.urls("node1", "node2")
    tls: dict[str, Any] = {"tls": ssl.create_default_context(cafile=str(c.tls_ca))} if c.tls_ca else {}

    # No credentials: refused.
    try:
        nc = await nats.connect(servers=urls, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5,
                                **tls)
        await nc.close()
        seen["anonymous"] = "connected"
    except Exception as exc:
        seen["anonymous"] = f"{type(exc).__name__}: {exc}"

    async def as_user(user: str) -> tuple[Any, list[str]]:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(servers=urls, user=user, password=c.password(user), error_cb=on_error,
                                allow_reconnect=False, connect_timeout=5, **tls)
        return nc, errors

    # The agents' user (their workers use it too): its namespace yes, another one no.
    nc, errors = await as_user(f"{NAMESPACE}-agent")
    try:
        # No error expected: after a flush (PING/PONG) the server has handled the publish.
        await nc.publish(f"tdist.{NAMESPACE}.cancel.probe", b"")
        await nc.flush()
        seen["agent_inside"] = list(errors)
        await nc.publish("tdist.other.req.echo.1", b"{}")
        await nc.flush()
        await _until_error(errors)
        seen["agent_outside"] = list(errors)
        errors.clear()
        try:
            await nc.request("$JS.API.STREAM.CREATE.TDIST_other", json.dumps(
                {"name": "TDIST_other", "subjects": ["tdist.other.req.>"]}).encode(), timeout=3)
            seen["agent_create_other"] = "created"
        except NatsTimeout:
            seen["agent_create_other"] = "no answer"
        await _until_error(errors)
        seen["agent_create_other_errors"] = list(errors)
    finally:
        await nc.close()

    # A client may call but not take requests off the queue.
    nc, errors = await as_user(f"{NAMESPACE}-client")
    try:
        await nc.subscribe(f"tdist.{NAMESPACE}.req.>")
        await nc.flush()
        await _until_error(errors)
        seen["client_subscribe_requests"] = list(errors)
    finally:
        await nc.close()
    return seen


async def _until_error(errors: list[str], timeout: float = 10.0) -> None:
    """Until the connection's error callback has reported something (a refusal is expected; the
    server's -ERR for a subscription can come after the PONG of a flush), at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not errors and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def test_credentials_enforced(deployed: Cluster) -> None:
    seen = asyncio.run(_nats_checks(deployed))
    log(f"access checks: {json.dumps(seen)}")
    low = {k: v.lower() if isinstance(v, str) else [e.lower() for e in v] for k, v in seen.items()}
    assert "authorization violation" in low["anonymous"], seen
    assert low["agent_inside"] == [], seen
    assert any('permissions violation for publish to "tdist.other.req.echo.1"' in e for e in low["agent_outside"]), seen
    assert seen["agent_create_other"] == "no answer", seen
    assert any("permissions violation" in e and "tdist_other" in e for e in low["agent_create_other_errors"]), seen
    assert any("permissions violation for subscription" in e for e in low["client_subscribe_requests"]), seen


class LoadLoop:
    """Clients calling echo back to back until stopped; every run must answer every request."""

    def __init__(self, c: Cluster, requests: int = 120, concurrency: int = 12, delay: float = 0.1) -> None:
        self.c, self.args = c, ("--operator", "echo", "--requests", str(requests), "--concurrency", str(concurrency),
                                "--delay", str(delay), "--timeout", "120", "--no-progress", "--json")
        self.stop = threading.Event()
        self.results: list[tuple[int, str, str]] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            proc = self.c.client(*self.args, nodes=("node1", "node2"), timeout=300)
            self.results.append((proc.returncode, proc.stdout, proc.stderr))

    def wait_for_run_after_now(self) -> None:
        """Until one whole client run started after this call has finished (the cluster serves on)."""
        finished = len(self.results)
        wait_for("a client run after the change", lambda: (len(self.results) >= finished + 2, len(self.results)), 400)

    def __enter__(self) -> LoadLoop:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(400)


def test_config_change_rolled_under_load_loses_nothing(deployed: Cluster) -> None:
    c = deployed
    assert c.inventory is not None
    before = c.workers()
    # Config only: a NATS limit (each member reloads, one at a time) and the echo workers' drain
    # budget (each agent reloads and restarts just that worker, after draining it).
    (c.inventory / "group_vars" / "nats.yml").write_text(json.dumps({
        **json.loads((c.inventory / "group_vars" / "nats.yml").read_text()), "nats_server_max_connections": 60000}))
    for n in NODES:
        write_host_vars(c.inventory, n, echo_drain=20.0)
    with LoadLoop(c) as load:
        wait_for("the load to start", lambda: (len(load.results) >= 1, len(load.results)), 120)
        # A rolling change: one agent at a time (each waits for /ready), so that echo keeps workers.
        with timed("config-only site.yml under load"):
            out, recap = c.playbook("-e", "tdist_agent_serial=1", name="config-change")
        load.wait_for_run_after_now()
    print(_recap(out), flush=True)
    assert all(r["changed"] >= 1 for r in recap.values()), recap
    assert "RUNNING HANDLER [nats_server : Reload nats-server]" in out, _changed_tasks(out)
    assert "RUNNING HANDLER [tdist_agent : Reload tdist-agent]" in out, _changed_tasks(out)
    assert "Restart nats-server" not in _handlers_run(out) and "Restart tdist-agent" not in _handlers_run(out)
    _check_load(load, "the config-only change")
    assert c.nats("node1", "/varz")["max_connections"] == 60000
    after = c.workers()
    for n in NODES:  # the echo workers were restarted (new processes), the pipeline stages were not
        assert after[f"echo@{n}"]["pid"] != before[f"echo@{n}"]["pid"], (n, before, after)
        stage = f"{STAGES[n]['name']}@{n}"
        assert after[stage]["pid"] == before[stage]["pid"], (stage, before[stage], after[stage])


def test_rolling_restart_under_load_loses_nothing(deployed: Cluster) -> None:
    """What a new nats-server wheel does, forced: each member in lame duck mode, one at a time."""
    c = deployed
    pids = {n: c.hosts[n].show("nats-server", "MainPID")["MainPID"] for n in NODES}
    with LoadLoop(c) as load:
        wait_for("the load to start", lambda: (len(load.results) >= 1, len(load.results)), 120)
        with timed("rolling nats-server restart under load"):
            out, recap = c.playbook("-e", "nats_server_restart=true", name="restart", playbook="nats.yml")
        load.wait_for_run_after_now()
    print(_recap(out), flush=True)
    # serial: 1: a member restarts and is healthy again before the next one restarts.
    names = [m[1] for m in re.finditer(r"RUNNING HANDLER \[nats_server : (.*?)\]", out)]
    assert names == ["Restart nats-server", "Wait for nats-server to be healthy"] * 3, names
    starts = {}
    for n in NODES:
        props = c.hosts[n].show("nats-server", "MainPID", "ExecMainStartTimestampMonotonic")
        assert props["MainPID"] != pids[n], (n, pids[n], props)
        starts[n] = int(props["ExecMainStartTimestampMonotonic"])
        journal = c.hosts[n].journal("nats-server", 200)
        assert "Entering lame duck mode" in journal, journal[-2000:]
    assert sorted(starts, key=starts.get) == list(NODES), starts  # one after the other, in inventory order
    _check_load(load, "the rolling restart")


# tdist-client lists the registry before it sends anything, and stops when no worker hosts the
# operator. Measured: while agents restart workers, 1 registry listing in 40 came back empty with
# 4 to 6 workers live (the snapshot of the workers bucket misses entries rewritten meanwhile).
# Such a run sends no request, so it loses none: it is counted apart, not as a failure.
REFUSED = "no live worker serves operator"


def _check_load(load: LoadLoop, what: str) -> None:
    total = runs = refused = 0
    for rc, stdout, stderr in load.results:
        if rc != 0 and REFUSED in stderr and not stdout.strip():
            refused += 1
            continue
        assert rc == 0, f"a client run during {what} failed ({rc}):\n{stdout}\n{stderr}"
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert summary["answered"] == summary["requests"] == summary["sent"] and summary["errors"] == 0, summary
        total += summary["answered"]
        runs += 1
    assert runs >= 3 and runs > refused, f"too few client runs completed during {what}: {runs}, refused {refused}"
    log(f"during {what}: {runs} client runs, {total} requests, all answered"
        + (f"; {refused} run(s) refused at the preflight (empty registry listing), nothing sent" if refused else ""))


def _handlers_run(out: str) -> str:
    return "\n".join(line for line in out.splitlines() if line.startswith("RUNNING HANDLER"))


def test_host_loss_loses_no_request(deployed: Cluster) -> None:
    c = deployed
    wait_for("three echo workers serving", lambda: (lambda w: (
        all(w.get(f"echo@{n}", {}).get("state") == "serving" for n in NODES), sorted(w)))(c.workers()), 60)
    # 64 requests of 4 s each: 48 start at once (16 per echo worker), 16 wait in the queue.
    client = c.client_popen("--operator", "echo", "--requests", "64", "--concurrency", "64", "--delay", "4",
                            "--timeout", "180", "--no-progress", "--json", nodes=("node1", "node2"))
    try:
        def node3_busy() -> tuple[bool, Any]:
            w = c.workers().get("echo@node3", {})
            inflight = sum(op["inflight"] for op in w.get("operators", []))
            return inflight > 0, inflight
        held = wait_for("requests in flight on node3", node3_busy, 60)
        with timed("host-loss recovery"):
            c.network.cut(c.hosts["node3"].netns or "")
            log(f"node3's link is cut with {held} request(s) in flight there")
            out, err = client.communicate(timeout=400)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(30)
    print(out, flush=True)
    assert client.returncode == 0, f"tdist-client exited {client.returncode}\n{out}\n{err}\n{c.journals()}"
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["answered"] == 64 and summary["errors"] == 0, summary
    served = summary.get("served_by", {})
    log(f"after the loss of node3: {summary['answered']} of 64 answered, served by {served}")

    # The two remaining members keep a JetStream leader and serve new requests.
    for n in ("node1", "node2"):
        wait_for(f"{n} healthy", lambda n=n: (lambda r: (r[0] == 200, r))(
            c.hosts[n].http_get("http://127.0.0.1:8222/healthz")), 120)
    leader = wait_for("a meta leader among node1 and node2", lambda: (lambda m: (
        m.get("leader") in ("node1", "node2"), m))(c.nats("node1", "/jsz")["meta_cluster"]), 120)
    log(f"JetStream meta leader after the loss: {leader.get('leader')}")
    again = c.client("--operator", "echo", "--requests", "20", "--concurrency", "4", "--timeout", "60",
                     "--no-progress", "--json", nodes=("node1", "node2"))
    assert again.returncode == 0, again.stdout + again.stderr
