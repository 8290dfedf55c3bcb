"""systemd/tdist-agent.service under a real systemd: a Debian 12 rootfs booted with systemd-nspawn.

The host needs root, debootstrap (installed with apt-get when missing) and a reachable Debian
mirror for the first run; systemd-nspawn is taken from the ``systemd-container`` and
``libsystemd-shared`` packages with ``apt-get download`` + ``dpkg-deb -x`` (never installed on the
host). Otherwise the test is skipped, with the reason.

Cached under ``$TDIST_TEST_CACHE`` (default ``/var/cache/tdist-test``):

- ``rootfs-bookworm-<key>``: the debootstrapped rootfs (minbase + systemd, dbus, python3, ...);
  each run boots an overlay of it (or a copy when overlayfs is not available), so it stays clean;
- ``nspawn``: the extracted systemd-nspawn and its private library;
- ``wheelhouse-<key>``: the cp311 manylinux wheels of tdist's dependencies (keyed on pyproject.toml);
  the tdist wheel itself is built from the working tree on every run.

Inside the container (commands run through ``nsenter -t <container PID 1> -a``): create the
``tdist`` user, install tdist into /opt/tdist/venv from the wheelhouse, install the unit file as it
is in the repository and an agent.toml with two CPU workers of ``tdist.operators.builtin:Echo``,
then ``systemctl start`` (ready, two workers registered, requests served), ``systemctl reload``
with three workers (the two running ones keep their PIDs), and ``systemctl stop`` with requests
in flight (every one answered, ``Result=success``, exit status 0, nothing left in the unit).

Set ``TDIST_TEST_MIRROR`` for another Debian mirror.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(3600)

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("TDIST_TEST_CACHE", "/var/cache/tdist-test"))
MIRROR = os.environ.get("TDIST_TEST_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
INCLUDE = "systemd,systemd-sysv,dbus,python3,python3-venv,libpython3.11,iproute2,procps"
NAMESPACE = "e2e"
NODE = "e2e-node"
VENV = "/opt/tdist/venv"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_ENV = {"PATH": PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}

TIMINGS: dict[str, float] = {}


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class timed:
    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.t0 = time.monotonic()
        log(f"{self.name} ...")

    def __exit__(self, *exc: object) -> None:
        TIMINGS[self.name] = round(time.monotonic() - self.t0, 1)
        log(f"{self.name}: {TIMINGS[self.name]} s")


def run(cmd: Sequence[str], *, timeout: float = 600, check: bool = True, cwd: str | Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**HOST_ENV, **(env or {})})
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def tail(text: str, n: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


# --------------------------------------------------------------------------------------------
# Host prerequisites (each cached; a missing one skips the test with its reason)


def ensure_debootstrap() -> str:
    found = shutil.which("debootstrap", path=PATH)
    if found:
        return found
    for attempt in (["apt-get", "install", "-y", "--no-install-recommends", "debootstrap"],
                    ["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", "debootstrap"]):
        proc = run(attempt, timeout=600, check=False)
        if attempt[1] == "install" and proc.returncode == 0:
            break
    found = shutil.which("debootstrap", path=PATH)
    if not found:
        pytest.skip(f"debootstrap is not installed and `apt-get install debootstrap` failed: {tail(proc.stderr, 5)}")
    return found


def check_mirror() -> None:
    url = f"{MIRROR}/dists/{SUITE}/Release"
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            r.read(64)
    except Exception as exc:
        pytest.skip(f"the Debian mirror is unreachable ({url}: {exc})")


def ensure_rootfs() -> Path:
    key = hashlib.sha256(f"{SUITE} minbase {INCLUDE}".encode()).hexdigest()[:10]
    rootfs = CACHE / f"rootfs-{SUITE}-{key}"
    if (rootfs / ".tdist-complete").exists():
        return rootfs
    check_mirror()
    debootstrap = ensure_debootstrap()
    tmp = CACHE / f"{rootfs.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with timed("debootstrap (first run only)"):
        proc = run([debootstrap, "--variant=minbase", f"--include={INCLUDE}", SUITE, str(tmp), MIRROR],
                   timeout=1800, check=False)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"debootstrap failed ({proc.returncode}): {tail(proc.stdout + proc.stderr, 8)}")
    for deb in (tmp / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    (tmp / ".tdist-complete").write_text(f"{SUITE} {INCLUDE} {MIRROR}\n")
    os.rename(tmp, rootfs)
    return rootfs


def ensure_nspawn() -> tuple[Path, Path]:
    """(systemd-nspawn, its library directory), extracted from the Debian packages."""
    root = CACHE / "nspawn"
    binary, libdir = root / "usr/bin/systemd-nspawn", root / "usr/lib/x86_64-linux-gnu/systemd"
    if not (root / ".tdist-complete").exists():
        tmp = CACHE / "nspawn.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "debs").mkdir(parents=True)
        os.chmod(tmp / "debs", 0o777)  # apt-get download drops privileges to _apt when it can
        with timed("systemd-nspawn download (first run only)"):
            proc = run(["apt-get", "download", "systemd-container", "libsystemd-shared"], cwd=tmp / "debs",
                       timeout=600, check=False)
            if proc.returncode != 0:
                run(["apt-get", "update"], timeout=600, check=False)
                proc = run(["apt-get", "download", "systemd-container", "libsystemd-shared"], cwd=tmp / "debs",
                           timeout=600, check=False)
            if proc.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                pytest.skip(f"cannot obtain systemd-nspawn: apt-get download failed: {tail(proc.stderr, 5)}")
            for deb in sorted((tmp / "debs").glob("*.deb")):
                run(["dpkg-deb", "-x", str(deb), str(tmp / "x")])
        shutil.rmtree(root, ignore_errors=True)
        os.rename(tmp / "x", root)
        shutil.rmtree(tmp, ignore_errors=True)
        (root / ".tdist-complete").touch()
    proc = run([str(binary), "--version"], env={"LD_LIBRARY_PATH": str(libdir)}, check=False, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"the extracted systemd-nspawn does not run here: {tail(proc.stderr, 3)}")
    return binary, libdir


def copy_source(dest: Path) -> Path:
    """The project without build products, so that building its wheel writes nothing in the tree."""
    src = dest / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "daemons", src / "daemons",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    return src


def ensure_wheelhouse(run_dir: Path) -> tuple[Path, Path]:
    """(the cached dependency wheels, this run's tdist wheel) for CPython 3.11 on Debian 12."""
    if sys.version_info[:2] != (3, 11):
        pytest.skip(f"the wheelhouse is built with the host's pip for cp311 (Debian 12's python3); "
                    f"this is Python {sys.version_info.major}.{sys.version_info.minor}")
    src = copy_source(run_dir)
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:10]
    deps = CACHE / f"wheelhouse-{key}"
    if not (deps / ".tdist-complete").exists():
        tmp = CACHE / f"{deps.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with timed("wheelhouse of the dependencies (first run only)"):
            run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(tmp), str(src)], timeout=1800)
        for whl in tmp.glob("tdist-*.whl"):
            whl.unlink()
        (tmp / ".tdist-complete").touch()
        shutil.rmtree(deps, ignore_errors=True)
        os.rename(tmp, deps)
    own = run_dir / "wheels"
    with timed("tdist wheel"):
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(own), str(src)],
            timeout=600)
    return deps, own


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

HTTP_GET = """
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen("http://127.0.0.1:9090" + sys.argv[1], timeout=5) as r:
        print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
except OSError as e:
    print(0); print(e)
"""


def _ns_pid1(root_pid: int) -> int | None:
    """The PID (in our namespace) of the container's PID 1 among the descendants of ``root_pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    todo = list(children.get(root_pid, []))
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
        if len(nspid) >= 2 and nspid[-1] == "1":
            return pid
        todo += children.get(pid, [])
    return None


class Container:
    def __init__(self, rootfs: Path, nspawn: Path, libdir: Path, run_dir: Path, binds: dict[str, Path]) -> None:
        self.rootfs, self.nspawn, self.libdir, self.run_dir, self.binds = rootfs, nspawn, libdir, run_dir, binds
        self.machine = f"tdist-e2e-{os.getpid()}"
        self.root = run_dir / "root"
        self.overlay = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None
        self.console = run_dir / "console.log"

    # -- lifecycle -----------------------------------------------------------------------

    def prepare(self) -> None:
        with timed("per-run rootfs"):
            for d in ("upper", "work", "root"):
                (self.run_dir / d).mkdir()
            proc = run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.rootfs},upperdir={self.run_dir / 'upper'},workdir={self.run_dir / 'work'}",
                        str(self.root)], check=False, timeout=60)
            if proc.returncode == 0:
                self.overlay = True
            else:
                log(f"overlayfs unavailable ({proc.stderr.strip()}); copying the rootfs")
                self.root.rmdir()
                run(["cp", "-a", str(self.rootfs), str(self.root)], timeout=900)
        (self.root / "etc/hostname").write_text(f"{self.machine}\n")
        unit = self.root / "etc/systemd/system/tdist-agent.service"
        shutil.copy2(ROOT / "systemd/tdist-agent.service", unit)
        (self.root / "usr/lib/sysusers.d").mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "systemd/tdist.sysusers", self.root / "usr/lib/sysusers.d/tdist.conf")
        (self.root / "etc/tdist").mkdir(exist_ok=True)
        (self.root / "etc/tdist/agent.toml").write_text(agent_toml(2))
        e2e = self.root / "root/e2e"
        e2e.mkdir(parents=True, exist_ok=True)
        (e2e / "list_workers.py").write_text(LIST_WORKERS)
        (e2e / "http_get.py").write_text(HTTP_GET)

    def boot(self, timeout: float = 180) -> None:
        cmd = [str(self.nspawn), "-D", str(self.root), f"--machine={self.machine}", "--register=no", "--keep-unit",
               "--private-network", "--console=passive", "-b"]
        cmd += [f"--bind-ro={src}:{dst}" for dst, src in self.binds.items()]
        with timed("boot"), open(self.console, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env={**HOST_ENV, "LD_LIBRARY_PATH": str(self.libdir)},
                                         start_new_session=True)
            deadline = time.monotonic() + timeout
            while self.pid1 is None:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"systemd-nspawn exited with {self.proc.returncode}:\n"
                                       f"{tail(self.console.read_text(errors='replace'), 40)}")
                if time.monotonic() > deadline:
                    raise RuntimeError("no container PID 1 after boot")
                self.pid1 = _ns_pid1(self.proc.pid)
                time.sleep(0.2)
            state = self.sh(f"timeout {int(timeout)} systemctl is-system-running --wait", check=False,
                            timeout=timeout + 10).stdout.strip()
            log(f"container PID 1 is {self.pid1}; system state: {state}")
            if state == "degraded":
                log("failed units: " + self.sh("systemctl --failed --no-legend --plain", check=False).stdout.strip())
            assert state in ("running", "degraded"), f"the container did not boot: {state}\n" + tail(
                self.console.read_text(errors="replace"), 40)

    def poweroff(self, timeout: float = 90) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with timed("poweroff"):
            self.sh("systemctl poweroff", check=False, timeout=30)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log("the container did not power off in time")

    def cleanup(self) -> None:
        """Whatever happened: stop our processes by PID, unmount, remove the per-run files."""
        if self.proc is not None and self.proc.poll() is None:
            log(f"terminating systemd-nspawn (pid {self.proc.pid})")
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container to power off
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        if self.pid1 is not None and _alive(self.pid1):
            os.kill(self.pid1, signal.SIGKILL)  # PID 1 of its namespace: the whole container goes
        if self.overlay:
            if run(["umount", str(self.root)], check=False, timeout=60).returncode != 0:
                run(["umount", "-l", str(self.root)], check=False, timeout=60)
        mounted = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                   if line.split()[4].startswith(str(self.run_dir))]
        if mounted:
            log(f"not removing {self.run_dir}: still mounted: {mounted}")
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        for leftover in (Path("/run/systemd/nspawn/propagate") / self.machine,
                         Path("/run/systemd/nspawn/unix-export") / self.machine):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)

    # -- commands inside -------------------------------------------------------------------

    def exec(self, argv: Sequence[str], *, check: bool = True, timeout: float = 120
             ) -> subprocess.CompletedProcess[str]:
        assert self.pid1 is not None
        proc = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8",
                               "HOME=/root", *argv], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"inside the container: {' '.join(argv)} exited with {proc.returncode}\n"
                                 f"stdout: {proc.stdout[-4000:]}\nstderr: {proc.stderr[-4000:]}\n"
                                 f"--- journal of tdist-agent ---\n{self.journal()}")
        return proc

    def popen(self, argv: Sequence[str]) -> subprocess.Popen[str]:
        assert self.pid1 is not None
        return subprocess.Popen(["nsenter", "-t", str(self.pid1), "-a", "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8",
                                 "HOME=/root", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.exec(["sh", "-c", script], **kw)  # type: ignore[arg-type]

    def journal(self, lines: int = 80) -> str:
        if self.pid1 is None:
            return ""
        proc = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "journalctl", "-u", "tdist-agent",
                               "--no-pager", "-o", "cat", "-n", str(lines)], capture_output=True, text=True, timeout=60)
        return proc.stdout + proc.stderr

    def show(self, *props: str) -> dict[str, str]:
        out = self.exec(["systemctl", "show", "tdist-agent", *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def http(self, path: str) -> tuple[int, str]:
        out = self.exec([f"{VENV}/bin/python", "/root/e2e/http_get.py", path], timeout=30).stdout
        code, _, body = out.partition("\n")
        return int(code), body

    def workers(self) -> dict[str, dict]:  # type: ignore[type-arg]
        out = self.exec([f"{VENV}/bin/python", "/root/e2e/list_workers.py"], timeout=60).stdout
        return {k: w for k, w in json.loads(out.strip().splitlines()[-1]).items()
                if w["node"] == NODE and w["state"] == "serving"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def wait_for(what: str, probe, timeout: float, container: Container):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        ok, last = probe()
        if ok:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last}\n"
                         f"--- journal of tdist-agent ---\n{container.journal()}")


# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def container() -> Iterator[Container]:
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, overlay mount, systemd-nspawn)")
    if not shutil.which("nsenter", path=PATH):
        pytest.skip("nsenter (util-linux) is not installed")
    for tool in ("apt-get", "dpkg-deb"):
        if not shutil.which(tool, path=PATH):
            pytest.skip(f"{tool} is not available (a Debian host is needed to obtain debootstrap and systemd-nspawn)")
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists() and not Path("/sys/fs/cgroup/systemd").exists():
        pytest.skip("no cgroup hierarchy for systemd-nspawn")
    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    run_dir = Path(tempfile.mkdtemp(prefix="tdist-nspawn-", dir="/var/tmp"))
    box: Container | None = None
    try:
        with open(CACHE / ".lock", "w") as lock:  # one run at a time fills the cache
            fcntl.flock(lock, fcntl.LOCK_EX)
            rootfs = ensure_rootfs()
            nspawn, libdir = ensure_nspawn()
            deps, own = ensure_wheelhouse(run_dir)
        box = Container(rootfs, nspawn, libdir, run_dir, {"/wheelhouse": deps, "/wheels": own})
        box.prepare()
        box.boot()
        yield box
        box.poweroff()
    finally:
        if box is not None:
            box.cleanup()
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
        TIMINGS["total"] = round(time.monotonic() - t0, 1)
        log("timings (s): " + json.dumps(TIMINGS))


def test_agent_unit_start_reload_stop(container: Container) -> None:
    c = container
    with timed("users and venv"):
        # The user and its GPU groups come from the repository's sysusers file, as on a real host.
        c.exec(["systemd-sysusers", "/usr/lib/sysusers.d/tdist.conf"])
        groups = c.exec(["id", "-nG", "tdist"]).stdout.split()
        assert {"video", "render"} <= set(groups), groups
        c.exec(["python3", "-m", "venv", VENV])
        c.exec([f"{VENV}/bin/pip", "install", "--quiet", "--no-index", "--find-links", "/wheelhouse",
                "--find-links", "/wheels", "tdist"], timeout=900)
    c.exec(["systemd-analyze", "verify", "tdist-agent.service"])
    c.exec(["systemctl", "daemon-reload"])

    # start: ready, two workers registered, requests answered
    with timed("start until ready"):
        c.exec(["systemctl", "start", "tdist-agent"], timeout=120)
        wait_for("/ready 200", lambda: (lambda r: (r[0] == 200, r))(c.http("/ready")), 120, c)
    props = c.show("ActiveState", "SubState", "MainPID", "User")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    main_pid = props["MainPID"]
    workers = wait_for("2 serving workers", lambda: (lambda w: (len(w) == 2, w))(c.workers()), 60, c)
    assert all(w["operators"] == ["echo"] for w in workers.values()), workers
    owners = c.exec(["ps", "-o", "user=", "-p", ",".join(str(w["pid"]) for w in workers.values())]).stdout.split()
    assert owners == ["tdist", "tdist"], owners  # the workers run as the unit's user
    served = c.exec([f"{VENV}/bin/tdist-client", "--nats-url", "nats://127.0.0.1:4222", "--namespace", NAMESPACE,
                     "--operator", "echo", "--requests", "10", "--concurrency", "4", "--no-progress"], timeout=120)
    assert "answered: 10  errors: 0" in served.stdout, served.stdout
    assert "10 of 10 echoed the input" in served.stdout, served.stdout
    metrics = c.http("/metrics")[1]
    assert 'tdist_agent_workers{state="RUNNING"} 2' in metrics and "tdist_agent_ready 1" in metrics, metrics

    # reload: one more worker; the two running ones are left alone; the agent itself is not restarted
    (c.root / "etc/tdist/agent.toml").write_text(agent_toml(3))
    with timed("reload until 3 workers"):
        c.exec(["systemctl", "reload", "tdist-agent"], timeout=60)
        after = wait_for("3 serving workers and /ready 200",
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
    assert stop_s < 60, f"stop took {stop_s:.1f} s (drain of 4 s requests)"
    left = c.exec(["pgrep", "-u", "tdist"], check=False).stdout.split()
    assert left == [], f"processes of user tdist left after stop: {left}"
    journal = c.journal(400)
    assert '"agent_stopped"' in journal, journal
    assert "SIGKILL" not in journal and "Killing process" not in journal, journal
