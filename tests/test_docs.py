"""The documentation's relative links lead somewhere: every file they name exists, and every #anchor
into a Markdown page is one of its headings; the README stays short (issue 18: at most 300 lines)."""

import re
from pathlib import Path

import pytest
from conftest import ROOT

PAGES = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCED = re.compile(r"^```.*?^```", flags=re.DOTALL | re.MULTILINE)


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where a link is a link."""
    text = FENCED.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    text = FENCED.sub("", page.read_text())
    for line in text.splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    found |= set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    return found


def links() -> list[tuple[Path, str]]:
    return [
        (page, target)
        for page in PAGES
        for target in LINK.findall(_prose(page.read_text()))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)
    ]  # http:, https:, mailto: are not checked


def test_the_pages_exist_and_link_somewhere():
    assert all(page.exists() for page in PAGES) and len(PAGES) >= 6
    assert len(links()) > 20


def broken_links() -> list[str]:
    broken = []
    for page, target in links():
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}: ({target})"
        if not file.exists():
            broken.append(f"{where}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{where}: no heading #{anchor} in {file.relative_to(ROOT)}")
    return broken


def test_every_relative_link_points_to_a_file_and_heading():
    assert broken_links() == []


def test_the_readme_is_at_most_300_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize(
    "heading, expected",
    [
        ("How more GPUs train: `scaling`", "how-more-gpus-train-scaling"),
        ("The demo's check", "the-demos-check"),
        (
            "A learning check on real footage: `bench/learning_check.py`",
            "a-learning-check-on-real-footage-benchlearning_checkpy",
        ),
        (
            "Mining against decoding alone, on footage it was not tuned on",
            "mining-against-decoding-alone-on-footage-it-was-not-tuned-on",
        ),
    ],
)
def test_anchors_are_githubs(heading, expected):
    assert slug(heading) == expected


def test_a_broken_link_is_caught(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n[ok](#title) [gone](missing.md) [bad anchor](#nowhere) `[code](not-a-link.md)`\n"
        "```\n[fenced](also-not.md)\n```\n"
    )
    monkeypatch.setattr(__import__(__name__), "PAGES", [page])
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert [b.split(": ")[-1] for b in broken_links()] == [
        f"no file {tmp_path / 'missing.md'}",
        "no heading #nowhere in page.md",
    ]
