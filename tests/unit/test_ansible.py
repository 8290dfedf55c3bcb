"""ansible/ is clean for ansible-lint (default profile) and site.yml passes --syntax-check.

Both tools come with the test extra (make test installs ansible-core and ansible-lint into .venv).
ansible-lint runs offline: nothing is fetched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ANSIBLE_DIR = Path(__file__).resolve().parents[2] / "ansible"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.timeout(300)


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if not found:
            pytest.skip(f"{name} is not installed (make test installs it into .venv)")
        return found
    return str(path)


def _env(tmp_path: Path) -> dict[str, str]:
    # The tools' caches go to the test's directory; ansible-lint calls ansible-config from PATH.
    return {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "ANSIBLE_HOME": str(tmp_path / "ansible-home"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
            "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"), "NO_COLOR": "1", "ANSIBLE_NOCOLOR": "1"}


def test_syntax_check(tmp_path: Path) -> None:
    proc = subprocess.run([_tool("ansible-playbook"), "--syntax-check", "-i", "inventories/example", "site.yml"],
                          cwd=ANSIBLE_DIR, capture_output=True, text=True, env=_env(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "playbook: site.yml" in proc.stdout


def test_ansible_lint(tmp_path: Path) -> None:
    proc = subprocess.run([_tool("ansible-lint"), "--offline", "--nocolor"], cwd=ANSIBLE_DIR,
                          capture_output=True, text=True, env=_env(tmp_path), timeout=280)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Passed: 0 failure(s), 0 warning(s)" in out, out


def test_ansible_lint_catches_a_violation(tmp_path: Path) -> None:
    """The lint test can fail: a copy of the tree with a short module name is rejected."""
    copy = tmp_path / "ansible"
    shutil.copytree(ANSIBLE_DIR, copy, symlinks=True, ignore=shutil.ignore_patterns("credentials"))
    tasks = copy / "roles/nats_server/tasks/verify.yml"
    tasks.write_text(tasks.read_text() + "\n- name: Not fully qualified\n  debug:\n    msg: hi\n")
    # The unit files are symlinks into systemd/ beside ansible/: keep them resolvable.
    (tmp_path / "systemd").symlink_to(ANSIBLE_DIR.parent / "systemd")
    proc = subprocess.run([_tool("ansible-lint"), "--offline", "--nocolor"], cwd=copy,
                          capture_output=True, text=True, env=_env(tmp_path), timeout=280)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "fqcn[action-core]" in out, out
