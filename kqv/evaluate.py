"""Measuring a model: perplexity on a fixed text, and what its cache costs per token.

Two texts ship with the package (``kqv/data``), both written for it:

- :func:`eval_text`, about 1,600 words of plain English on libraries, search
  and attention: the text that perplexity is measured on;
- :func:`calibration_text`, about 600 words on another subject (a river town
  and its bakers): the activations that a conversion may fit itself to
  (:func:`kqv.convert.gqa_to_latent`), kept apart from the text it is judged on.

Perplexity is exp(mean negative log-likelihood) of each token given the ones
before it: the number of equally likely choices the model is, on average, as
unsure as. Lower is better; a conversion that costs nothing leaves it unchanged.

Book: chapters 5 to 8 (what each conversion costs).
"""

from __future__ import annotations

import math
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["eval_text", "calibration_text", "perplexity", "cache_bytes_per_token", "compare"]


def _data(name: str) -> str:
    return resources.files("kqv").joinpath("data", name).read_text(encoding="utf-8")


def eval_text() -> str:
    """The evaluation text shipped with kqv (``kqv/data/eval_text.txt``)."""
    return _data("eval_text.txt")


def calibration_text() -> str:
    """The calibration text shipped with kqv (``kqv/data/calibration_text.txt``)."""
    return _data("calibration_text.txt")


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
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"need token ids of shape (1, T) with T >= 2, got {tuple(input_ids.shape)}")
    if window is not None and window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
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
