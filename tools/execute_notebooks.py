"""Regenerate the stored outputs of the book's notebooks, deterministically.

    make notebooks                      # every chapter
    make notebooks NB=book/chapters/01_attention_as_search.ipynb

(or ``.venv/bin/python tools/execute_notebooks.py [NOTEBOOK ...]``).

The stored outputs are the truth: the site renders them and ``make test`` checks
them against a fresh run with nbval. So they are made the same way every time:

- two threads (OMP_NUM_THREADS=2, as in the tests), the CPU only (no CUDA even
  where a GPU is present), PYTHONHASHSEED=0; the notebooks fix their own seeds;
- each notebook runs top to bottom in a fresh kernel, in its own folder;
- widget state is stored in the notebook, so widgets render in the built site;
- widget ids come from a seeded generator (tools/deterministic_kernel.py);
- no timing metadata is written, and a cell's consecutive prints are stored as
  one stream output (how the kernel happened to flush them is timing);

so regenerating an unchanged notebook rewrites the same bytes. Then the
notebooks learners open, ``notebooks/NN_name.ipynb``, are regenerated from the
executed chapters (tools/reader_notebooks.py).

A notebook that raises an error is not written, and the command fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
DETERMINISTIC = Path(__file__).resolve().parent / "deterministic_kernel.py"
sys.path.insert(0, str(Path(__file__).resolve().parent))
TIMEOUT_PER_CELL = 300
BUDGET_SECONDS = 60  # a chapter runs top to bottom in under a minute on 2 CPU threads

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def book_notebooks() -> list[Path]:
    """Every notebook under book/, in a stable order."""
    return sorted(p for p in BOOK.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def set_environment() -> None:
    """Thread count, CPU only, hashing, and the kernel's Python (this one)."""
    os.environ["OMP_NUM_THREADS"] = "2"
    os.environ["MKL_NUM_THREADS"] = "2"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # idle threads sleep (outputs unchanged; on a busy machine spinning threads steal the cores)
    os.environ["PYTHONHASHSEED"] = "0"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["KQV_BOOK_BUILD"] = "1"  # kqv.plots glues figures and numbers for the prose
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend must draw the figures
    # The kernel spec runs `python`: make it this interpreter (the project's venv).
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def merge_streams(outputs: list) -> list:
    """Join consecutive stream outputs of the same stream (stdout, stderr) into one."""
    merged: list = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (output.output_type == "stream" and previous is not None
                and previous.output_type == "stream" and previous.name == output.name):
            previous.text += output.text
        else:
            merged.append(output)
    return merged


def execute(path: Path) -> float:
    """Run one notebook in place; return the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and not cell.source.strip():
            raise SystemExit(f"{path}: code cell {index} is empty; delete it")
    nb.metadata["kernelspec"] = KERNELSPEC
    nb.metadata.pop("widgets", None)
    client = NotebookClient(
        nb,
        timeout=TIMEOUT_PER_CELL,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        store_widget_state=True,
        record_timing=False,
        extra_arguments=[
            "--IPKernelApp.log_level=ERROR",  # not its "running over TCP without encryption" notice
            "--IPKernelApp.exec_lines="
            + json.dumps([f"exec(compile(open({str(DETERMINISTIC)!r}).read(), 'deterministic_kernel', 'exec'), {{}})"])
        ],
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = merge_streams(cell.outputs)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook under book/")
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or book_notebooks()
    missing = [p for p in paths if not p.is_file()]
    if missing:
        parser.error("no such notebook: " + ", ".join(map(str, missing)))
    set_environment()
    for path in paths:
        print(f"executing {path.relative_to(ROOT)} ...", flush=True)
        seconds = execute(path)
        note = "" if seconds <= BUDGET_SECONDS else f"  (over the {BUDGET_SECONDS} s budget of a chapter)"
        print(f"  done in {seconds:.1f} s{note}", flush=True)
    import reader_notebooks

    return reader_notebooks.main([str(p) for p in paths])


if __name__ == "__main__":
    sys.exit(main())
