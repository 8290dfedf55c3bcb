"""Finding a ``tritonserver`` binary and what it needs: the nvidia-pytriton wheel's bundled
server (its libraries and the python-backend stub for this Python), a plain Triton install
(``$TDIST_TRITON_HOME``), or the NGC container's ``/opt/tritonserver``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from tdist.errors import TritonError

TRITON_HOME_ENV = "TDIST_TRITON_HOME"
"""A Triton install with ``bin/tritonserver`` and ``backends/`` (e.g. ``/opt/tritonserver``)."""

_STUB_NAME = "triton_python_backend_stub"



@dataclass(frozen=True)
class TritonInstallation:
    """Where a ``tritonserver`` binary and what it needs are."""

    binary: Path
    backends: Path
    """The backends directory as shipped (for nvidia-pytriton: without a stub in ``python/``)."""
    lib_dirs: tuple[Path, ...] = ()
    """Added to LD_LIBRARY_PATH."""
    python_stub: Path | None = None
    """The python-backend stub to link into ``backends/python`` (None: the backends have one)."""
    source: str = "pytriton"
    """``pytriton`` (the nvidia-pytriton wheel) or ``home`` (a plain Triton install)."""


def _pytriton_installation() -> TritonInstallation | None:
    try:
        spec = importlib.util.find_spec("pytriton")  # does not import the package
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        root = Path(location) / "tritonserver"
        binary = root / "bin" / "tritonserver"
        if not binary.is_file():
            continue
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = root / "python_backend_stubs" / version / _STUB_NAME
        if not stub.is_file():
            raise TritonError(
                f"nvidia-pytriton has no python-backend stub for Python {version}", stubs=str(stub.parent.parent)
            )
        libs = Path(location).parent / "nvidia_pytriton.libs"
        return TritonInstallation(
            binary=binary,
            backends=root / "backends",
            lib_dirs=(libs,) if libs.is_dir() else (),
            python_stub=stub,
            source="pytriton",
        )
    return None


def _home_installation(home: Path) -> TritonInstallation:
    binary = home / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonError("no bin/tritonserver in the Triton home", home=str(home))
    lib = home / "lib"
    return TritonInstallation(
        binary=binary, backends=home / "backends", lib_dirs=(lib,) if lib.is_dir() else (), source="home"
    )


def find_triton(home: str | os.PathLike[str] | None = None) -> TritonInstallation:
    """``home`` (a Triton install dir), ``$TDIST_TRITON_HOME``, the ``nvidia-pytriton`` wheel, then
    ``/opt/tritonserver`` (the NGC container). Raises :class:`TritonError` if none is there."""
    if home is not None:
        return _home_installation(Path(home))
    env = os.environ.get(TRITON_HOME_ENV)
    if env:
        return _home_installation(Path(env))
    found = _pytriton_installation()
    if found is not None:
        return found
    if Path("/opt/tritonserver/bin/tritonserver").is_file():
        return _home_installation(Path("/opt/tritonserver"))
    raise TritonError(
        "tritonserver not found: install the nvidia-pytriton wheel (pip install --no-deps nvidia-pytriton) "
        f"or set {TRITON_HOME_ENV}"
    )


def libpython_dirs() -> list[Path]:
    """Directories holding the running interpreter's own ``libpython3.X.so.1.0`` (first: LIBDIR)."""
    soname = sysconfig.get_config_var("INSTSONAME") or f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    candidates = [Path(libdir), Path(libdir) / multiarch] if libdir else []
    found: list[Path] = []
    for d in candidates:
        if (d / soname).exists() and d not in found:
            found.append(d)
    return found
