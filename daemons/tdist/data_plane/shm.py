"""Same-host tensors through shared memory: one file in /dev/shm per stored tensor buffer.

An owner writes each CPU tensor it stores by reference into a segment of its own,
``/dev/shm/tdist-<pid>-<32 hex>`` (mode 0600, created exclusively, name unguessable), keeps
a read-only mapping of it (UCX serves consumers on other hosts from that mapping) and
names it in the tensor's descriptor, with its *host identity*. A consumer whose host
identity is the same reads the segment by name, with no message to the owner; any
other consumer pulls over UCX as before. Whatever goes wrong on the shared-memory path
(segment gone, not readable, wrong size) sends the pull to UCX, whose answer is the
authoritative one (``TensorNotFound``, ``PeerUnreachable``).

Host identity (``host_identity``): a digest of the kernel's boot id, the device and inode of
the /dev/shm this process sees, its network and pid namespaces' inodes and the host name. Same
boot id and same /dev/shm mean the segment is visible; the network namespace is in it so that
processes in different network namespaces of one machine (the data-plane benchmark's "hosts",
``ip netns exec`` shares /dev/shm) count as different hosts and stay on UCX/TCP, as real hosts
would; the pid namespace so that the owner's pid in a segment's name means the same process to
the consumer (``owner_alive``). The cost is that two containers sharing /dev/shm but not the
network or the pid namespace use UCX.

Lifetimes. The owner unlinks a segment when the store frees its buffer (the last reference
released or expired, or the plane closed), and at interpreter exit (``atexit``, this
process's own segments only). Mappings outlive the name: a consumer that has opened or
mapped a segment keeps correct bytes even if the owner dies or the segment is unlinked, and
its zero-copy view stays valid (the kernel frees the memory with the last mapping). A
process that dies without cleaning up (SIGKILL, OOM) leaves its segments behind:
``sweep_dead`` unlinks those whose pid is not alive; the agent runs it at start and every
10 s, and every data plane at its start and every 60 s. Without an agent, a dead process's
segments stay until a tdist data plane on the host sweeps (or the host reboots; /dev/shm is
memory): with no tdist process left on the host, nothing reclaims them. Limits of the pid
test: a reused pid keeps its predecessor's segments until it dies too; a process in another pid
namespace sharing this /dev/shm could look dead, and losing its segment's name only sends its
consumers to UCX (the owner keeps its mapping).

Measured here (2 cores, a VM, 64 MiB unless said; ``benchmarks/data_plane.py``): writing a
segment with ``write`` runs at 0.6-2.4 GB/s against 0.3 for ``fallocate`` + ``mmap`` + copy (shmem
page allocation dominates, tmpfs has no huge pages here); a first read with ``preadv`` at about
16 GB/s at 1 MiB but only about 4 GB/s at 64 MiB (memcpy: 45 and 13); a mapping built and
copied at 7 and 5 GB/s; a read from a kept mapping at 0.85-0.95 of memcpy (the segment's 4 KiB
pages against numpy's huge pages: /dev/shm has no transparent huge pages here). So a consumer
reads a segment with ``preadv`` the first time (from 16 MiB on it maps it at once:
``MAP_FIRST_BYTES``) and from a kept mapping after (``Mappings``), bounded in bytes. Copies out
of a mapping go through the copier the data plane hands in (``parallel_copy.ParallelCopy``: from
16 MiB on, split across threads, which lifts a 64 MiB read from a kept mapping from one thread's
10 to 13 GB/s to 15 to 16, and a first read, whose page faults the threads then share, from 4.6
to 4.8 to 8.2 to 9.5).

Not defended: a process of the same user (or root) that truncates a segment makes a consumer
reading it through a mapping (a zero-copy view, a kept mapping, a first read from 16 MiB on)
fault (SIGBUS); copies through ``preadv`` just see a short read and go to UCX.
"""

from __future__ import annotations

import atexit
import collections
import errno
import hashlib
import mmap
import os
import secrets
import socket
import stat
from collections.abc import Callable
from typing import Any

import numpy as np

from tdist.data_plane.descriptor import SEGMENT_NAME as NAME
from tdist.errors import DataPlaneError, StoreFull
from tdist.logs import get_logger

log = get_logger("tdist.data_plane")

SHM_DIR = "/dev/shm"
_NO_SPACE = (errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EDQUOT)
MAP_FIRST_BYTES = 16 << 20
"""From this size on (where copies are split across threads), even a first read maps the segment
(kept if it fits ``max_bytes``): measured here on fresh segments, 3 runs each, a first read mapped
and copied by two threads runs at 6.8-7.6 GB/s at 16 MiB, 7.5-8.8 at 32 MiB and 8.2-9.5 at 64 MiB,
against 4.0-4.4, 2.8-3.6 and 3.6-4.0 with ``preadv`` (and 4.6-4.8 at 64 MiB mapped with
``MAP_POPULATE`` and copied by one thread, the path before)."""
_MAX_IO = 1 << 30
"""Bytes per read/write call (Linux moves at most 2 GiB - 4 KiB per call anyway)."""

_host_id: str | None = None
_live: set[str] = set()
"""Paths of this process's segments not yet unlinked (for the exit hook)."""
_live_pid = os.getpid()


def host_identity(directory: str = SHM_DIR) -> str:
    """32 hex digits naming what a same-host reader must share with this process ('' when the
    shared-memory directory or /proc is missing: no shared memory then)."""
    global _host_id
    if _host_id is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
            shm = os.stat(directory)
            netns = os.stat("/proc/self/ns/net").st_ino
            pidns = os.stat("/proc/self/ns/pid").st_ino
            if not stat.S_ISDIR(shm.st_mode):
                raise NotADirectoryError(directory)
            parts = f"{boot}|{shm.st_dev}:{shm.st_ino}|{netns}|{pidns}|{socket.gethostname()}"
            _host_id = hashlib.sha256(parts.encode()).hexdigest()[:32]
        except OSError as exc:
            log.info("shared_memory_unavailable", error=f"{type(exc).__name__}: {exc}")
            _host_id = ""
    return _host_id


def available(directory: str = SHM_DIR) -> bool:
    """Whether this process can create segments (and name its host)."""
    return bool(host_identity(directory)) and os.access(directory, os.W_OK | os.X_OK)


def new_name() -> str:
    return f"tdist-{os.getpid()}-{secrets.token_hex(16)}"


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done : done + _MAX_IO], done)


class Segment:
    """An owner's segment: the tensor's bytes in /dev/shm and a read-only mapping of them.

    The mapping is the owner's copy: it stays valid after ``unlink`` (a UCX send from it may
    still be running) and goes with the last reference to it."""

    __slots__ = ("name", "nbytes", "path", "_map", "array")

    def __init__(self, name: str, nbytes: int, path: str, mapping: mmap.mmap) -> None:
        self.name = name
        self.nbytes = nbytes
        self.path = path
        self._map: mmap.mmap | None = mapping
        self.array = np.frombuffer(mapping, dtype=np.uint8)
        """The bytes, read-only (what UCX sends)."""

    @classmethod
    def create(cls, data: Any, directory: str = SHM_DIR) -> Segment:
        """A new segment holding ``data`` (a C-contiguous buffer of at least one byte).
        ``StoreFull`` when /dev/shm has no room, ``DataPlaneError`` on any other failure."""
        view = memoryview(data).cast("B")
        nbytes = len(view)
        name = new_name()
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise DataPlaneError(f"cannot create a shared-memory segment in {directory}: {exc.strerror}") from None
        _remember(path)
        try:
            _write_all(fd, view)  # measured: about twice as fast as mapping a fresh file and copying
            mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except OSError as exc:
            _unlink(path)
            if exc.errno in _NO_SPACE:
                raise StoreFull(f"{directory} has no room for a tensor of {nbytes} bytes ({exc.strerror}): "
                                f"raise its size (a tmpfs mount option) or lower [data_plane] store_bytes",
                                asked=nbytes, directory=directory) from None
            raise DataPlaneError(f"cannot write a shared-memory segment in {directory}: {exc.strerror}") from None
        finally:
            os.close(fd)
        return cls(name, nbytes, path, mapping)

    def unlink(self) -> None:
        """Remove the name (no new reader can open it); the mapping lives while it is used."""
        if self._map is not None:
            _unlink(self.path)
            self._map = None


def _remember(path: str) -> None:
    global _live_pid
    if _live_pid != os.getpid():  # a forked child: its parent's segments are not its own
        _live.clear()
        _live_pid = os.getpid()
    _live.add(path)


def _unlink(path: str) -> None:
    _live.discard(path)
    try:
        os.unlink(path)
    except FileNotFoundError:  # swept already
        pass
    except OSError as exc:
        log.warning("shared_memory_unlink_failed", path=path, error=exc.strerror)


@atexit.register
def _unlink_at_exit() -> None:
    if _live_pid == os.getpid():
        for path in list(_live):
            _unlink(path)


def _open(path: str, nbytes: int) -> int | None:
    """A descriptor of the segment if it is a regular file of exactly ``nbytes``, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size == nbytes:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _map(fd: int, nbytes: int) -> mmap.mmap:
    """A read-only shared mapping, its pages mapped by the first accesses (the first copy out of
    it, whose threads then take the page faults in parallel). Measured here, a first 64 MiB read:
    4.6-4.8 GB/s with ``MAP_POPULATE`` and one copying thread, 5.2-5.4 populated and two threads,
    5.5-6.0 faulted by one thread, 8.2-9.5 faulted by two. Later reads from a kept mapping find
    every page mapped either way."""
    return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)


class Mappings:
    """A consumer's reads of segments: the first read of a segment copies it with ``preadv``
    (no page tables to build; from ``MAP_FIRST_BYTES`` on through a mapping, whose page faults
    the copy's threads share), later ones copy from a mapping kept for it; the mappings kept
    are bounded in bytes (least recently used dropped first) and dropped when this process
    releases its reference (``forget``). A kept mapping is used only while the segment's name
    still exists (one ``stat``), so a tensor its owner freed is not read from a stale mapping."""

    def __init__(self, max_bytes: int, directory: str = SHM_DIR, remember: int = 1024,
                 copy: Callable[[np.ndarray, np.ndarray], None] = np.copyto) -> None:
        self.max_bytes = max_bytes
        self.directory = directory
        self._copy = copy
        """How a mapping is copied out (``copy(dst, src)``; the data plane's splits large ones across threads)."""
        self._maps: collections.OrderedDict[str, tuple[np.ndarray, str]] = collections.OrderedDict()
        """Kept mappings by segment name: (read-only view, path), least recently used first."""
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._remember = remember
        self.bytes_mapped = 0

    def __len__(self) -> int:
        return len(self._maps)

    def _path(self, name: str) -> str:
        if not NAME.fullmatch(name):  # descriptors are checked at decode; this is the last line
            raise DataPlaneError(f"not a segment name: {name!r:.80}")
        return os.path.join(self.directory, name)

    def _kept(self, name: str) -> np.ndarray | None:
        """The kept mapping of ``name`` while its name still exists (a kept name passed ``_path``
        when it was kept: the check is not redone on this path, the one a repeated pull takes).

        Lean on purpose: measured here, right after a 64 MiB copy (caches and TLB cold), each
        further Python step of a pull costs tens of microseconds (a whole pull about 190 us
        against 10 us warm), so the repeated pull's path does one lookup and one ``stat``."""
        entry = self._maps.get(name)
        if entry is None:
            return None
        view, path = entry
        try:
            os.stat(path)
        except OSError:
            self.forget(name)
            return None
        self._maps.move_to_end(name)
        return view

    def _keep(self, name: str, path: str, fd: int, nbytes: int) -> np.ndarray:
        view = np.frombuffer(_map(fd, nbytes), dtype=np.uint8)
        if nbytes <= self.max_bytes:
            self._maps[name] = (view, path)
            self.bytes_mapped += nbytes
            while self.bytes_mapped > self.max_bytes:
                self.forget(next(iter(self._maps)))
        return view

    def read(self, name: str, nbytes: int, out: Any) -> bool:
        """Copy the segment into ``out`` (contiguous, ``nbytes``); False if it cannot be read."""
        view = self._kept(name)
        if view is not None:
            self._copy(out.reshape(-1).view(np.uint8), view)
            return True
        path = self._path(name)
        fd = _open(path, nbytes)
        if fd is None:
            return False
        try:
            if nbytes >= MAP_FIRST_BYTES or (name in self._seen and nbytes <= self.max_bytes):
                self._copy(out.reshape(-1).view(np.uint8), self._keep(name, path, fd, nbytes))
                return True
            self._seen[name] = None
            if len(self._seen) > self._remember:
                self._seen.popitem(last=False)
            target = memoryview(out).cast("B")
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [target[done : done + _MAX_IO]], done)
                if got <= 0:
                    return False  # truncated under us: not ours to explain, UCX will
                done += got
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def view(self, name: str, nbytes: int) -> np.ndarray | None:
        """A read-only view of the segment's bytes (valid for as long as it is referenced, even
        after the segment is unlinked or its owner dies), or None if it cannot be mapped."""
        view = self._kept(name)
        if view is not None:
            return view
        path = self._path(name)
        fd = _open(path, nbytes)
        if fd is None:
            return None
        try:
            return self._keep(name, path, fd, nbytes)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

    def forget(self, name: str) -> None:
        """Drop the kept mapping (views handed out keep it alive until they go)."""
        self._seen.pop(name, None)
        entry = self._maps.pop(name, None)
        if entry is not None:
            self.bytes_mapped -= entry[0].nbytes

    def clear(self) -> None:
        for name in list(self._maps):
            self.forget(name)
        self._seen.clear()


def owner_pid(name: str) -> int:
    match = NAME.fullmatch(name)
    if match is None:
        raise DataPlaneError(f"not a segment name: {name!r:.80}")
    return int(match.group(1))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not: it has exited, its parent has not reaped it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def sweep_dead(directory: str = SHM_DIR) -> list[str]:
    """Unlink the segments whose owner pid is not alive (never this process's); returns their
    names. Another user's segments this process may not unlink are left (a sticky /dev/shm)."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    me = os.getpid()
    alive: dict[int, bool] = {}
    for name in names:
        match = NAME.fullmatch(name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == me:
            continue
        if pid not in alive:
            alive[pid] = pid_alive(pid)
        if alive[pid]:
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.debug("shared_memory_sweep_skipped", segment=name, error=exc.strerror)
    return removed
