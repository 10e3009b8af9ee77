"""Every relative link in README.md and docs/*.md resolves: the file exists, and its #anchor is a heading there.

Anchors follow GitHub's rule: the heading's text, lower-cased, with everything but letters,
digits, spaces, ``-`` and ``_`` removed and each space turned into ``-``. Links inside code
(fenced blocks and backticks) are not links, and web addresses are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from harness import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text without code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")  # GitHub numbers repeated headings
        seen[base] = count + 1
    return found


def links(page: Path) -> list[str]:
    return [target for target in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z]+:", target)]


def broken(page: Path) -> list[str]:
    """The relative links of ``page`` that lead nowhere, each with the reason."""
    problems = []
    for target in links(page):
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            problems.append(f"{target}: {resolved} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken(page) == []


def test_every_docs_page_links_back_to_the_readme() -> None:
    for page in PAGES[1:]:
        assert "../README.md" in links(page), page.name


def test_the_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_the_checker_sees_a_dead_link_and_a_dead_anchor(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Title\n\n## Fire-and-forget: PUSH → `[ingest] bind`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#fire-and-forget-push--ingest-bind) [ok](#here) [web](https://example.org/x)\n"
        "`[not a link](nowhere.md)`\n\n## Here\n\n[gone](missing.md) [no anchor](other.md#nope) [self](#nope)\n"
    )
    assert [problem.split(":")[0] for problem in broken(page)] == ["missing.md", "other.md#nope", "#nope"]
