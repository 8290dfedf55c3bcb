"""The README and docs/ stand alone: every relative link points into the repository, at a path
that exists (and, with ``#anchor``, at a heading of that file); no link leaves the repository
through ``../`` or an absolute file path."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# [text](target) and [text](target "title"); images too. Code spans and fenced blocks are removed first.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`[^`\n]*`")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def links(text: str) -> list[str]:
    text = _CODE.sub("", _FENCE.sub("", text))
    return _LINK.findall(text) + _REF_DEF.findall(text)


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped (``-`` and ``_`` kept), spaces to ``-``;
    a repeated heading gets ``-1``, ``-2``, ..."""
    seen: dict[str, int] = {}
    out = set()
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_the_documents_exist() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {"README.md", "docs/architecture.md", "docs/operations.md", "docs/troubleshooting.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_stays_in_the_repository_and_resolves(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    found = links(text)
    assert found, f"{doc.name} has no links: the parser is broken"
    problems = []
    for target in found:
        url = urlparse(target)
        if url.scheme in ("http", "https", "mailto"):
            continue  # a web page: not a file of ours (none today; allowed)
        if url.scheme or url.netloc:
            problems.append(f"{target}: a {url.scheme or 'network'} link leaves the repository")
            continue
        path, fragment = unquote(url.path), url.fragment
        if path.startswith("/") or path.startswith("~"):
            problems.append(f"{target}: an absolute path leaves the repository")
            continue
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.is_relative_to(ROOT):
            problems.append(f"{target}: resolves to {dest}, outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{target}: {dest.relative_to(ROOT)} does not exist")
            continue
        if fragment and dest.suffix == ".md" and fragment not in anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading #{fragment} in {dest.relative_to(ROOT)}")
    assert not problems, f"{doc.relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_reference_to_files_outside_the_repository(doc: Path) -> None:
    """Also in plain text and code: the team's notes outside the repository are no reading for users."""
    text = doc.read_text(encoding="utf-8")
    for outside in ("../shared/", "DESIGN.md", "platform-facts", "/work/"):
        assert outside not in text, f"{doc.relative_to(ROOT)} mentions {outside!r}"


def test_the_checker_catches_bad_links(tmp_path: Path) -> None:
    """The parser and the slug rule on known cases, so the tests above cannot pass vacuously."""
    remote = f"https://{secrets.token_hex(6)}.example/page"  # any URL: made here, no host named in the code
    sample = ("See [a](docs/x.md#the-contract-point-by-point) and [b](../shared/DESIGN.md),\n"
              f"`[not](a-link.md)`, [c](/etc/passwd), [d]({remote}) and\n\n"
              "```\n[nor](this.md)\n```\n[ref]: ./docs/y.md\n")
    assert links(sample) == ["docs/x.md#the-contract-point-by-point", "../shared/DESIGN.md", "/etc/passwd",
                             remote, "./docs/y.md"]
    assert anchors("# `/ready` answers 503\n## The contract, point by point\n## Logs\n## Logs\n") == {
        "ready-answers-503", "the-contract-point-by-point", "logs", "logs-1"}
