"""Looking at a real model's heads: attention maps and scores that find heads of a kind.

The source article gives each of its 32 librarians a speciality (syntax,
meaning, position, parallel structure). Those are stories. A real model's
heads can be looked at directly: run the decoder one layer at a time, keep the
hidden states that enter each layer, and ask each layer's attention for its
weights. A head's map is a (T, T) matrix whose row t says how query t spreads
its attention over keys 0 .. t.

A few kinds of head are known to be real and are easy to score, each as a
number in [0, 1] per head (Olsson et al. 2022 describe the last two):

=================  ==========================================================
previous_token     weight on the token just before (who is near whom)
first_token        weight on the very first token (an "attention sink")
punctuation        weight on commas, full stops and other punctuation
duplicate_token    weight on earlier copies of the same token
induction          weight on the token *after* an earlier copy of the current
                   one: [A][B] ... [A] -> look at [B], the copying mechanism
=================  ==========================================================

The first two are averaged over the queries from :data:`FIRST_QUERY` (4) on.
The first rows cannot tell heads apart: query 0 sees only token 0, query 1's
previous token *is* token 0 (so a sink head would score as a previous-token
head and the other way round), and query t has only t + 1 keys, so a head
with no preference at all already puts 1 / (t + 1) on token 0 and on the
previous token: 1/2, 1/3, 1/4 for the queries 1, 2, 3. From query 4 on that
chance level is at most 1/5.

Every function returns plain tensors, lists and dicts that the book can put in
a table or a heat map. Shapes: a model's maps are (L, H, T, T) for a batch of
one, L layers and H query heads.

Book: chapter 3 ("Real heads of a real model").
"""

from __future__ import annotations

import unicodedata
from typing import Sequence

import torch
from torch import nn

__all__ = [
    "FIRST_QUERY",
    "hidden_states",
    "attention_maps",
    "attention_weights",
    "previous_token_score",
    "first_token_score",
    "punctuation_score",
    "duplicate_token_score",
    "induction_score",
    "punctuation_mask",
    "repeated_random_tokens",
    "head_scores",
    "rank_heads",
    "token_strings",
    "strongest_links",
]


def _batch_of_one(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(T,) or (1, T) integer ids -> (1, T) on the model's device."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.is_floating_point():
        raise ValueError(
            f"expected integer token ids of shape (T,) or (1, T), got {tuple(input_ids.shape)} {input_ids.dtype}"
        )
    return input_ids.to(model.embed_tokens.weight.device)


@torch.no_grad()
def hidden_states(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream entering each layer of a :class:`kqv.model.Decoder`, and leaving the last.

    Args:
        model: a decoder (``embed_tokens``, ``layers``, ``norm``, ``lm_head``).
        input_ids: token ids (B, T).

    Returns:
        L + 1 tensors of shape (B, T, hidden): entry ``l`` enters layer ``l``
        (entry 0 is the embeddings); entry L leaves the last layer, so
        ``model.lm_head(model.norm(states[-1]))`` are the logits.
    """
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be integer token ids (B, T), got {tuple(input_ids.shape)} {input_ids.dtype}")
    h = model.embed_tokens(input_ids.to(model.embed_tokens.weight.device))   # (B, T, hidden)
    states = [h]
    for layer in model.layers:
        h = layer(h)                                                         # (B, T, hidden)
        states.append(h)
    return states


@torch.no_grad()
def attention_maps(
    model: nn.Module, input_ids: torch.Tensor, *, layers: Sequence[int] | None = None
) -> torch.Tensor:
    """Every head's causal attention weights over one prompt, in float32.

    The decoder runs one layer at a time; each layer's attention is asked for
    the weights it computes from its own (normalized) input.

    Args:
        model: a :class:`kqv.model.Decoder` (or one returned by :mod:`kqv.convert`).
        input_ids: token ids (T,) or (1, T).
        layers: which layers (default all), in the order wanted.

    Returns:
        (len(layers), H, T, T): entry ``[i, h, t, s]`` is how much query t of
        head h in layer ``layers[i]`` attends to key s (zero for s > t).
    """
    ids = _batch_of_one(model, input_ids)
    L = len(model.layers)
    wanted = list(range(L)) if layers is None else [int(i) for i in layers]
    for i in wanted:
        if not -L <= i < L:
            raise IndexError(f"layer {i} out of range: the model has {L} layers")
    wanted = [i % L for i in wanted]
    maps: dict[int, torch.Tensor] = {}
    h = model.embed_tokens(ids)                                              # (1, T, hidden)
    for i, layer in enumerate(model.layers[: max(wanted) + 1]):
        if i in wanted:
            x = layer.input_layernorm(h)
            maps[i] = layer.self_attn.attention_weights(x)[0].float()        # (H, T, T)
        h = layer(h)
    return torch.stack([maps[i] for i in wanted])                            # (len(layers), H, T, T)


def attention_weights(
    model: nn.Module, input_ids: torch.Tensor, layer: int, head: int | None = None
) -> torch.Tensor:
    """One layer's maps (H, T, T), or one head's (T, T) if ``head`` is given."""
    maps = attention_maps(model, input_ids, layers=[layer])[0]               # (H, T, T)
    if head is None:
        return maps
    H = maps.shape[0]
    if not -H <= head < H:
        raise IndexError(f"head {head} out of range: layer {layer} has {H} heads")
    return maps[head]                                                        # (T, T)


# --- Scores: one number per head, shape (..., H) from maps (..., H, T, T) ---------


def _check_maps(maps: torch.Tensor) -> int:
    if maps.dim() < 2 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"maps must end in a square (T, T), got shape {tuple(maps.shape)}")
    T = maps.shape[-1]
    if T < 2:
        raise ValueError(f"scoring heads needs at least 2 tokens, got T={T}")
    return T


FIRST_QUERY = 4
"""The first query that :func:`previous_token_score` and :func:`first_token_score` count (see the module docstring)."""


def _check_first_query(T: int, first_query: int) -> None:
    if not 2 <= first_query < T:
        raise ValueError(
            f"first_query must be at least 2 (query 1's previous token is token 0) and below T={T}, got {first_query}"
        )


def previous_token_score(maps: torch.Tensor, *, first_query: int = FIRST_QUERY) -> torch.Tensor:
    """Mean weight on the token just before, over queries first_query .. T-1: (..., H, T, T) -> (..., H)."""
    T = _check_maps(maps)
    _check_first_query(T, first_query)
    return maps.diagonal(offset=-1, dim1=-2, dim2=-1)[..., first_query - 1 :].mean(-1)  # entry t-1: query t


def first_token_score(maps: torch.Tensor, *, first_query: int = FIRST_QUERY) -> torch.Tensor:
    """Mean weight on token 0, over queries first_query .. T-1: (..., H, T, T) -> (..., H)."""
    T = _check_maps(maps)
    _check_first_query(T, first_query)
    return maps[..., first_query:, 0].mean(-1)


def punctuation_score(maps: torch.Tensor, is_punctuation: torch.Tensor) -> torch.Tensor:
    """Mean weight on punctuation keys, over the queries after the first punctuation: (..., H).

    Args:
        maps: (..., H, T, T).
        is_punctuation: (T,) booleans, from :func:`punctuation_mask`.
    """
    T = _check_maps(maps)
    if is_punctuation.shape != (T,):
        raise ValueError(f"is_punctuation must have shape ({T},), got {tuple(is_punctuation.shape)}")
    mask = is_punctuation.to(device=maps.device, dtype=torch.bool)
    if not bool(mask.any()):
        raise ValueError("the prompt has no punctuation to attend to")
    first = int(mask.nonzero()[0])
    mass = (maps * mask.to(maps.dtype)).sum(-1)                              # (..., H, T)
    return mass[..., first + 1 :].mean(-1) if first + 1 < T else mass[..., first:].mean(-1)


def _earlier_copies(input_ids: torch.Tensor) -> torch.Tensor:
    """(T, T) booleans: [t, s] is True where s < t and token s equals token t."""
    ids = input_ids.reshape(-1)
    T = ids.shape[0]
    same = ids[:, None] == ids[None, :]
    before = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril(-1)
    return same & before


def duplicate_token_score(maps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean weight on earlier copies of the query's own token, over queries that have one: (..., H)."""
    T = _check_maps(maps)
    copies = _earlier_copies(input_ids).to(maps.device)                      # (T, T)
    if copies.shape != (T, T):
        raise ValueError(f"input_ids hold {copies.shape[0]} tokens, the maps {T}")
    rows = copies.any(-1)                                                    # (T,) queries with a copy
    if not bool(rows.any()):
        raise ValueError("no token repeats in the prompt; use repeated_random_tokens()")
    mass = (maps * copies.to(maps.dtype)).sum(-1)                            # (..., H, T)
    return mass[..., rows].mean(-1)


def induction_score(maps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean weight on the tokens that followed earlier copies of the query's token: (..., H).

    For ``[A][B] ... [A]`` the last query scores its weight on ``[B]``. Only
    queries with an earlier copy (not the one just before) count.
    """
    T = _check_maps(maps)
    copies = _earlier_copies(input_ids).to(maps.device)                      # (T, T): s is a copy of t
    if copies.shape != (T, T):
        raise ValueError(f"input_ids hold {copies.shape[0]} tokens, the maps {T}")
    # Key s + 1 is wanted wherever s is an earlier copy; s + 1 < t keeps it in the past.
    targets = torch.zeros_like(copies)
    targets[:, 1:] = copies[:, :-1]
    targets &= torch.ones_like(copies).tril(-1)
    rows = targets.any(-1)
    if not bool(rows.any()):
        raise ValueError("no token repeats in the prompt; use repeated_random_tokens()")
    mass = (maps * targets.to(maps.dtype)).sum(-1)                           # (..., H, T)
    return mass[..., rows].mean(-1)


# --- Prompts and helpers ---------------------------------------------------------


def token_strings(tokenizer, input_ids: torch.Tensor | Sequence[int]) -> list[str]:
    """Each token decoded on its own, for axis labels (a leading space stays visible)."""
    ids = input_ids.reshape(-1).tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    return [tokenizer.decode([i]) for i in ids]


def punctuation_mask(tokenizer, input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """(T,) booleans: True for tokens made only of punctuation (spaces aside)."""
    flags = []
    for text in token_strings(tokenizer, input_ids):
        stripped = text.strip()
        flags.append(bool(stripped) and all(unicodedata.category(c).startswith("P") for c in stripped))
    return torch.tensor(flags, dtype=torch.bool)


def repeated_random_tokens(
    n: int, vocab_size: int, *, seed: int = 0, low: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """n random token ids, then the same n again: (1, 2n), the standard induction prompt.

    Random tokens carry no meaning, so a head can only predict the second half
    by copying from the first: what induction heads do.

    Args:
        n: tokens in each half.
        vocab_size: ids are drawn from ``low .. vocab_size - 1``.
        seed: of the generator (the same seed gives the same prompt).
        low: the smallest id (skip control tokens, e.g. 17 for SmolLM2).
        device: of the result.
    """
    if n < 2 or not 0 <= low < vocab_size - 1:
        raise ValueError(f"need n >= 2 and 0 <= low < vocab_size - 1, got n={n}, low={low}, vocab_size={vocab_size}")
    g = torch.Generator().manual_seed(seed)
    half = torch.randperm(vocab_size - low, generator=g)[:n] + low           # n distinct ids
    return torch.cat((half, half)).unsqueeze(0).to(device)                   # (1, 2n)


def head_scores(
    model: nn.Module,
    tokenizer,
    text: str,
    *,
    random_tokens: int = 32,
    seed: int = 0,
    first_query: int = FIRST_QUERY,
) -> dict[str, torch.Tensor]:
    """Score every head of every layer for each kind of head, (L, H) per kind.

    Two prompts: ``text`` for previous_token, first_token and punctuation
    (the first two from query ``first_query`` on); a repeated random
    sequence (:func:`repeated_random_tokens`, ``2 * random_tokens`` ids) for
    duplicate_token and induction.

    Returns:
        A dict from the kind's name to a CPU float tensor (L, H).
    """
    device = model.embed_tokens.weight.device
    ids = torch.tensor([tokenizer.encode(text).ids], device=device)          # (1, T)
    maps = attention_maps(model, ids)                                        # (L, H, T, T)
    # Draw the random tokens from above the special ones (<|im_start|>, ...).
    low = 1 + max(tokenizer.get_added_tokens_decoder(), default=-1)
    rep = repeated_random_tokens(
        random_tokens, model.embed_tokens.num_embeddings, seed=seed, low=low, device=device
    )
    rep_maps = attention_maps(model, rep)                                    # (L, H, 2n, 2n)
    scores = {
        "previous_token": previous_token_score(maps, first_query=first_query),
        "first_token": first_token_score(maps, first_query=first_query),
        "punctuation": punctuation_score(maps, punctuation_mask(tokenizer, ids)),
        "duplicate_token": duplicate_token_score(rep_maps, rep),
        "induction": induction_score(rep_maps, rep),
    }
    return {kind: s.cpu() for kind, s in scores.items()}


def rank_heads(scores: torch.Tensor, top: int = 5) -> list[dict[str, float | int]]:
    """The ``top`` heads by score, best first: ``[{"layer", "head", "score"}, ...]``.

    Args:
        scores: (L, H), one kind from :func:`head_scores`.
        top: how many rows (all heads if larger than L * H).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (L, H), got shape {tuple(scores.shape)}")
    H = scores.shape[1]
    values, flat = scores.flatten().float().topk(min(top, scores.numel()))
    return [
        {"layer": int(i) // H, "head": int(i) % H, "score": float(v)}
        for v, i in zip(values.tolist(), flat.tolist())
    ]


def strongest_links(weights: torch.Tensor, tokens: Sequence[str]) -> list[dict[str, object]]:
    """For each query of one head's map (T, T), the key it attends to most.

    Returns:
        One row per query: ``{"query", "key", "distance", "weight"}`` with the
        tokens as strings and ``distance`` = query position - key position.
    """
    if weights.dim() != 2 or weights.shape[0] != weights.shape[1] or weights.shape[0] != len(tokens):
        raise ValueError(f"expected a ({len(tokens)}, {len(tokens)}) map, got shape {tuple(weights.shape)}")
    best_w, best = weights.float().max(-1)
    return [
        {"query": tokens[t], "key": tokens[s], "distance": t - s, "weight": float(w)}
        for t, (s, w) in enumerate(zip(best.tolist(), best_w.tolist()))
    ]
