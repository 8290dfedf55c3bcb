"""A Triton Inference Server process beside the caller.

On this platform the in-process ``tritonserver`` API cannot run (it needs CPython 3.12 and the NGC
container's libraries), so a worker runs the ``tritonserver`` binary bundled in the PyPI package
``nvidia-pytriton`` as its child process and talks to it over HTTP/gRPC on 127.0.0.1
(measured on Debian 12 with nvidia-pytriton 0.7.0). This module hides the traps:

* the binary's libraries live in ``site-packages/nvidia_pytriton.libs`` (LD_LIBRARY_PATH);
* the python backend's stub for the running Python version must sit in the backend's directory,
  so the backends are laid out in a scratch directory with the right stub linked in;
* the stub links ``libpython3.X.so.1.0``: LD_LIBRARY_PATH must name the running interpreter's
  own LIBDIR (else it may load another patch release of libpython and crash at start);
* the stub ignores PYTHONPATH and needs numpy<2 while the main venv has numpy>=2 (ucxx): a small
  "stub site" holding numpy<2 (``ensure_stub_site``) is handed to the models through
  ``TDIST_TRITON_PYTHONPATH``, which the hello-world ``model.py`` files put first on sys.path;
* the python backend's shared-memory regions are named with a prefix unique to each server
  start, so that two servers never collide and the regions (and any stub left behind) of a
  killed server can be cleaned up.

The child dies with its parent even on SIGKILL of the parent, is ready only when
``/v2/health/ready`` answers 200 (no fixed sleeps), runs in ``--model-control-mode=explicit`` with
metrics off, and stops with SIGTERM, then SIGKILL, by PID.

**Starting the process without forking a gRPC-threaded parent.** A worker has live gRPC threads
(tritonclient's aio channels). Measured once on a busy machine: a start with
``Popen(preexec_fn=...)`` logged "Other threads are currently calling into gRPC, skipping fork()
handlers" and the child died with SIGABRT (``epoll_wait error: Bad file descriptor``); here, with a
``preexec_fn`` put back and two threads in gRPC calls, a start hung for good (the test
``test_start_forks_no_handlers_beside_live_grpc_threads`` timed out at 240 s). What CPython
3.11.7 does (``Lib/subprocess.py`` ``_execute_child`` and ``Modules/_posixsubprocess.c``, checked
with ``strace -f -e trace=fork,vfork,clone,clone3``):

* ``posix_spawn`` is used only without ``close_fds`` (default True), ``cwd``, ``pass_fds``,
  ``start_new_session`` and ``process_group``: not our case;
* every other call goes through ``_posixsubprocess.fork_exec``, which uses ``vfork()`` unless
  ``preexec_fn``, ``user``, ``group`` or ``extra_groups`` is given (or ``subprocess._USE_VFORK`` is
  False). ``start_new_session``, ``process_group``, ``cwd``, ``close_fds`` and ``pass_fds`` keep
  vfork: strace shows ``vfork()`` for them and a plain ``clone(SIGCHLD)`` (= fork) with
  ``preexec_fn``;
* with vfork no ``pthread_atfork`` handler runs (so not gRPC's) and ``PyOS_BeforeFork`` /
  ``os.register_at_fork`` hooks are not called: the child runs only async-signal-safe C
  (dup2, close, chdir, setsid) and then ``execve``. With ``preexec_fn`` CPython calls
  ``PyOS_BeforeFork``, forks, runs gRPC's fork handlers and Python code in the child: the trap.
  Even a plain ``fork()`` with no Python code would still run gRPC's atfork handlers, so vfork
  (no ``preexec_fn``) is the point, not merely "no Python after fork".

So the server starts with no ``preexec_fn`` and parent death is handled another way
(``TritonServerOptions.parent_death``):

* ``setpriv`` (util-linux >= 2.33; Debian 12 has 2.38): ``setpriv --pdeathsig KILL -- /bin/sh -c
  <check> ...`` sets ``PR_SET_PDEATHSIG`` in the child without Python code, then a two-line shell
  checks that its parent is still the worker (closing the race where the worker dies before the
  prctl) and execs ``tritonserver``: the PID stays the same through the exec chain.
  PR_SET_PDEATHSIG fires when the *thread* that started the child exits: call
  ``start()``/``astart()`` from a thread that lives as long as the server (the main thread, or the
  event loop's thread); ``astart()`` starts the process in the loop's thread for that reason;
* ``watchdog`` (used when setpriv is absent): a small ``python -I -S`` process holds the read end of
  a pipe whose only write end is in the worker; when the worker dies (any signal) it reads EOF and
  SIGKILLs Triton (by pidfd, then its process group); it exits by itself when Triton exits.

**The control API needs a key.** Triton listens on 127.0.0.1 in explicit model-control mode, so
without more any local user could load a python-backend model (code execution as the service user)
or register shared memory. Each start makes a random key (``secrets.token_urlsafe(32)``) and starts
Triton with ``--http-restricted-api`` and ``--grpc-restricted-protocol`` for ``model-repository``
and ``shared-memory``: those calls need the header ``tdist-triton-key: <key>``
(:attr:`TritonServer.control_headers`; over gRPC the metadata key is
``triton-grpc-protocol-tdist-triton-key``, :attr:`TritonServer.grpc_control_headers`); health,
metadata and inference do not. Triton 2.51 takes the key only on its command line
(``tritonserver --help``: no options file, no environment form), and
``/proc/<pid>/cmdline`` is readable by every local user unless /proc is mounted with ``hidepid``.
So once the server is ready (it parsed its options long before) the worker overwrites the key in
the child's argv memory through ``/proc/<pid>/mem`` (allowed for the parent: same user, and Yama
ptrace_scope 1 allows a parent); :attr:`TritonServer.key_hidden` says whether that worked.
**Residual risk**: between exec and readiness a local user polling /proc can read the key (measured
here: 0.11 to 0.14 s from spawn to wiped, idle machine; no model loads at start in explicit mode,
longer on a loaded machine); a new key is made at every start. Mount /proc with ``hidepid=invisible``
(or run Triton in a container / user namespace) to close that window. The key is never logged and
never in an error's details.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tdist.errors import TritonError, TritonModelNotReady
from tdist.process import free_port, port_free
from tdist.triton.install import _STUB_NAME, TritonInstallation, find_triton, libpython_dirs
from tdist.triton.model_config import merge_config, normalize_overrides, read_model_config
from tdist.triton.processes import (
    _PARENT_CHECK,
    _WATCHDOG,
    _scrub_argv,
    _stub_pids,
    cleanup_stale,
    setpriv_with_pdeathsig,
)
from tdist.triton.stub_site import TRITON_PYTHONPATH_ENV, default_stub_site, ensure_stub_site, stub_site_ok

CONTROL_HEADER = "tdist-triton-key"
"""HTTP header / gRPC metadata key the model-repository and shared-memory APIs require (lower case:
gRPC metadata keys must be)."""

GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
"""Triton's gRPC frontend expects a restricted-protocol key as metadata ``triton-grpc-protocol-<key>``
(Triton 2.51 answers a call without it: "This protocol is restricted, expecting header
'triton-grpc-protocol-tdist-triton-key'"); HTTP takes the key as given."""

RESTRICTED_APIS: tuple[str, ...] = ("model-repository", "shared-memory")
"""Triton APIs that need :data:`CONTROL_HEADER` (``--http-restricted-api``, ``--grpc-restricted-protocol``)."""

TRITON_LOG_ENV = "TDIST_TRITON_LOG_FILE"
"""Where a server writes its (plain-text) log when no ``log_file`` is given: a worker sets it to
``<its log>.triton.out`` so that the log outlives the server and sits in the log dir."""

PARENT_DEATH_MODES: tuple[str, ...] = ("auto", "setpriv", "watchdog")


@dataclass(frozen=True)
class TritonServerOptions:
    model_repository: str
    host: str = "127.0.0.1"
    http_port: int = 0
    """0 picks a free port."""
    grpc_port: int = 0
    """0 picks a free port."""
    log_file: str | None = None
    """Triton's stdout and stderr; a file in the server's scratch directory when None."""
    log_verbose: int = 0
    stub_site: str | None = None
    """Directory handed to the models as TDIST_TRITON_PYTHONPATH. None: the default stub site when
    the binary comes from nvidia-pytriton (built on first start), nothing otherwise. "": none."""
    exit_timeout: int = 5
    """Seconds Triton waits for in-flight requests after SIGTERM (``--exit-timeout-secs``)."""
    python_shm_default_byte_size: int = 4 << 20
    python_shm_growth_byte_size: int = 4 << 20
    cuda_memory: bool | None = None
    """Pinned and CUDA memory pools; None: only when an NVIDIA device node exists."""
    triton_home: str | None = None
    """A plain Triton install instead of the nvidia-pytriton wheel (see :func:`find_triton`)."""
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment variables for the server and its model stubs."""
    parent_death: str = "auto"
    """How the server dies with its parent: ``setpriv`` (PR_SET_PDEATHSIG via util-linux setpriv),
    ``watchdog`` (a pipe-watching helper process) or ``auto`` (setpriv when it is installed)."""

    def __post_init__(self) -> None:
        if self.parent_death not in PARENT_DEATH_MODES:
            raise TritonError(
                f"parent_death must be one of {', '.join(PARENT_DEATH_MODES)}, not {self.parent_death!r}",
                key="parent_death",
            )


def grpc_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """HTTP-form control headers as the metadata Triton's gRPC frontend checks."""
    return {k if k.startswith(GRPC_HEADER_PREFIX) else GRPC_HEADER_PREFIX + k: v for k, v in headers.items()}


def _connect_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


_BIND_FAILURES = ("already in use", "Failed to listen", "failed to start HTTP", "failed to start GRPC", "Address in use")


class TritonServer:
    """One ``tritonserver`` child process. ``start()``/``astart()``, ``load_model()``/``aload_model()``,
    ``stop()``/``astop()`` (idempotent), ``is_alive()``, ``crashed``, ``wait_exit()``, ``restart()``."""

    def __init__(self, options: TritonServerOptions | None = None, **kwargs: Any) -> None:
        if options is None:
            options = TritonServerOptions(**kwargs)
        elif kwargs:
            raise TypeError("give either options or keyword arguments")
        self.options = options
        self.installation: TritonInstallation | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log_path: Path | None = None
        self._prefix = ""
        self._stopping = False
        self._starts = 0
        self.http_port = options.http_port
        self.grpc_port = options.grpc_port
        self._models: dict[str, dict[str, Any] | None] = {}
        """Models loaded through this object, with their overrides: reloaded by ``restart()``."""
        self._control_key = ""
        """Secret of the current start: Triton wants it in :data:`CONTROL_HEADER` for control calls."""
        self._key_hidden = False
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_fd = -1
        """The write end of the watchdog's pipe (parent_death="watchdog"); closing it kills Triton."""

    # ---- state

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def http_address(self) -> str:
        """``host:port`` of the HTTP endpoint (tritonclient's URL form)."""
        return f"{_connect_host(self.options.host)}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        """``host:port`` of the gRPC endpoint (tritonclient's URL form)."""
        return f"{_connect_host(self.options.host)}:{self.grpc_port}"

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def control_headers(self) -> dict[str, str]:
        """The header the current start's model-repository and shared-memory APIs need ({} before
        the first start). A secret: send it to this server only, never log it."""
        return {CONTROL_HEADER: self._control_key} if self._control_key else {}

    @property
    def grpc_control_headers(self) -> dict[str, str]:
        """:attr:`control_headers` as gRPC metadata (Triton wants the key prefixed, see :data:`GRPC_HEADER_PREFIX`)."""
        return grpc_headers(self.control_headers)

    @property
    def key_hidden(self) -> bool:
        """Whether the control key was wiped from the running server's /proc/<pid>/cmdline."""
        return self._key_hidden

    @property
    def parent_death(self) -> str:
        """The guard in use: ``setpriv`` or ``watchdog`` (``auto`` resolved)."""
        mode = self.options.parent_death
        if mode == "auto":
            return "setpriv" if setpriv_with_pdeathsig() else "watchdog"
        return mode

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def crashed(self) -> bool:
        """The process exited without ``stop()`` being asked (killed, crashed)."""
        return self._proc is not None and not self._stopping and self._proc.poll() is not None

    def check(self) -> None:
        """Raise :class:`TritonError` if the server crashed (or was never started)."""
        if self._proc is None:
            raise TritonError("the Triton server is not running")
        if self.crashed:
            raise TritonError(
                "the Triton server exited", pid=self._proc.pid, returncode=self._proc.returncode, log=self.log_tail()
            )

    def log_tail(self, chars: int = 2000) -> str:
        if self._log_path is None:
            return ""
        try:
            with open(self._log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - chars))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    @property
    def loaded_models(self) -> dict[str, dict[str, Any] | None]:
        return dict(self._models)

    async def wait_exit(self) -> int:
        """Resolves with the return code when the process exits (a pidfd on Linux, else polling)."""
        proc = self._proc
        if proc is None:
            raise TritonError("the Triton server is not running")
        if proc.poll() is not None:
            return int(proc.returncode)
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            fd = -1
        if fd >= 0:
            exited = loop.create_future()
            loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
            try:
                if proc.poll() is None:
                    await exited
            finally:
                loop.remove_reader(fd)
                os.close(fd)
        while proc.poll() is None:
            await asyncio.sleep(0.05)
        return int(proc.returncode)

    # ---- start

    def start(self, timeout: float = 120.0) -> TritonServer:
        """Start and wait until ``/v2/health/ready`` answers 200; raise :class:`TritonError` otherwise."""
        if self.is_alive():
            return self
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            self._launch(fresh_ports=attempt > 0)
            try:
                while True:
                    if self._poll_ready():
                        self._hide_key()
                        return self
                    if time.monotonic() > deadline:
                        raise TritonError("the Triton server was not ready in time", timeout=timeout, log=self.log_tail())
                    time.sleep(0.05)
            except _BindFailed as failed:
                self._cleanup()
                if attempt == 2:
                    raise TritonError("the Triton server could not bind its ports", log=failed.log) from None
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    async def astart(self, timeout: float = 120.0) -> TritonServer:
        """``start()`` for asyncio: the process starts in the loop's thread, readiness is polled without blocking."""
        if self.is_alive():
            return self
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            if self._needs_stub_site_build():
                await asyncio.to_thread(ensure_stub_site, self._stub_site())
            self._launch(fresh_ports=attempt > 0)
            try:
                while True:
                    if await asyncio.to_thread(self._poll_ready):
                        self._hide_key()
                        return self
                    if time.monotonic() > deadline:
                        raise TritonError("the Triton server was not ready in time", timeout=timeout, log=self.log_tail())
                    await asyncio.sleep(0.05)
            except _BindFailed as failed:
                self._cleanup()
                if attempt == 2:
                    raise TritonError("the Triton server could not bind its ports", log=failed.log) from None
            except BaseException:
                await asyncio.to_thread(self.stop)
                raise
        raise AssertionError("unreachable")

    def _stub_site(self) -> str | None:
        o = self.options
        if o.stub_site is not None:
            return o.stub_site or None
        assert self.installation is not None
        if self.installation.source != "pytriton":
            return None
        return str(default_stub_site())

    def _needs_stub_site_build(self) -> bool:
        if self.installation is None:
            self.installation = find_triton(self.options.triton_home)
        site = self._stub_site()
        return site is not None and self.options.stub_site is None and not stub_site_ok(site)

    def _prepare_backends(self, workdir: Path) -> Path:
        inst = self.installation
        assert inst is not None
        if inst.python_stub is None:
            return inst.backends
        backends = workdir / "backends"
        for src in inst.backends.iterdir():
            if not src.is_dir():
                continue
            dst = backends / src.name
            dst.mkdir(parents=True)
            for f in src.iterdir():
                if f.is_file():
                    (dst / f.name).symlink_to(f)
        python = backends / "python"
        python.mkdir(parents=True, exist_ok=True)
        stub = python / _STUB_NAME
        if stub.is_symlink() or stub.exists():
            stub.unlink()
        stub.symlink_to(inst.python_stub)
        return backends

    def _environment(self, stub_site: str | None) -> dict[str, str]:
        inst = self.installation
        assert inst is not None
        env = dict(os.environ)
        env.update(self.options.env)
        dirs = [str(d) for d in inst.lib_dirs]
        if inst.python_stub is not None:
            found = libpython_dirs()
            if not found:
                soname = sysconfig.get_config_var("INSTSONAME") or "libpython3.X.so.1.0"
                raise TritonError(
                    f"the python-backend stub needs this interpreter's {soname}, which is not in its LIBDIR: "
                    "use a Python built with --enable-shared (on Debian: apt-get install libpython3.11)",
                    libdir=sysconfig.get_config_var("LIBDIR"),
                )
            dirs += [str(d) for d in found]
        if env.get("LD_LIBRARY_PATH"):
            dirs.append(env["LD_LIBRARY_PATH"])
        if dirs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(dirs)
        if stub_site:
            env[TRITON_PYTHONPATH_ENV] = stub_site
        else:
            env.pop(TRITON_PYTHONPATH_ENV, None)
        return env

    def _command(self, backends: Path) -> list[str]:
        o = self.options
        inst = self.installation
        assert inst is not None
        cuda = o.cuda_memory if o.cuda_memory is not None else os.path.exists("/dev/nvidiactl")
        cmd = [
            str(inst.binary),
            f"--model-repository={Path(o.model_repository).resolve()}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            f"--http-address={o.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={o.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--strict-readiness=true",
            f"--exit-timeout-secs={int(o.exit_timeout)}",
            f"--log-verbose={int(o.log_verbose)}",
            f"--backend-config=python,shm-region-prefix-name={self._prefix}",
            f"--backend-config=python,shm-default-byte-size={int(o.python_shm_default_byte_size)}",
            f"--backend-config=python,shm-growth-byte-size={int(o.python_shm_growth_byte_size)}",
        ]
        restricted = f"{','.join(RESTRICTED_APIS)}:{CONTROL_HEADER}={self._control_key}"
        cmd += [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
        if not cuda:
            cmd += ["--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0"]
        cmd += list(o.extra_args)
        return cmd

    def _launch(self, fresh_ports: bool = False) -> None:
        o = self.options
        if self.installation is None:
            self.installation = find_triton(o.triton_home)
        if not Path(o.model_repository).is_dir():
            raise TritonError("the model repository is not a directory", model_repository=o.model_repository)
        stub_site = self._stub_site()
        if stub_site is not None and o.stub_site is None:
            ensure_stub_site(stub_site)
        self._cleanup()
        self._stopping = False
        self._starts += 1
        cleanup_stale()
        self._workdir = Path(tempfile.mkdtemp(prefix=f"tdist-triton-{os.getpid()}-"))
        # Unique per start: names the python backend's /dev/shm regions and its stubs' command lines.
        self._prefix = f"tdist_triton_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        # Free ports when asked for 0; a restart keeps the previous ones if they are still free.
        if not o.http_port:
            keep = not fresh_ports and port_free(o.host, self.http_port)
            self.http_port = self.http_port if keep else free_port(o.host)
        if not o.grpc_port:
            keep = not fresh_ports and port_free(o.host, self.grpc_port)
            self.grpc_port = self.grpc_port if keep else 0
            while not self.grpc_port or self.grpc_port == self.http_port:
                self.grpc_port = free_port(o.host)
        self._control_key = secrets.token_urlsafe(32)
        self._key_hidden = False
        try:
            backends = self._prepare_backends(self._workdir)
            env = self._environment(stub_site)
            log_file = o.log_file or os.environ.get(TRITON_LOG_ENV)
            self._log_path = Path(log_file) if log_file else self._workdir / "triton.log"
            guard = self.parent_death
            with open(self._log_path, "ab") as log:
                self._spawn(self._command(backends), env, log, guard)
        except BaseException:
            if self._proc is not None and self._proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
            self._close_watchdog()
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            raise

    def _spawn(self, command: list[str], env: dict[str, str], log: Any, guard: str) -> None:
        """Start Triton with no ``preexec_fn`` (vfork + exec, see the module docstring) and its
        parent-death guard. ``start_new_session``: a Ctrl-C in the terminal reaches the parent
        only, which stops Triton; the session's process group holds Triton and its stubs."""
        assert self._workdir is not None
        if guard == "setpriv":
            setpriv = setpriv_with_pdeathsig()
            if setpriv is None:
                raise TritonError("parent_death='setpriv' needs util-linux setpriv with --pdeathsig on PATH")
            argv = [setpriv, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", _PARENT_CHECK, "tdist-triton",
                    str(os.getpid()), *command]
        else:
            argv = command
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=str(self._workdir), start_new_session=True,
        )
        if guard == "watchdog":
            read_fd, write_fd = os.pipe()  # both ends close-on-exec: only the watchdog gets read_fd
            try:
                self._watchdog = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(read_fd), str(self._proc.pid)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, pass_fds=(read_fd,),
                    start_new_session=True,
                )
            except BaseException:
                os.close(write_fd)
                raise
            finally:
                os.close(read_fd)
            self._watchdog_fd = write_fd

    def _close_watchdog(self) -> None:
        """After Triton exited: release the watchdog (it exits on Triton's exit or on EOF) and reap it."""
        if self._watchdog_fd >= 0:
            os.close(self._watchdog_fd)
            self._watchdog_fd = -1
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            try:
                watchdog.wait(10)
            except subprocess.TimeoutExpired:
                watchdog.kill()
                watchdog.wait()

    def _hide_key(self) -> None:
        """Wipe the control key from the ready server's argv (see the module docstring)."""
        if self._proc is not None and self._control_key:
            self._key_hidden = _scrub_argv(self._proc.pid, self._control_key)

    def _poll_ready(self) -> bool:
        """One readiness probe; raises :class:`TritonError` (or _BindFailed) if the process exited."""
        proc = self._proc
        if proc is None:
            raise TritonError("the Triton server is not running")
        if proc.poll() is not None:
            tail = self.log_tail(4000)
            if (not self.options.http_port or not self.options.grpc_port) and any(s in tail for s in _BIND_FAILURES):
                raise _BindFailed(tail[-2000:])
            raise TritonError("the Triton server exited while starting", returncode=proc.returncode, log=tail[-2000:])
        try:
            status, _ = self._http("GET", "/v2/health/ready", timeout=2.0)
        except OSError:
            return False
        return status == 200

    # ---- HTTP control calls (http.client: no proxy settings apply to 127.0.0.1 calls)

    def _http(self, method: str, path: str, body: Any = None, timeout: float = 30.0,
              headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(_connect_host(self.options.host), self.http_port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            sent = dict(headers or {})
            if data is not None:
                sent["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=sent)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _control(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> bytes:
        self.check()
        try:
            status, data = self._http(method, path, body, timeout, self.control_headers)
        except OSError as exc:
            if not self.is_alive():
                self.check()
            raise TritonError(f"the Triton server did not answer {method} {path}: {exc}", reason="unavailable") from exc
        if status != 200:
            try:
                message = json.loads(data).get("error", "")
            except ValueError:
                message = data.decode(errors="replace")
            raise TritonError(f"{method} {path} failed: {message}", status=status)
        return data

    # ---- models

    def model_config_for(self, name: str, overrides: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """The full configuration sent with a load: config.pbtxt merged with ``overrides`` (None: none)."""
        if not overrides:
            return None
        return merge_config(read_model_config(self.options.model_repository, name), normalize_overrides(overrides))

    def load_model(self, name: str, overrides: Mapping[str, Any] | None = None, timeout: float = 300.0) -> None:
        """Load (or reload) ``name`` from the repository. ``overrides`` is merged into its
        config.pbtxt, e.g. ``{"instance_group": [{"count": 2, "kind": "KIND_CPU"}],
        "parameters": {"delay": "0.001", "input_copies": "3"}}``. Raises :class:`TritonError`."""
        config = self.model_config_for(name, overrides)
        body = {"parameters": {"config": json.dumps(config)}} if config is not None else None
        try:
            self._control("POST", f"/v2/repository/models/{name}/load", body or {}, timeout=timeout)
        except TritonError as exc:
            raise TritonError(f"loading model '{name}' failed: {exc.message}", model=name, **exc.details) from None
        self._models[name] = dict(overrides) if overrides else None

    def unload_model(self, name: str, timeout: float = 60.0) -> None:
        self._models.pop(name, None)
        self._control("POST", f"/v2/repository/models/{name}/unload", {}, timeout=timeout)

    def model_ready(self, name: str) -> bool:
        if not self.is_alive():
            return False
        try:
            status, _ = self._http("GET", f"/v2/models/{name}/ready", timeout=5.0)
        except OSError:
            return False
        return status == 200

    def model_config(self, name: str) -> dict[str, Any]:
        """The configuration the server runs ``name`` with."""
        try:
            return dict(json.loads(self._control("GET", f"/v2/models/{name}/config")))
        except TritonError as exc:
            if exc.details.get("status") in (400, 404):
                raise TritonModelNotReady(f"model '{name}' is not loaded", model=name) from None
            raise

    def repository_index(self) -> list[dict[str, Any]]:
        return list(json.loads(self._control("POST", "/v2/repository/index", {})))

    async def aload_model(self, name: str, overrides: Mapping[str, Any] | None = None, timeout: float = 300.0) -> None:
        await asyncio.to_thread(self.load_model, name, overrides, timeout)

    async def aunload_model(self, name: str, timeout: float = 60.0) -> None:
        await asyncio.to_thread(self.unload_model, name, timeout)

    # ---- stop and restart

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` (default: exit_timeout + 5 s), by PID; then
        remove the stubs and shared memory a killed server left. Idempotent; returns the exit code."""
        proc = self._proc
        self._stopping = True
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout if timeout is not None else self.options.exit_timeout + 5.0)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
            code = proc.returncode
        self._cleanup()
        self._proc = None
        return code

    async def astop(self, timeout: float | None = None) -> int | None:
        return await asyncio.to_thread(self.stop, timeout)

    def restart(self, timeout: float = 120.0) -> TritonServer:
        """Stop (if needed), start again on the same ports when possible, and reload the models
        loaded through this object with their overrides."""
        models = dict(self._models)
        self.stop()
        self.start(timeout)
        for name, overrides in models.items():
            self.load_model(name, overrides)
        return self

    async def arestart(self, timeout: float = 120.0) -> TritonServer:
        models = dict(self._models)
        await self.astop()
        await self.astart(timeout)
        for name, overrides in models.items():
            await self.aload_model(name, overrides)
        return self

    def _cleanup(self) -> None:
        """After the process is gone: kill stubs it left, unlink its shared memory, remove its scratch
        dir (with the log, when no log_file was given: a crashed server's log stays readable until
        the next ``start()`` or ``stop()``)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self._close_watchdog()
        if self._prefix:
            for pid in _stub_pids(self._prefix):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                for entry in os.listdir("/dev/shm"):
                    if entry.startswith(self._prefix):
                        with contextlib.suppress(OSError):
                            os.unlink(os.path.join("/dev/shm", entry))
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # ---- context managers

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> TritonServer:
        return await self.astart()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.astop()


class _BindFailed(Exception):
    def __init__(self, log: str) -> None:
        super().__init__("bind failed")
        self.log = log


__all__ = [
    "CONTROL_HEADER",
    "GRPC_HEADER_PREFIX",
    "RESTRICTED_APIS",
    "TritonServer",
    "TritonServerOptions",
    "grpc_headers",
]
