"""Real text for training and measuring: Python's own documentation, shipped with kqv.

A book that trains and measures models needs text that is there wherever the
book runs (offline, in Colab), under a licence that lets it be copied, and
long enough for a measurement to mean something. Python's documentation fits:

- the language reference topics that ``help()`` shows (``pydoc_data.topics``,
  about 465,000 characters), and
- the docstrings of the standard library's modules, classes and functions,
  read from the source files with ``ast`` (nothing is imported or run);

both under the PSF License Agreement (``kqv/data/PSF_LICENSE.txt``, copied
from the Python that built the extract). It is technical English with code in
it: 2.2 million characters, about 594,000 SmolLM2 tokens (505,000 of them in
the training split).

These texts change from one Python release to the next (Colab runs another
Python), so kqv ships a fixed extract, made once by :func:`build`
(``python -m kqv.corpus build``), and :data:`SHA256` pins every file. The
documents are split three ways, kept apart:

==============  =====  ==========================================================
split           share  used for
==============  =====  ==========================================================
``eval``        ~10%   the standard measurement of the real model (:mod:`kqv.evaluate`)
``validation``  ~5%    the validation loss of models trained from scratch
``train``       ~85%   uptraining, calibration, and training from scratch
==============  =====  ==========================================================

The split is by document, never inside one: each document's place comes from
the SHA-256 of its name (a fixed shuffle), and documents go to ``eval`` in that
order until it holds 10% of the characters, then to ``validation`` until the
two hold 15%, then to ``train`` (whole documents, so the shares come out near
10.5% and 4.5%). Each split's file keeps that order, so a prefix of the evaluation
text is itself a random sample of documents. The reference topics repeat each
other (``specialnames`` contains ``customization``, and so on), and some
docstrings are copied between modules (``_pyio`` and ``io``): every paragraph
of 64 characters or more is kept only where it first appears in that order, so
no paragraph is in two splits.

SmolLM2 was trained on web text that very likely includes these pages, so its
absolute perplexity here is optimistic; what this text measures well is the
difference between two versions of one model on the same tokens.

Book: chapter 12, "What each catalog costs"; chapters 6 to 9 (the standard measurement).
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
from importlib import resources
from pathlib import Path

__all__ = ["SPLITS", "SHA256", "BUILT_WITH", "documents", "text", "build", "file_name"]

SPLITS = ("train", "validation", "eval")
"""The three splits, in the order their files are listed."""

_SHARES = {"eval": 0.10, "validation": 0.05}  # the rest is train
_SEPARATOR = "\n\f\n"  # between documents in a split's file (a form feed on its own line)
_MIN_DEDUP = 64  # paragraphs at least this long are kept once only
_LICENSE = "PSF_LICENSE.txt"

BUILT_WITH = "3.11.7"
"""The Python version whose documentation the shipped extract was made from."""

SHA256 = {
    "pydocs_train.txt": "9ec9bd4e717f82d86c52fce54552b9d1c07c42e6acbec3de1e9666b9571b9e29",
    "pydocs_validation.txt": "7b33a96e597f076879c5b0b0eef9d60e0e710827f2968c28f10a6fb60e0345ac",
    "pydocs_eval.txt": "6803879b069ed52b25345c484f502588cddce0f8f03df77a942dc4c2238d8fd6",
    _LICENSE: "08319959e5b142ad4ad618589fba2d1c9b4f4f76d23339707ce5ac07342db9e2",
}
"""SHA-256 of each shipped file, as :func:`build` writes it with Python :data:`BUILT_WITH`."""

# Standard-library folders that are not documentation of Python: tests, the IDLE
# and turtle demos, vendored packages, generated codec tables.
_SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "ensurepip", "site-packages",
              "__pycache__", "__phello__", "encodings", "pydoc_data"}


def file_name(split: str) -> str:
    """The file under ``kqv/data`` that holds a split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the splits are {SPLITS}")
    return f"pydocs_{split}.txt"


def documents(split: str) -> list[str]:
    """The documents of one split, in their fixed order."""
    raw = resources.files("kqv").joinpath("data", file_name(split)).read_text(encoding="utf-8")
    return raw.split(_SEPARATOR)


def text(split: str) -> str:
    """One split as one text: its documents joined by blank lines."""
    return "\n\n".join(documents(split))


# --- Building the extract ---------------------------------------------------------


def _clean(s: str) -> str:
    """Trailing spaces off every line, tabs expanded, at most one blank line in a row."""
    lines = [line.rstrip().expandtabs(4) for line in s.replace("\r\n", "\n").split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip("\n")


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {f"topic {name}": _clean(body) for name, body in sorted(topics.items())}


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args = ast.unparse(node.args)
    return f"{node.name}({args})"


def _module_document(name: str, tree: ast.Module) -> str:
    """A module's docstrings as one document: the module's, then each class's and function's."""
    parts = [f"Module {name}\n{'=' * (7 + len(name))}"]
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(_clean(doc))

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(f"class {prefix}{node.name}\n\n{_clean(doc)}")
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(f"{prefix}{_signature(node)}\n\n{_clean(doc)}")

    visit(tree.body, "")
    return "\n\n".join(parts)


def _module_documents(stdlib: Path) -> dict[str, str]:
    docs: dict[str, str] = {}
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if _SKIP_DIRS & set(rel.parts[:-1]) or rel.parts[0] in _SKIP_DIRS:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        doc = _module_document(name, tree)
        if doc.count("\n\n") >= 1 and len(doc) >= 200:   # more than a title
            docs[f"module {name}"] = doc
    return docs


def _order(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def _dedup(ordered: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Keep each paragraph of at least ``_MIN_DEDUP`` characters where it first appears."""
    seen: set[str] = set()
    out = []
    for name, doc in ordered:
        kept = []
        for para in doc.split("\n\n"):
            key = " ".join(para.split())
            if len(key) >= _MIN_DEDUP:
                if key in seen:
                    continue
                seen.add(key)
            kept.append(para)
        doc = "\n\n".join(kept)
        if len(doc) >= 200:
            out.append((name, doc))
    return out


def build(out_dir: str | Path | None = None) -> dict[str, str]:
    """Make the extract from the running Python's documentation; return each file's SHA-256.

    Deterministic: the same Python release gives the same bytes (a test checks
    :data:`SHA256` when it runs on Python :data:`BUILT_WITH`).

    Args:
        out_dir: where to write the files; default ``kqv/data`` of this checkout.
    """
    out = Path(out_dir) if out_dir is not None else Path(__file__).parent / "data"
    out.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = {**_topics(), **_module_documents(stdlib)}
    for name, doc in docs.items():
        if _SEPARATOR.strip("\n") in doc:
            raise ValueError(f"{name} contains the separator (a form feed)")
    ordered = _dedup(sorted(docs.items(), key=lambda kv: _order(kv[0])))
    total = sum(len(d) for _, d in ordered)
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    filled = 0
    for name, doc in ordered:
        if filled < _SHARES["eval"] * total:
            split = "eval"
        elif filled < (_SHARES["eval"] + _SHARES["validation"]) * total:
            split = "validation"
        else:
            split = "train"
        splits[split].append(doc)
        filled += len(doc)
    hashes = {}
    for split in SPLITS:
        data = _SEPARATOR.join(splits[split]).encode("utf-8")
        (out / file_name(split)).write_bytes(data)
        hashes[file_name(split)] = hashlib.sha256(data).hexdigest()
    notice = (
        f"The files pydocs_*.txt next to this one are an extract of the documentation of\n"
        f"Python {sys.version.split()[0]} (pydoc_data.topics and the standard library's docstrings),\n"
        f"made by kqv.corpus.build. That documentation is licensed under the PSF License\n"
        f"Agreement below; code in it is also under the Zero-Clause BSD licence.\n"
        f"Python's LICENSE file follows, unchanged.\n\n"
    )
    license_text = (stdlib / "LICENSE.txt").read_text(encoding="utf-8")
    data = (notice + license_text).encode("utf-8")
    (out / _LICENSE).write_bytes(data)
    hashes[_LICENSE] = hashlib.sha256(data).hexdigest()
    return hashes


def _main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kqv.corpus", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--out", default=None, help="folder to write to (default: kqv/data)")
    args = parser.parse_args(argv)
    hashes = build(args.out)
    if sys.version.split()[0] != BUILT_WITH:
        print(f"note: built with Python {sys.version.split()[0]}; the shipped extract comes from {BUILT_WITH}")
    for name, digest in hashes.items():
        print(f"{name}: {digest}")


if __name__ == "__main__":
    _main()
