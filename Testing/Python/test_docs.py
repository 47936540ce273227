"""The documentation points at files that exist: every relative link and image in the READMEs and
docs/, and every repository path they quote in backticks (results, configs, scripts)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "training" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
QUOTED = re.compile(r"`((?:benchmarks|docs|training|Resources|StrokeSegExtension|Testing)/[^`\s]+)`")


def _links(doc: Path) -> list[str]:
    return [t.split("#")[0] for t in LINK.findall(doc.read_text(encoding="utf-8"))
            if not t.startswith(("http://", "https://", "mailto:", "#"))]


def _quoted(doc: Path) -> list[str]:
    # Patterns (`*`, `{a,b}`, `<name>`) name families of files, not one file.
    return [p.rstrip(".,:;") for p in QUOTED.findall(doc.read_text(encoding="utf-8")) if not re.search(r"[*{}<>]", p)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_quoted_paths_exist(doc: Path) -> None:
    missing = [t for t in _links(doc) if not (doc.parent / t).exists()]
    missing += [p for p in _quoted(doc) if not (ROOT / p).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} points at missing files: {missing}"


def test_the_checks_see_a_missing_file(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("![a](gone.png) see `benchmarks/results/gone.json` and [b](https://example.org)\n")
    assert _links(doc) == ["gone.png"] and _quoted(doc) == ["benchmarks/results/gone.json"]
