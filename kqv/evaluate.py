"""Measuring a model: perplexity with an uncertainty, and what its cache costs per token.

Perplexity is exp(mean negative log-likelihood) of each token given the ones
before it: the number of equally likely choices the model is, on average, as
unsure as. Lower is better; a conversion that costs nothing leaves it unchanged.

**The standard measurement** (every chapter and every experiment quotes this one):

- the text: the ``eval`` split of :mod:`kqv.corpus` (Python's documentation,
  kept apart from everything any model here is trained or calibrated on);
- the tokens: the first :data:`FULL_TOKENS` (16,384) of it, SmolLM2's tokenizer
  (:func:`eval_tokens`);
- windows of :data:`WINDOW` (512) tokens, each scored alone, so every window
  has the same 511 targets and is one independent sample;
- perplexity = exp(sum of all windows' NLL / all their targets), with a 95%
  interval from resampling the windows (a bootstrap with a fixed seed):
  :func:`perplexity_ci` returns a :class:`PerplexityResult`.

A chapter that measures several models live uses :data:`LIVE_TOKENS` (2,048:
the first 4 windows of the same set, a random sample of its documents, since
the split's documents are in a fixed shuffled order) and quotes the full-size
numbers from the committed results (``results/quality.json``, made by
``python -m kqv.experiments quality``). Two models scored on the same windows
are compared with :func:`perplexity_ratio`, a paired bootstrap: much tighter
than comparing two separate intervals.

Why these sizes (measured on this project's 2-core CPU, two threads, float32,
with little else running): SmolLM2-135M scores about 450 tokens a second in
batches of 4 windows, so the full set takes about 40 s a model and the live
set about 5 s, which leaves a chapter that measures five models under a
minute. Windows of 512 tokens give attention a real context (the cache
matters at long contexts) while keeping 32 windows for the interval. For the
original model the full-size interval is about +-10% (14.4, from 13.0 to 16.0);
the paired ratio of two models is far tighter.

Two short texts also ship with the package (``kqv/data``), written for the book:

- :func:`eval_text`, about 1,600 words of plain English on libraries, search
  and attention, that the first chapters score;
- :func:`calibration_text`, about 600 words on another subject (a river town
  and its bakers).

Book: chapters 6 to 9 (what each conversion costs) and chapter 12, "What each catalog costs".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "WINDOW",
    "FULL_TOKENS",
    "LIVE_TOKENS",
    "eval_tokens",
    "window_nll",
    "PerplexityResult",
    "perplexity_ci",
    "perplexity_ratio",
    "eval_text",
    "calibration_text",
    "one_text",
    "perplexity",
    "cache_bytes_per_token",
    "compare",
]

WINDOW = 512
"""Tokens per window of the standard measurement; each window is scored alone."""

FULL_TOKENS = 16_384
"""Tokens of the standard measurement at full size: 32 windows of 512."""

LIVE_TOKENS = 2_048
"""Tokens a chapter scores live: the first 4 windows of the full set."""


def _data(name: str) -> str:
    return resources.files("kqv").joinpath("data", name).read_text(encoding="utf-8")


def eval_text() -> str:
    """The book's own English text (``kqv/data/eval_text.txt``), about 1,900 SmolLM2 tokens."""
    return _data("eval_text.txt")


def calibration_text() -> str:
    """The calibration text shipped with kqv (``kqv/data/calibration_text.txt``)."""
    return _data("calibration_text.txt")


def one_text(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Token ids of one text, (T,) or (1, T) with T >= 2, as (1, T) on the model's device.

    The check every measurement of one text shares (:func:`perplexity`,
    :func:`kqv.quant.cache_quality`, :func:`kqv.window.window_perplexity`).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"need token ids of shape (1, T) with T >= 2, got {tuple(input_ids.shape)}")
    return input_ids.to(next(model.parameters()).device)


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, *, window: int | None = None) -> float:
    """exp(mean cross-entropy) of every token after the first, given the ones before it.

    Args:
        model: maps token ids (B, T) to logits (B, T, vocab), e.g. a :class:`kqv.model.Decoder`.
        input_ids: token ids (1, T) or (T,).
        window: score the text in independent windows of this many tokens
            (less memory, shorter context); default one pass over all of it.

    Returns:
        The perplexity, a float >= 1.
    """
    input_ids = one_text(model, input_ids)
    if window is not None and window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    T = input_ids.shape[1]
    window = window or T
    total, count = 0.0, 0
    for start in range(0, T - 1, window):
        chunk = input_ids[:, start : start + window]                          # (1, W)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk)                                                 # (1, W, vocab)
        # Log-probabilities in float32: a half-precision softmax over 49k words loses the tail.
        nll = F.cross_entropy(logits[0, :-1].float(), chunk[0, 1:], reduction="sum")
        total += float(nll)
        count += chunk.shape[1] - 1
    return math.exp(total / count)


# --- The standard measurement ------------------------------------------------------


def eval_tokens(tokenizer, n_tokens: int | None = None, *, device: torch.device | str | None = None) -> torch.Tensor:
    """The standard evaluation tokens, (1, n): the start of :mod:`kqv.corpus`'s ``eval`` split.

    Args:
        tokenizer: SmolLM2's (:func:`kqv.smollm2.build_tokenizer`), or any
            ``tokenizers.Tokenizer`` for a model of its own vocabulary.
        n_tokens: how many; default :data:`FULL_TOKENS`. :data:`LIVE_TOKENS`
            gives the first windows of the same set.
        device: where to put them (default the CPU).
    """
    from . import corpus

    n_tokens = FULL_TOKENS if n_tokens is None else n_tokens
    ids = tokenizer.encode(corpus.text("eval")).ids
    if not 2 <= n_tokens <= len(ids):
        raise ValueError(f"n_tokens must be between 2 and {len(ids)} (the eval split's length), got {n_tokens}")
    return torch.tensor([ids[:n_tokens]], dtype=torch.long, device=device)


@torch.no_grad()
def window_nll(
    model: nn.Module, input_ids: torch.Tensor, *, window: int = WINDOW, batch_size: int = 4
) -> torch.Tensor:
    """Summed negative log-likelihood of each whole window, scored alone: (n_windows,) float64.

    The tokens are cut into ``T // window`` windows (a tail shorter than a
    window is not scored); window i predicts its tokens 1 .. window - 1 from
    the ones before them in the same window, so each sums ``window - 1``
    targets. Windows go through the model ``batch_size`` at a time.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"need token ids of shape (1, T), got {tuple(input_ids.shape)}")
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    n = input_ids.shape[1] // window
    if n < 1:
        raise ValueError(f"need at least one whole window of {window} tokens, got {input_ids.shape[1]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    windows = input_ids[0, : n * window].view(n, window).to(device)        # (n, W)
    sums = []
    for batch in windows.split(batch_size):
        logits = model(batch)                                             # (b, W, vocab)
        # Log-probabilities in float32: a half-precision softmax over 49k words loses the tail.
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
        sums.append(nll.view(batch.shape[0], window - 1).double().sum(1).cpu())   # (b,)
    return torch.cat(sums)                                                # (n,)


@dataclass(frozen=True)
class PerplexityResult:
    """A perplexity, its bootstrap interval, and what it was measured on.

    Attributes:
        perplexity: exp(total NLL / targets) over all windows.
        low: the interval's lower end.
        high: its upper end.
        tokens: targets scored, ``windows * (window - 1)``.
        windows: how many windows were scored.
        window: tokens per window.
        level: the interval's coverage (0.95: a 95% interval).
        n_boot: resamples of the bootstrap.
        seed: of the bootstrap's generator.
        window_nll: each window's summed NLL, for paired comparisons
            (:func:`perplexity_ratio`).
    """

    perplexity: float
    low: float
    high: float
    tokens: int
    windows: int
    window: int
    level: float
    n_boot: int
    seed: int
    window_nll: tuple[float, ...]

    def as_dict(self) -> dict:
        """Plain numbers and lists, for JSON."""
        d = asdict(self)
        d["window_nll"] = list(self.window_nll)
        return d

    def __str__(self) -> str:
        return (
            f"{self.perplexity:.2f} ({self.level:.0%} CI {self.low:.2f}-{self.high:.2f}; "
            f"{self.tokens:,} tokens in {self.windows} windows of {self.window})"
        )


def _bootstrap(stats: torch.Tensor, n: int, n_boot: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile interval of ``stats(indices)`` over ``n_boot`` resamples of n windows, with replacement."""
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)                   # (n_boot, n)
    values = stats(idx)                                                   # (n_boot,)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=values.dtype)
    low, high = torch.quantile(values, q).tolist()
    return low, high


def perplexity_ci(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    window: int = WINDOW,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    batch_size: int = 4,
) -> PerplexityResult:
    """The standard measurement: perplexity over whole windows, with a bootstrap interval.

    Every window has ``window - 1`` targets, so resampling windows (with
    replacement, ``n_boot`` times, a generator seeded with ``seed``) and taking
    exp(mean NLL) of each resample gives the spread of the estimate; the
    interval is its central ``level`` quantiles. Same model, tokens and seed:
    the same numbers.

    Args:
        model: maps token ids (B, T) to logits (B, T, vocab).
        input_ids: (1, T), e.g. :func:`eval_tokens`; a tail shorter than a window is dropped.
        window, batch_size: see :func:`window_nll`.
        n_boot, seed, level: of the bootstrap.
    """
    nll = window_nll(model, input_ids, window=window, batch_size=batch_size)   # (n,)
    n = nll.shape[0]
    per_window = window - 1
    low, high = _bootstrap(lambda idx: torch.exp(nll[idx].mean(1) / per_window), n, n_boot, seed, level)
    return PerplexityResult(
        perplexity=math.exp(float(nll.mean()) / per_window), low=low, high=high,
        tokens=n * per_window, windows=n, window=window, level=level, n_boot=n_boot, seed=seed,
        window_nll=tuple(nll.tolist()),
    )


def perplexity_ratio(
    a: PerplexityResult, b: PerplexityResult, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Perplexity of a over perplexity of b on the same windows, with a paired bootstrap interval.

    Each resample draws the same windows for both models, so what the two
    share (a hard window is hard for both) cancels out, and the interval of
    the ratio is far narrower than the two intervals side by side suggest.

    Returns:
        ``(ratio, low, high)``.
    """
    if (a.windows, a.window) != (b.windows, b.window):
        raise ValueError(
            f"a and b must be scored on the same windows: a has {a.windows} of {a.window} tokens, "
            f"b {b.windows} of {b.window}"
        )
    diff = torch.tensor(a.window_nll, dtype=torch.float64) - torch.tensor(b.window_nll, dtype=torch.float64)
    per_window = a.window - 1
    low, high = _bootstrap(lambda idx: torch.exp(diff[idx].mean(1) / per_window), a.windows, n_boot, seed, level)
    return math.exp(float(diff.mean()) / per_window), low, high


def cache_bytes_per_token(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes one more token of one sequence occupies in the model's cache, all layers together.

    Measured on a real cache from ``model.new_cache`` (its buffers' element
    size times their width), in the model's dtype unless ``dtype`` is given.
    """
    return model.new_cache(1, 1, dtype=dtype).bytes_per_token


def compare(
    models: dict[str, nn.Module],
    input_ids: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    window: int | None = None,
) -> list[dict[str, float | int | str]]:
    """Perplexity and cache size of several models on one text, as rows for a table.

    Args:
        models: name -> model, in the order the rows should have.
        input_ids: token ids (1, T), the same for every model.
        dtype: count cache bytes as if stored in this dtype (default: each model's own).
        window: passed to :func:`perplexity`.

    Returns:
        One dict per model: ``name``, ``perplexity``, ``bytes_per_token`` and
        ``cache_fraction`` (bytes per token over the first model's).
    """
    if not models:
        raise ValueError("compare needs at least one model")
    rows: list[dict[str, float | int | str]] = []
    for name, model in models.items():
        rows.append(
            {
                "name": name,
                "perplexity": perplexity(model, input_ids, window=window),
                "bytes_per_token": cache_bytes_per_token(model, dtype),
            }
        )
    first = rows[0]["bytes_per_token"]
    for row in rows:
        row["cache_fraction"] = row["bytes_per_token"] / first
    return rows
