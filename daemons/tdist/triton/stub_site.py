"""The stub site: numpy<2 for the python-backend stub of nvidia-pytriton.

The stub ignores PYTHONPATH and needs numpy<2 while the main venv has numpy>=2 (ucxx): a small
site built with ``pip install --target`` is handed to the models through
``TDIST_TRITON_PYTHONPATH``, which the hello-world ``model.py`` files put first on sys.path
(harmless in a stock Triton container, where it is unset).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tdist.errors import TritonError

TRITON_PYTHONPATH_ENV = "TDIST_TRITON_PYTHONPATH"
"""The models put this variable's directories first on sys.path before importing numpy."""

STUB_SITE_ENV = "TDIST_TRITON_STUB_SITE"
"""Overrides the default stub-site directory."""

STUB_SITE_REQUIREMENTS: tuple[str, ...] = ("numpy<2",)
"""What the python-backend stub of nvidia-pytriton needs beside the interpreter's stdlib."""


def default_stub_site() -> Path:
    """``$TDIST_TRITON_STUB_SITE`` or ``<sys.prefix>/share/tdist/triton-stub-site-py3X``."""
    env = os.environ.get(STUB_SITE_ENV)
    if env:
        return Path(env)
    return Path(sys.prefix) / "share" / "tdist" / f"triton-stub-site-py{sys.version_info.major}{sys.version_info.minor}"


def _stub_site_marker(requirements: tuple[str, ...]) -> dict[str, Any]:
    return {"requirements": list(requirements), "python": f"{sys.version_info.major}.{sys.version_info.minor}"}


def stub_site_ok(path: str | os.PathLike[str], requirements: tuple[str, ...] = STUB_SITE_REQUIREMENTS) -> bool:
    marker = Path(path) / ".tdist-stub-site.json"
    try:
        return json.loads(marker.read_text()) == _stub_site_marker(requirements)
    except (OSError, ValueError):
        return False


def ensure_stub_site(
    path: str | os.PathLike[str] | None = None,
    requirements: tuple[str, ...] = STUB_SITE_REQUIREMENTS,
    *,
    timeout: float = 600.0,
) -> Path:
    """Make ``path`` (default :func:`default_stub_site`) a directory holding ``requirements``
    (``pip install --target``) for the running Python version; idempotent and safe to run from
    several processes at once. Returns the path. Raises :class:`TritonError` if pip fails."""
    site = Path(path) if path is not None else default_stub_site()
    if stub_site_ok(site, requirements):
        return site
    site.parent.mkdir(parents=True, exist_ok=True)
    with open(site.parent / f".{site.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stub_site_ok(site, requirements):
            return site
        tmp = Path(tempfile.mkdtemp(prefix=f".{site.name}-", dir=site.parent))
        try:
            cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                   "--no-warn-conflicts", "--no-input", "--target", str(tmp), *requirements]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired as exc:
                raise TritonError("pip did not finish building the stub site", path=str(site), timeout=timeout) from exc
            if done.returncode != 0:
                raise TritonError(
                    "pip could not build the stub site", path=str(site), command=" ".join(cmd),
                    output=(done.stdout + done.stderr)[-2000:],
                )
            (tmp / ".tdist-stub-site.json").write_text(json.dumps(_stub_site_marker(requirements)))
            if site.exists():
                shutil.rmtree(site)
            os.rename(tmp, site)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return site
