"""Run every learner's notebook the way a learner does, in a fresh environment: `make test-fresh`.

    .venv/bin/python tools/test_fresh.py [--versions colab|newest|both] [--only NN_name ...]

For each set of versions:

1. a fresh virtual environment (under _build/fresh/) gets only the packages that
   Colab preinstalls and that matter here: torch, numpy, matplotlib, ipywidgets 7,
   ipykernel and transformers (``colab``: versions like Colab's; ``newest``: the
   newest that pip finds, ipywidgets 8 and torch included);
2. the committed HEAD of this repository is cloned, and every notebook of
   notebooks/ runs top to bottom in that environment's own kernel, starting with
   its install cell, which installs kqv from the clone in the same ``git+`` form
   it uses for the public repository (only the URL differs);
3. for each notebook the report gives: ran, or its first error; wall time; the
   cells whose text (printed output and text results) differs from the stored
   outputs (timings, tagged ``nbval-ignore-output``, are not compared); and any preinstalled package that the install cell changed (it must
   not upgrade what Colab's front end relies on, ipywidgets above all).

The report is printed and written to _build/fresh/report-<versions>.md; the README
records the last one. Not part of `make test`: it installs from PyPI and takes
minutes. Uncommitted changes are not tested (the clone is of HEAD).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRESH = ROOT / "_build" / "fresh"
READER = ROOT / "notebooks"
sys.path.insert(0, str(ROOT / "tools"))

# What Colab preinstalls, as far as these notebooks care (versions as on Colab in 2025-2026; torch is
# the CPU build that lies on this machine's disk: Colab's own is a CUDA build of the same series).
VERSIONS = {
    "colab": ["torch==2.13.0", "numpy==2.0.2", "matplotlib==3.10.0", "ipywidgets==7.7.1",
              "ipykernel==6.17.1", "transformers==4.57.1"],
    "newest": ["torch", "numpy", "matplotlib", "ipywidgets", "ipykernel", "transformers"],
}
WATCHED = ("ipywidgets", "ipykernel", "widgetsnbextension", "jupyterlab-widgets", "matplotlib", "numpy", "torch")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kw)


def freeze(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                         check=True, text=True, capture_output=True).stdout
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(out)}


def make_env(name: str) -> Path:
    env = FRESH / f"venv-{name}"
    if env.exists():
        shutil.rmtree(env)
    run([sys.executable, "-m", "venv", str(env)])
    python = env / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--upgrade", "pip"])
    run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *VERSIONS[name]])
    return python


def kernel_spec(python: Path, folder: Path) -> str:
    """A kernel spec that starts the fresh environment's Python (the notebooks' kernel)."""
    name = "kqv-fresh"
    spec = folder / "kernels" / name
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fresh", "language": "python",
    }))
    return name


def texts(cell) -> list[str]:
    """What a cell shows as text: printed output and text results (figures and HTML left out)."""
    shown = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            shown.append(output.get("text", ""))
        elif output.get("output_type") == "error":
            shown.append(f"{output.get('ename')}: {output.get('evalue')}")
        elif "text/plain" in output.get("data", {}) and not {"image/svg+xml", "image/png", "text/html"} & set(output["data"]):
            shown.append(output["data"]["text/plain"])
    return ["".join(shown)]


def run_notebook(path: Path, clone: Path, branch: str, kernel: str, workdir: Path) -> dict:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    import install_cell

    stored = nbformat.read(path, as_version=4)
    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    url, public_branch = install_cell.repository()
    public = f"git+{url}@{public_branch}"
    assert public in first.source, f"{path.name}: the install cell does not install {public}"
    first.source = first.source.replace(public, f"git+file://{clone}@{branch}")
    result = {"notebook": path.name, "ran": True, "error": "", "seconds": 0.0, "differ": [], "changed": []}
    client = NotebookClient(nb, timeout=900, kernel_name=kernel, resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as error:
        result["ran"] = False
        message = str(error).strip().splitlines()
        result["error"] = next((line for line in reversed(message) if line.strip()), "error")[:300]
    result["seconds"] = time.perf_counter() - start
    code_new = [c for c in nb.cells if c.cell_type == "code"]
    code_old = [c for c in stored.cells if c.cell_type == "code"]
    for k, (new, old) in enumerate(zip(code_new, code_old), start=1):
        if k == 1:
            continue  # the install cell prints pip's progress on a fresh machine
        if new.get("execution_count") is None:
            break
        if "nbval-ignore-output" in old.metadata.get("tags", []):
            continue  # a timing, which differs from run to run (nbval skips it too)
        if texts(new) != texts(old):
            result["differ"].append(k)
    return result


def report(name: str, results: list[dict], before: dict, after: dict, python: Path) -> str:
    versions = ", ".join(f"{p} {after.get(p, '-')}" for p in ("torch", "numpy", "matplotlib", "ipywidgets", "ipykernel", "transformers"))
    lines = [f"`make test-fresh` ({name}): {time.strftime('%Y-%m-%d')}, Python {sys.version.split()[0]}; {versions}.", "",
             "| notebook | ran | seconds | cells whose text differs |", "|---|---|---|---|"]
    for r in results:
        ran = "yes" if r["ran"] else f"no: {r['error']}"
        lines.append(f"| {r['notebook']} | {ran} | {r['seconds']:.0f} | {', '.join(map(str, r['differ'])) or 'none'} |")
    changed = [f"{p} {before[p]} -> {after.get(p, 'removed')}" for p in WATCHED if p in before and before[p] != after.get(p)]
    lines += ["", "Preinstalled packages the install cells changed: " + (", ".join(changed) or "none") + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", choices=["colab", "newest", "both"], default="both")
    parser.add_argument("--only", nargs="*", default=[], help="notebook names (without .ipynb)")
    args = parser.parse_args(argv)
    names = ["colab", "newest"] if args.versions == "both" else [args.versions]
    FRESH.mkdir(parents=True, exist_ok=True)
    branch = subprocess.run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=ROOT, check=True, text=True,
                            capture_output=True).stdout.strip()
    notebooks = sorted(READER.glob("*.ipynb"))
    if args.only:
        notebooks = [p for p in notebooks if p.stem in args.only]
    failed = False
    for name in names:
        print(f"== {name}: a fresh environment ...", flush=True)
        python = make_env(name)
        before = freeze(python)
        with tempfile.TemporaryDirectory(prefix="kqv-fresh-") as tmp:
            tmp = Path(tmp)
            clone = tmp / "kqv"
            run(["git", "clone", "-q", "--branch", branch, str(ROOT), str(clone)])
            jupyter = tmp / "jupyter"
            kernel = kernel_spec(python, jupyter)
            os.environ["JUPYTER_PATH"] = str(jupyter)
            for variable in ("KQV_BOOK_BUILD", "MPLBACKEND", "PYTHONPATH"):
                os.environ.pop(variable, None)
            os.environ.update({"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""})
            results = []
            for path in notebooks:
                print(f"   {path.name} ...", flush=True)
                workdir = tmp / "work"
                workdir.mkdir(exist_ok=True)
                # The clone's copy, so that notebooks and kqv come from the same commit.
                result = run_notebook(clone / "notebooks" / path.name, clone, branch, kernel, workdir)
                print(f"     {'ran' if result['ran'] else 'FAILED: ' + result['error']} in {result['seconds']:.0f} s; "
                      f"cells whose text differs: {result['differ'] or 'none'}", flush=True)
                results.append(result)
                failed |= not result["ran"]
        after = freeze(python)
        text = report(name, results, before, after, python)
        (FRESH / f"report-{name}.md").write_text(text)
        print(text)
        if any(p in before and before[p] != after.get(p) for p in ("ipywidgets", "ipykernel")):
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
