"""The docs' relative links point at files that exist.

`mkdocs build --strict` (in .ci/run) checks the links between pages of the site, anchors
included; it does not see README.md, CONTRIBUTING.md, CHANGELOG.md or the READMEs under bench/
and pi-pull/, whose links lead into docs/ from outside it. This test reads them all in process.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# [text](target) and [text](target "title"); images too. Reference-style links are not used.
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_EXTERNAL = ("http://", "https://", "mailto:", "file:")


def markdown_files() -> list[Path]:
    tops = [ROOT / name for name in ("README.md", "CONTRIBUTING.md", "CHANGELOG.md")]
    subs = [ROOT / "bench" / "README.md", ROOT / "pi-pull" / "README.md"]
    return [p for p in tops + subs if p.is_file()] + sorted(DOCS.rglob("*.md"))


def relative_links(text: str) -> list[str]:
    """The link targets outside fenced code blocks and inline code, external ones left out."""
    links: list[str] = []
    in_fence = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        prose = re.sub(r"`[^`]*`", "", line)
        links += [t for t in _LINK.findall(prose) if not t.startswith(_EXTERNAL) and not t.startswith("#")]
    return links


def test_the_link_reader_finds_links_and_skips_code() -> None:
    text = "See [a](docs/a.md#x) and [b](https://x.example).\n`[c](nope.md)`\n```\n[d](nope.md)\n```\n[e](b.md)\n"
    assert relative_links(text) == ["docs/a.md#x", "b.md"]


def test_the_docs_and_the_readme_have_links_to_check() -> None:
    readme_links = relative_links((ROOT / "README.md").read_text())
    assert any(link.startswith("docs/") for link in readme_links), readme_links
    assert len(list(DOCS.glob("*.md"))) >= 8


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file(path: Path) -> None:
    broken = []
    for target in relative_links(path.read_text()):
        file_part = target.split("#", 1)[0]
        resolved = (path.parent / file_part).resolve()
        if not resolved.exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files: {broken}"
