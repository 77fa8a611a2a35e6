"""Checks on the stored notebooks themselves (nbval then checks their outputs).

nbval does not compare a cell whose stored outputs were cleared, so a stripped
or half-run notebook would pass it silently. These tests close that gap: every
code cell of every notebook was executed, in order, in one run. They also check
the install cell that makes each notebook run on Colab, and that the widget
state the built site needs is stored.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import install_cell  # noqa: E402

pytestmark = pytest.mark.book

NOTEBOOKS = sorted(p for p in (ROOT / "book").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _toc_files() -> set[str]:
    files: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("file", "root") and isinstance(value, str):
                    files.add(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load((ROOT / "_toc.yml").read_text()))
    return files


def _code_cells(path: Path) -> list:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks under book/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_id)
def test_every_code_cell_was_executed_in_order(path):
    cells = _code_cells(path)
    assert cells, f"{_id(path)} has no code cells"
    counts = [c.execution_count for c in cells]
    for index, (cell, count) in enumerate(zip(cells, counts), start=1):
        source = cell.source.strip()
        assert source, f"code cell {index} is empty: delete it"
        assert count is not None, (
            f"code cell {index} was never executed (its outputs are missing); "
            f"run `make notebooks NB={_id(path)}`\n{source[:200]}"
        )
    assert counts == list(range(1, len(cells) + 1)), (
        f"code cells were executed out of order or in several runs: execution counts {counts}; "
        f"run `make notebooks NB={_id(path)}`"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_id)
def test_no_timing_metadata(path):
    nb = nbformat.read(path, as_version=4)
    timed = [i for i, c in enumerate(nb.cells) if "execution" in c.metadata]
    assert not timed, f"cells {timed} carry timing metadata; regenerate with `make notebooks NB={_id(path)}`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_id)
def test_first_code_cell_installs_kqv_from_the_repository(path):
    url, branch = install_cell.repository()
    first = _code_cells(path)[0]
    variants = install_cell.variants()
    assert first.source in variants.values(), (
        f"the first code cell of {_id(path)} is not the install cell; write it with "
        f"`.venv/bin/python tools/install_cell.py {_id(path)}` (add --real-model if the chapter loads SmolLM2)"
    )
    assert f"git+{url}@{branch}" in first.source
    assert install_cell.TAG in first.metadata.get("tags", []), "the install cell should be hidden from the site"
    assert first.outputs == [], "the install cell must print nothing where everything is installed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_id)
def test_only_the_install_cell_installs(path):
    for cell in _code_cells(path)[1:]:
        for marker in ("pip install", "github.com/", "%pip", "!pip"):
            assert marker not in cell.source, f"only the first code cell may install packages: {cell.source[:200]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_id)
def test_widget_state_is_stored(path):
    nb = nbformat.read(path, as_version=4)
    views = {
        output["data"][WIDGET_VIEW]["model_id"]
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if WIDGET_VIEW in output.get("data", {})
    }
    if not views:
        return
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    missing = views - set(state)
    assert not missing, f"widget views {sorted(missing)} have no stored state: the site could not render them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_id)
def test_notebook_is_in_the_table_of_contents(path):
    docname = str(path.relative_to(ROOT).with_suffix(""))
    assert docname in _toc_files(), f"{docname} is not in _toc.yml, so the site leaves it out"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_id)
def test_kernel_is_python3(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
