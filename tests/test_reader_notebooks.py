"""The notebooks learners open (notebooks/), read the way Colab, JupyterLab and VS Code show them.

Each is rendered with nbconvert's HTML exporter, a standard notebook renderer that
shows Markdown and outputs as those front ends do (and, like them, knows nothing of
MyST). The tests fail on:

- a notebook that is stale (its chapter changed and `make notebooks` was not run);
- any MyST role, directive, label or glue placeholder left in the text;
- a figure of the site's page missing from the notebook (each figure's alt text is
  its SVG's title);
- an exercise whose solution is not folded in a <details> element;
- a code cell that was never executed.
"""

from __future__ import annotations

import base64
import html
import re
import sys
from pathlib import Path

import nbformat
import pytest
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import reader_notebooks  # noqa: E402

pytestmark = pytest.mark.book

CHAPTERS = reader_notebooks.chapters()
MYST = [
    (re.compile(r"\{[\w:-]+\}`"), "a MyST role"),
    (re.compile(r"(`{3,}|:{3,})\{[\w:-]+\}"), "a MyST directive"),
    (re.compile(r"^\s*\([\w-]+\)=\s*$", re.M), "a MyST label"),
    (re.compile(r"^:{3,}", re.M), "a colon fence"),
    (re.compile(r"^\s*:(?:label|class|name|alt):", re.M), "a directive option"),
    (re.compile(r"\{glue"), "a glue placeholder"),
]


def _id(path: Path) -> str:
    return path.name


@pytest.fixture(scope="module")
def book():
    return reader_notebooks.Book.load()


@pytest.fixture(scope="module")
def rendered():
    """name -> (reader notebook, its HTML as nbconvert renders it)."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab")
    pages = {}
    for chapter in CHAPTERS:
        nb = nbformat.read(reader_notebooks.OUT / chapter.name, as_version=4)
        body, _ = exporter.from_notebook_node(nb)
        pages[chapter.name] = (nb, body)
    return pages


def test_every_chapter_has_a_reader_notebook():
    assert CHAPTERS, "no chapters in _toc.yml"
    missing = [c.name for c in CHAPTERS if not (reader_notebooks.OUT / c.name).is_file()]
    assert not missing, f"notebooks/ lacks {missing}: run `make notebooks`"
    extra = {p.name for p in reader_notebooks.OUT.glob("*.ipynb")} - {c.name for c in CHAPTERS}
    assert not extra, f"notebooks/ holds notebooks of no chapter: {sorted(extra)}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=_id)
def test_reader_notebook_is_current(chapter, book):
    expected = reader_notebooks.render(reader_notebooks.convert(chapter, book))
    stored = (reader_notebooks.OUT / chapter.name).read_text(encoding="utf-8")
    assert stored == expected, (
        f"notebooks/{chapter.name} is stale: regenerate it with `make notebooks NB={chapter.relative_to(ROOT)}` "
        "(or `.venv/bin/python tools/reader_notebooks.py`)"
    )


def _text_cells(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "markdown"]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=_id)
def test_no_myst_syntax_in_the_text(chapter, rendered):
    nb, body = rendered[chapter.name]
    soup = BeautifulSoup(body, "html.parser")
    for tag in soup.select(".jp-CodeCell, .jp-InputArea-editor, pre, code, script, style"):
        tag.decompose()
    text = soup.get_text("\n")
    for source in _text_cells(nb) + [text]:
        for pattern, what in MYST:
            match = pattern.search(source)
            assert match is None, f"{chapter.name} shows {what} as text: ...{source[max(0, match.start() - 60):match.end() + 60]}..."


def _site_figures(chapter: Path) -> list[tuple[str, str]]:
    """(name, alt) of every figure the site's page places, from the chapter's source."""
    found = []
    for text in reader_notebooks._source_text(chapter.relative_to(ROOT).with_suffix("").as_posix()):
        for name, arg, options, _ in reader_notebooks._directives(text):
            if name == "glue:figure":
                found.append((arg, options.get("alt", "")))
    return found


@pytest.mark.parametrize("chapter", CHAPTERS, ids=_id)
def test_every_figure_of_the_page_is_in_the_notebook(chapter, rendered):
    _, body = rendered[chapter.name]
    soup = BeautifulSoup(body, "html.parser")
    shown = {t.get_text() for t in soup.select("svg > title")} | {i.get("alt", "") for i in soup.find_all("img")}
    for img in soup.find_all("img"):  # nbconvert shows an SVG output as a data URI: its title names it
        src = img.get("src", "")
        if src.startswith("data:image/svg+xml;base64,"):
            svg = base64.b64decode(src.split(",", 1)[1]).decode("utf-8")
            shown |= {html.unescape(t) for t in re.findall(r"<title>(.*?)</title>", svg, flags=re.S)}
    figures = _site_figures(chapter)
    missing = [name for name, alt in figures if alt not in shown]
    assert not missing, f"{chapter.name}: figures of the site's page missing from the notebook: {missing}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=_id)
def test_every_figure_has_its_alt_text(chapter, rendered):
    """nbconvert, like JupyterLab, shows an image output with no alt text; the figures carry theirs."""
    _, body = rendered[chapter.name]
    soup = BeautifulSoup(body, "html.parser")
    alts = [img.get("alt", "") for img in soup.find_all("img")]
    assert "No description has been provided for this image" not in alts, f"{chapter.name}: an image without alt text"
    for name, alt in _site_figures(chapter):
        assert alt in alts, f"{chapter.name}: figure {name} is not an image with its alt text"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=_id)
def test_every_solution_is_folded(chapter, rendered):
    nb, body = rendered[chapter.name]
    source = "\n".join(reader_notebooks._source_text(chapter.relative_to(ROOT).with_suffix("").as_posix()))
    solutions = re.findall(r"\{solution-start\}\s*([\w-]+)", source)
    exercises = re.findall(r"\{exercise\}", source)
    assert len(solutions) == len(exercises) >= 3, (
        f"{chapter.name}: {len(exercises)} exercises and {len(solutions)} solutions (every chapter ends with "
        "at least three exercises, each with a folded solution)"
    )
    soup = BeautifulSoup(body, "html.parser")
    folded = [d for d in soup.find_all("details") if d.summary and d.summary.get_text().startswith("Solution")]
    assert len(folded) == len(solutions), f"{chapter.name}: {len(folded)} folded solutions for {len(solutions)}"
    for details in folded:
        assert details.get_text(strip=True) != details.summary.get_text(strip=True), "an empty solution"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=_id)
def test_every_code_cell_was_executed(chapter, rendered):
    nb, _ = rendered[chapter.name]
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert cells, f"{chapter.name} has no code cells"
    never = [c.source[:80] for c in cells if c.execution_count is None]
    assert not never, f"{chapter.name}: code cells never executed: {never}"
    assert cells[0].source.startswith(reader_notebooks.INSTALL_MARKER), "the first code cell installs what is missing"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=_id)
def test_explorers_are_drawn_in_advance(chapter, rendered):
    """A stored widget view is blank without its kernel: the notebook keeps the explorer drawn in advance."""
    nb, _ = rendered[chapter.name]
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            assert reader_notebooks.WIDGET_VIEW not in data, f"{chapter.name}: a stored widget view"
    assert "widgets" not in nb.metadata


@pytest.mark.parametrize("chapter", CHAPTERS, ids=_id)
def test_timings_keep_their_tag(chapter):
    """A timing cell (nbval-ignore-output) keeps its tag in the learner's notebook, so that
    `make test-fresh` does not report its numbers as differences; no other cell gets it."""
    def timed(cells):
        return [c.source for c in cells if c.cell_type == "code" and "nbval-ignore-output" in c.metadata.get("tags", [])]

    source = nbformat.read(chapter, as_version=4).cells
    reader = nbformat.read(reader_notebooks.OUT / chapter.name, as_version=4).cells
    assert timed(reader) == [s for s in timed(source) if any(c.source == s for c in reader)]
