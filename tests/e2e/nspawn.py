"""Hosts made on this machine for end-to-end tests: Debian 12 booted under systemd-nspawn.

Shared by test_systemd_nspawn.py (one container, no network) and test_cluster.py (three hosts,
each in its own network namespace on one bridge, reached over SSH).

What it needs from the host (each missing piece skips the test, naming it): root, apt-get and
dpkg-deb (a Debian host), debootstrap (installed with apt-get when missing), nsenter, cgroups,
and, on the first run, a Debian mirror. The mirror comes from the host's own apt sources
(``/etc/apt/sources.list``, ``/etc/apt/sources.list.d/*.list`` and ``*.sources``), or from
``$TDIST_TEST_MIRROR``; no host name is written here.

Cached under ``$TDIST_TEST_CACHE`` (default ``/var/cache/tdist-test``), filled under a lock:

- ``rootfs-bookworm-<key>``: the debootstrapped rootfs (minbase + systemd, dbus, python3,
  openssh-server, ...); each host boots an overlay of it (a copy where overlayfs is missing),
  so it stays clean;
- ``nspawn``: systemd-nspawn and its private library, extracted from Debian's
  ``systemd-container`` and ``libsystemd-shared`` packages (``apt-get download`` +
  ``dpkg-deb -x``: never installed on the host, whose systemd it would upgrade);
- ``wheelhouse``: ``make wheelhouse`` output (tdist and every dependency as wheels); wheels
  already there are reused, the tdist wheel is rebuilt from the working tree on every run, and
  each run takes a hard-linked copy of it, so runs never see each other's changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tdist.process import alive

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("TDIST_TEST_CACHE", "/var/cache/tdist-test"))
SUITE = "bookworm"
INCLUDE = "systemd,systemd-sysv,dbus,python3,python3-venv,libpython3.11,iproute2,procps,openssh-server"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_ENV = {"PATH": PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
APT_SOURCES = Path("/etc/apt")

T = TypeVar("T")


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Timings(dict[str, float]):
    """Named durations of a test run, printed at its end."""

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        log(f"{name} ...")
        try:
            yield
        finally:
            self[name] = round(time.monotonic() - t0, 1)
            log(f"{name}: {self[name]} s")


TIMINGS = Timings()
timed = TIMINGS


def run(cmd: Sequence[str], *, timeout: float = 600, check: bool = True, cwd: str | Path | None = None,
        env: dict[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=cwd, input=input,
                          env={**HOST_ENV, **(env or {})})
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def tail(text: str, n: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def wait_for(what: str, probe: Callable[[], tuple[bool, T]], timeout: float,
             context: Callable[[], str] = lambda: "") -> T:
    """Poll ``probe`` (returning (done, value)) until done; AssertionError with the last value otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        ok, last = probe()
        if ok:
            return last  # type: ignore[no-any-return]
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last}\n{context()}")


# --------------------------------------------------------------------------------------------
# The Debian mirror, from the host's apt sources


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def _deb822_sources(text: str) -> list[AptSource]:
    found = []
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in para.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0] in " \t" and key:  # continuation
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            found.append(AptSource(uri, tuple(fields.get("suites", "").split()),
                                   tuple(fields.get("components", "").split())))
    return found


def _one_line_sources(text: str) -> list[AptSource]:
    found = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line[4:])  # options: [arch=amd64 signed-by=...]
        parts = line.split()
        if len(parts) >= 2:
            found.append(AptSource(parts[0], (parts[1],), tuple(parts[2:])))
    return found


def apt_sources(root: Path = APT_SOURCES) -> list[AptSource]:
    """Every enabled ``deb`` entry of the host's apt configuration, in apt's file order."""
    files = [root / "sources.list"] + sorted(Path(p) for p in glob.glob(str(root / "sources.list.d" / "*")))
    found: list[AptSource] = []
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            found += _deb822_sources(text)
        elif path.suffix == ".list" or path.name == "sources.list":
            found += _one_line_sources(text)
    return found


def mirror_candidates(suite: str = SUITE, root: Path = APT_SOURCES) -> list[str]:
    """Archive URIs of the host's sources that carry ``main``: those listing ``suite`` first."""
    sources = [s for s in apt_sources(root) if "main" in s.components and s.uri.split(":", 1)[0] in ("http", "https")]
    ordered = [s.uri for s in sources if suite in s.suites] + [s.uri for s in sources]
    return list(dict.fromkeys(u.rstrip("/") for u in ordered))


def debian_mirror(suite: str = SUITE) -> str:
    """``$TDIST_TEST_MIRROR``, or the first mirror of the host's apt sources that has ``suite``."""
    override = os.environ.get("TDIST_TEST_MIRROR")
    candidates = [override.rstrip("/")] if override else mirror_candidates(suite)
    if not candidates:
        pytest.skip(f"no Debian mirror in the host's apt sources ({APT_SOURCES}) and TDIST_TEST_MIRROR is unset")
    errors = []
    for uri in candidates:
        url = f"{uri}/dists/{suite}/Release"
        try:
            with urllib.request.urlopen(url, timeout=20) as r:
                r.read(64)
            return uri
        except Exception as exc:
            errors.append(f"{url}: {exc}")
    pytest.skip(f"no reachable Debian mirror with {suite}: {'; '.join(errors)}")


# --------------------------------------------------------------------------------------------
# Host prerequisites (each cached; a missing one skips the test with its reason)


def require_root_tools(*extra: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, overlay mounts, network namespaces, systemd-nspawn)")
    for tool in ("nsenter", "apt-get", "dpkg-deb", *extra):
        if not shutil.which(tool, path=PATH):
            pytest.skip(f"{tool} is not available (a Debian host with util-linux and iproute2 is needed)")
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists() and not Path("/sys/fs/cgroup/systemd").exists():
        pytest.skip("no cgroup hierarchy for systemd-nspawn")


def apt_install(package: str, binary: str) -> str:
    """The path of ``binary``, installing ``package`` with apt-get first when it is missing."""
    found = shutil.which(binary, path=PATH)
    if found:
        return found
    proc = run(["apt-get", "install", "-y", "--no-install-recommends", package], timeout=600, check=False)
    if proc.returncode != 0:
        run(["apt-get", "update"], timeout=600, check=False)
        proc = run(["apt-get", "install", "-y", "--no-install-recommends", package], timeout=600, check=False)
    found = shutil.which(binary, path=PATH)
    if not found:
        pytest.skip(f"{binary} is not installed and `apt-get install {package}` failed: {tail(proc.stderr, 5)}")
    return found


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """One run at a time fills the cache."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_rootfs() -> Path:
    key = hashlib.sha256(f"{SUITE} minbase {INCLUDE}".encode()).hexdigest()[:10]
    rootfs = CACHE / f"rootfs-{SUITE}-{key}"
    if (rootfs / ".tdist-complete").exists():
        return rootfs
    mirror = debian_mirror()
    debootstrap = apt_install("debootstrap", "debootstrap")
    tmp = CACHE / f"{rootfs.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with timed("debootstrap (first run only)"):
        proc = run([debootstrap, "--variant=minbase", f"--include={INCLUDE}", SUITE, str(tmp), mirror],
                   timeout=1800, check=False)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"debootstrap failed ({proc.returncode}): {tail(proc.stdout + proc.stderr, 8)}")
    for deb in (tmp / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    (tmp / ".tdist-complete").write_text(f"{SUITE} {INCLUDE}\n")
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


def ensure_wheelhouse(run_dir: Path) -> Path:
    """This run's wheelhouse: ``make wheelhouse`` into the cache, then a hard-linked copy of it.

    The hosts run Debian 12's python3 (3.11): the wheels are built by this interpreter's venv,
    so it has to be 3.11 too.
    """
    if sys.version_info[:2] != (3, 11):
        pytest.skip(f"the wheelhouse is built for cp311 (Debian 12's python3); "
                    f"this is Python {sys.version_info.major}.{sys.version_info.minor}")
    if not shutil.which("make", path=PATH):
        pytest.skip("make is not installed (the wheelhouse is built with `make wheelhouse`)")
    cached = CACHE / "wheelhouse"
    make = ["make", "-C", str(ROOT), "wheelhouse", f"WHEELHOUSE={cached}"]
    with timed("make wheelhouse"):
        # From the cached wheels alone first (no index: seconds instead of a minute of lookups);
        # with the index when something is missing (first run, a new dependency).
        proc = run(make, timeout=1800, check=False, env={"PIP_NO_INDEX": "1"}) if cached.is_dir() else None
        if proc is None or proc.returncode != 0:
            proc = run(make, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"make wheelhouse failed ({proc.returncode}):\n{tail(proc.stdout + proc.stderr, 30)}")
    mine = run_dir / "wheelhouse"
    mine.mkdir()
    for entry in cached.iterdir():
        if entry.is_file():
            os.link(entry, mine / entry.name)
    return mine


# --------------------------------------------------------------------------------------------
# A network of hosts: one bridge, a network namespace per host


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = run(["ip", "-4", "-o", "addr", "show"], check=False).stdout + run(["ip", "-4", "route"], check=False).stdout
    nets = []
    for token in re.findall(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)\b", out):
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.IPv4Network(token, strict=False))
    return nets


@dataclass
class Network:
    """A bridge on this host with a /24 of 10.0.0.0/8 that nothing here routes yet.

    Hosts get namespaces with a veth on the bridge and no default route: their traffic reaches
    the bridge (the controller, this process) and each other, nothing beyond (ip_forward stays
    as it is; nothing is routed or NATed).
    """

    tag: str
    bridge: str = ""
    subnet: ipaddress.IPv4Network | None = None
    hosts: list[str] = field(default_factory=list)  # namespace names
    links: dict[str, str] = field(default_factory=dict)  # namespace -> host-side veth

    def create(self) -> None:
        used = _used_networks()
        for third in range(0, 256):
            candidate = ipaddress.IPv4Network(f"10.213.{third}.0/24")
            if not any(candidate.overlaps(u) for u in used):
                self.subnet = candidate
                break
        else:
            raise RuntimeError("no free /24 in 10.213.0.0/16 for the test network")
        self.bridge = f"tdbr{self.tag}"[:15]
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])

    @property
    def gateway(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    def address(self, index: int) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 10 + index)

    def add_host(self, index: int) -> str:
        """A namespace ``tdist-<tag>-h<index>`` whose eth0 has ``address(index)``; returns its name."""
        ns = f"tdist-{self.tag}-h{index}"
        veth = f"tdv{self.tag}h{index}"[:15]
        run(["ip", "netns", "add", ns])
        self.hosts.append(ns)
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        self.links[ns] = veth
        run(["ip", "link", "set", veth, "master", self.bridge, "up"])
        run(["ip", "-n", ns, "addr", "add", f"{self.address(index)}/24", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    def cut(self, ns: str) -> None:
        """Pull the host's cable: its veth goes down on the bridge side."""
        run(["ip", "link", "set", self.links[ns], "down"])

    def destroy(self) -> None:
        for ns in self.hosts:
            veth = self.links.get(ns)
            if veth:
                run(["ip", "link", "del", veth], check=False)
            run(["ip", "netns", "del", ns], check=False)
        if self.bridge:
            run(["ip", "link", "del", self.bridge], check=False)


# --------------------------------------------------------------------------------------------
# A booted container


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


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Container:
    """One Debian 12 host booted by systemd-nspawn from an overlay of the cached rootfs.

    ``netns``: the network namespace to boot in (``--network-namespace-path``); without it the
    container gets a private network with loopback only. Commands run inside through
    ``nsenter -t <container PID 1> -a``.
    """

    def __init__(self, name: str, rootfs: Path, nspawn: Path, libdir: Path, run_dir: Path,
                 binds: dict[str, Path] | None = None, netns: str | None = None) -> None:
        self.name, self.rootfs, self.nspawn, self.libdir = name, rootfs, nspawn, libdir
        self.run_dir, self.binds, self.netns = run_dir, binds or {}, netns
        self.root = run_dir / "root"
        self.overlay = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None
        self.console = run_dir / "console.log"

    # -- lifecycle -----------------------------------------------------------------------

    def prepare(self) -> None:
        """The host's root file system: an overlay (or a copy) of the rootfs, named ``name``."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
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
        (self.root / "etc/hostname").write_text(f"{self.name}\n")
        (self.root / "etc/hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{self.name}\n::1\tlocalhost\n")

    def authorize_ssh(self, public_key: str) -> str:
        """Root may log in with ``public_key``; the host gets its own ed25519 host key, returned."""
        ssh_dir = self.root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(ssh_dir, 0o700)
        keys = ssh_dir / "authorized_keys"
        keys.write_text(public_key.strip() + "\n")
        os.chmod(keys, 0o600)
        for old in (self.root / "etc/ssh").glob("ssh_host_*"):
            old.unlink()
        host_key = self.root / "etc/ssh/ssh_host_ed25519_key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{self.name}", "-f", str(host_key)])
        # Only the key made here: sshd would otherwise look for rsa/ecdsa keys and log errors.
        conf = self.root / "etc/ssh/sshd_config.d/tdist-test.conf"
        conf.write_text("HostKey /etc/ssh/ssh_host_ed25519_key\nPasswordAuthentication no\nUseDNS no\n")
        return (self.root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().strip()

    def start(self) -> None:
        cmd = [str(self.nspawn), "-D", str(self.root), f"--machine={self.name}", "--register=no", "--keep-unit",
               "--console=passive", "-b"]
        cmd += [f"--network-namespace-path=/run/netns/{self.netns}"] if self.netns else ["--private-network"]
        cmd += [f"--bind-ro={src}:{dst}" for dst, src in self.binds.items()]
        with open(self.console, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env={**HOST_ENV, "LD_LIBRARY_PATH": str(self.libdir)},
                                         start_new_session=True)

    def wait_booted(self, timeout: float = 180) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.pid1 is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn of {self.name} exited with {self.proc.returncode}:\n"
                                   f"{tail(self.console.read_text(errors='replace'), 40)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no PID 1 in {self.name} after {timeout} s")
            pid = _ns_pid1(self.proc.pid)
            # nspawn's own child is PID 1 of the namespace until it executes systemd.
            if pid is not None and _comm(pid) == "systemd":
                self.pid1 = pid
            time.sleep(0.2)
        state = ""
        while not state:
            remaining = max(10, int(deadline - time.monotonic()))
            proc = self.sh(f"timeout {remaining} systemctl is-system-running --wait", check=False,
                           timeout=remaining + 10)
            state = proc.stdout.strip()
            if not state:  # the bus is not up yet
                if time.monotonic() > deadline:
                    state = f"unknown ({proc.stderr.strip()})"
                time.sleep(0.5)
        log(f"{self.name}: PID 1 is {self.pid1}; system state: {state}")
        if state == "degraded":
            log(f"{self.name}: failed units: " + self.sh("systemctl --failed --no-legend --plain", check=False).stdout.strip())
        assert state in ("running", "degraded"), f"{self.name} did not boot: {state}\n" + tail(
            self.console.read_text(errors="replace"), 40)

    def boot(self, timeout: float = 180) -> None:
        self.start()
        self.wait_booted(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def poweroff(self, timeout: float = 90) -> None:
        if not self.running:
            return
        assert self.proc is not None
        self.sh("systemctl poweroff", check=False, timeout=30)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{self.name} did not power off in time")

    def terminate(self) -> None:
        """Ask the container to power off (SIGTERM to our systemd-nspawn) without waiting: stop
        several at once, then ``cleanup()`` each."""
        if self.proc is not None and self.proc.poll() is None:
            log(f"terminating systemd-nspawn of {self.name} (pid {self.proc.pid})")
            self.proc.send_signal(signal.SIGTERM)

    def cleanup(self) -> None:
        """Whatever happened: stop our processes by PID, unmount, remove the per-run files."""
        if self.proc is not None and self.proc.poll() is None:
            log(f"terminating systemd-nspawn of {self.name} (pid {self.proc.pid})")
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container to power off
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        if self.pid1 is not None and alive(self.pid1):
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
        for leftover in (Path("/run/systemd/nspawn/propagate") / self.name,
                         Path("/run/systemd/nspawn/unix-export") / self.name):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)

    # -- commands inside -------------------------------------------------------------------

    def _argv(self, argv: Sequence[str]) -> list[str]:
        assert self.pid1 is not None, f"{self.name} is not booted"
        return ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "HOME=/root",
                *argv]

    def exec(self, argv: Sequence[str], *, check: bool = True, timeout: float = 120, unit: str | None = None,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self._argv(argv), capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"in {self.name}: {' '.join(argv)} exited with {proc.returncode}\n"
                                 f"stdout: {proc.stdout[-4000:]}\nstderr: {proc.stderr[-4000:]}\n"
                                 + (f"--- journal of {unit} ---\n{self.journal(unit)}" if unit else ""))
        return proc

    def popen(self, argv: Sequence[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(self._argv(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sh(self, script: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.exec(["sh", "-c", script], **kw)

    def journal(self, unit: str, lines: int = 80) -> str:
        if self.pid1 is None or not alive(self.pid1):
            return ""
        proc = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "journalctl", "-u", unit,
                               "--no-pager", "-o", "cat", "-n", str(lines)], capture_output=True, text=True, timeout=60)
        return proc.stdout + proc.stderr

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.exec(["systemctl", "show", unit, *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def http_get(self, url: str, python: str = "python3", timeout: float = 30) -> tuple[int, str]:
        """GET ``url`` from inside the host: (status, body); status 0 when nothing answers."""
        out = self.exec([python, "-c", HTTP_GET, url], timeout=timeout).stdout
        code, _, body = out.partition("\n")
        return int(code), body

    def http_json(self, url: str) -> Any:
        code, body = self.http_get(url)
        assert code == 200, f"{self.name}: GET {url}: {code} {body[:500]}"
        return json.loads(body)


HTTP_GET = """
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
except OSError as e:
    print(0); print(e)
"""
