"""The README and docs/ pages link to each other: every relative link must name a file of the
repository, and every anchor a heading of that file (as GitHub derives anchors from headings)."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation but hyphens dropped, spaces to hyphens."""
    found = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


def test_every_relative_link_names_a_file_and_a_heading_of_the_repository():
    broken = []
    for page in PAGES:
        for target in links(page):
            if re.match(r"[a-z]+:", target):
                broken.append(f"{page.name}: {target} points outside the repository")
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.is_file() or REPO not in dest.parents:
                broken.append(f"{page.name}: {target} names no file of the repository")
            elif anchor and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target} names no heading of {dest.name}")
    assert not broken, "\n".join(broken)


def test_the_checker_sees_links_and_headings():
    """The regular expressions above find something: an empty scan would pass any page."""
    assert "docs/training.md" in links(REPO / "README.md")
    assert "statistics-groups---bn-groups-default-4" in anchors(REPO / "docs" / "design.md")
