"""The e2e hosts' Debian mirror comes from the host's apt sources (pure parsing, no network)."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.nspawn import AptSource, apt_sources, mirror_candidates

DEB822 = """\
Types: deb deb-src
# a comment
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.invalid/debian-security
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://disabled.invalid/debian
Suites: bookworm
Components: main

Types: deb
URIs: https://vendor.invalid/apt
Suites: stable
Components: non-free
"""

ONE_LINE = """\
# deb http://commented.invalid/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://oneline.invalid/debian/ bookworm main
deb-src http://src.invalid/debian bookworm main
"""


def _etc_apt(tmp_path: Path) -> Path:
    root = tmp_path / "apt"
    (root / "sources.list.d").mkdir(parents=True)
    (root / "sources.list.d" / "debian.sources").write_text(DEB822)
    (root / "sources.list.d" / "other.list").write_text(ONE_LINE)
    (root / "sources.list.d" / "old.list.disabled").write_text("deb http://ignored.invalid/debian bookworm main\n")
    return root


def test_both_formats_parsed_and_disabled_entries_skipped(tmp_path: Path) -> None:
    found = apt_sources(_etc_apt(tmp_path))
    assert found == [
        AptSource("http://mirror.invalid/debian", ("bookworm", "bookworm-updates"), ("main", "contrib")),
        AptSource("http://security.invalid/debian-security", ("bookworm-security",), ("main",)),
        AptSource("https://vendor.invalid/apt", ("stable",), ("non-free",)),
        AptSource("http://oneline.invalid/debian/", ("bookworm",), ("main",)),
    ]


def test_mirrors_with_the_suite_come_first(tmp_path: Path) -> None:
    root = _etc_apt(tmp_path)
    assert mirror_candidates("bookworm", root) == [
        "http://mirror.invalid/debian", "http://oneline.invalid/debian", "http://security.invalid/debian-security"]
    # Another suite: every archive with main is still a candidate (each is probed for the suite).
    assert mirror_candidates("trixie", root)[0] == "http://mirror.invalid/debian"


def test_no_sources(tmp_path: Path) -> None:
    (tmp_path / "apt").mkdir()
    assert mirror_candidates("bookworm", tmp_path / "apt") == []
