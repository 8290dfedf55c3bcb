"""The e2e hosts' Debian mirror comes from the host's apt sources (pure parsing, no network).

Every host name in the sample files is made at run time from a random token (``hosts`` fixture):
no host name, of a registry, a mirror or any other, is written in this file.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.e2e.nspawn import AptSource, apt_sources, mirror_candidates

ROLES = ("mirror", "security", "disabled", "vendor", "commented", "oneline", "src", "ignored")


@pytest.fixture
def hosts() -> dict[str, str]:
    """One fresh host name per role of the sample files, ``<random token>.example``."""
    return {role: f"{secrets.token_hex(6)}.example" for role in ROLES}


def _deb822(h: dict[str, str]) -> str:
    return f"""\
Types: deb deb-src
# a comment
URIs: http://{h["mirror"]}/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://{h["security"]}/debian-security
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://{h["disabled"]}/debian
Suites: bookworm
Components: main

Types: deb
URIs: https://{h["vendor"]}/apt
Suites: stable
Components: non-free
"""


def _one_line(h: dict[str, str]) -> str:
    return f"""\
# deb http://{h["commented"]}/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://{h["oneline"]}/debian/ bookworm main
deb-src http://{h["src"]}/debian bookworm main
"""


def _etc_apt(tmp_path: Path, h: dict[str, str]) -> Path:
    root = tmp_path / "apt"
    (root / "sources.list.d").mkdir(parents=True)
    (root / "sources.list.d" / "debian.sources").write_text(_deb822(h))
    (root / "sources.list.d" / "other.list").write_text(_one_line(h))
    (root / "sources.list.d" / "old.list.disabled").write_text(f"deb http://{h['ignored']}/debian bookworm main\n")
    return root


def test_both_formats_parsed_and_disabled_entries_skipped(tmp_path: Path, hosts: dict[str, str]) -> None:
    found = apt_sources(_etc_apt(tmp_path, hosts))
    assert found == [
        AptSource(f"http://{hosts['mirror']}/debian", ("bookworm", "bookworm-updates"), ("main", "contrib")),
        AptSource(f"http://{hosts['security']}/debian-security", ("bookworm-security",), ("main",)),
        AptSource(f"https://{hosts['vendor']}/apt", ("stable",), ("non-free",)),
        AptSource(f"http://{hosts['oneline']}/debian/", ("bookworm",), ("main",)),
    ]


def test_mirrors_with_the_suite_come_first(tmp_path: Path, hosts: dict[str, str]) -> None:
    root = _etc_apt(tmp_path, hosts)
    assert mirror_candidates("bookworm", root) == [
        f"http://{hosts['mirror']}/debian", f"http://{hosts['oneline']}/debian",
        f"http://{hosts['security']}/debian-security"]
    # Another suite: every archive with main is still a candidate (each is probed for the suite).
    assert mirror_candidates("trixie", root)[0] == f"http://{hosts['mirror']}/debian"


def test_no_sources(tmp_path: Path) -> None:
    (tmp_path / "apt").mkdir()
    assert mirror_candidates("bookworm", tmp_path / "apt") == []
