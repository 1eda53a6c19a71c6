"""Every relative link in README.md and docs/ points at a file or folder of the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# [text](target) and ![alt](target); the target ends at whitespace or ')' (an optional "title" follows a space)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def broken_links(page: Path) -> list[str]:
    """The relative link targets of ``page`` (code blocks and code spans excluded) that resolve to nothing."""
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue                                    # http(s):, mailto: ... and anchors within the page
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    return broken


def test_every_relative_link_in_readme_and_docs_resolves():
    found = {str(page.relative_to(ROOT)): broken_links(page) for page in pages()}
    assert {page: links for page, links in found.items() if links} == {}


def test_every_docs_page_links_back_to_the_readme():
    missing = [str(page.relative_to(ROOT)) for page in pages()[1:]
               if not any((page.parent / link.split("#", 1)[0]).resolve() == ROOT / "README.md"
                          for link in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))))]
    assert missing == []


def test_the_check_finds_a_broken_link_and_ignores_code_and_urls(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("x")
    page.write_text("[ok](there.md#a) [gone](missing.md) ![img](figures/none.png) [web](https://example.org/x)\n"
                    "[anchor](#top) `[span](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n", encoding="utf-8")
    assert broken_links(page) == ["missing.md", "figures/none.png"]
