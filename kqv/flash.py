"""Computing attention fast: the online softmax, FlashAttention's tiling, flash-decoding.

Book: chapter "Computing attention fast".

Every function here computes exactly ``softmax(q k^T * scale + mask) v``, the
attention of :func:`kqv.scaled_dot_product_attention`, but never holds the
(T, S) matrix of scores. They read like the algorithms they teach (plain
Python loops over blocks); they are not fast on their own. PyTorch's fused
kernels do the same arithmetic in one GPU kernel.

**The online softmax** (Milakov & Gimelshein 2018, arXiv 1805.02867). Keep,
for each query, three running numbers over the keys seen so far: the largest
score m, the sum l of exp(score - m), and the sum o of exp(score - m) * value.
When a new block of scores s arrives, the maximum may grow to
m' = max(m, max s); everything summed so far was exponentiated against the
old maximum, and one factor puts it right, because exp(x - m') =
exp(m - m') * exp(x - m)::

    m' = max(m, max_j s_j)
    l' = exp(m - m') * l + sum_j exp(s_j - m')
    o' = exp(m - m') * o + sum_j exp(s_j - m') * v_j

After the last block, the output is o / l and the log-sum-exp of all the
scores is lse = m + log l. One pass over the keys, nothing of size S kept.

**FlashAttention's tiling** (Dao et al. 2022, arXiv 2205.14135;
FlashAttention-2, Dao 2023, arXiv 2307.08691). Cut the queries into blocks
of ``block_q`` rows and the keys into blocks of ``block_k``; each tile of
scores (block_q, block_k) is made, folded into its query block's running
state, and thrown away. FlashAttention-2's Algorithm 1 loops over query blocks
outside and key blocks inside, keeps o unscaled and divides by l once at the
end, and keeps only lse = m + log l for the backward pass. With a causal mask
it skips the tiles whose keys are all in the future of all their queries
("approximately half of the blocks for large sequence length", section
3.1.1) and masks only the tiles that straddle the diagonal. On a GPU a tile
lives in on-chip memory; here it is just a small tensor.

**Flash-decoding** (Dao, Haziza, Massa, Sizov 2023,
https://crfm.stanford.edu/2023/10/12/flashdecoding.html). One new token has
one row of queries per head: too little work to keep a GPU busy if the keys
are walked in one sequence. Split the cache into slices, attend to each slice
independently (each with its own output o_a, normalised over its own keys, and
its log-sum-exp L_a), then merge. Slice a's share of the whole softmax is
exp(L_a) / sum_b exp(L_b), so::

    L = log sum_a exp(L_a)          o = sum_a exp(L_a - L) * o_a

which is exact: :func:`merge_partials`. kqv's CPU decode path
(``kqv.attention._split_kv``, used by ``scaled_dot_product_attention(...,
fused=True)``) does the same to keep every core busy; :func:`decode_splits`
says into how many slices it splits a step.

**GQA without copies.** When H_kv < H, the q_per_kv query heads of a group
all attend to the same K/V head, so they are stacked as extra rows against it:
queries (B, H_kv, q_per_kv * T, D) against keys (B, H_kv, S, D), one ordinary
attention per KV head.

**FlashMLA** (DeepSeek's MLA kernels) puts these pieces together for MLA's
absorbed form. Its dense decoding kernel (Hopper GPUs, BF16 cache) runs MLA
in "MQA mode": one KV head 576 wide (the 512-wide latent and the 64-wide RoPE
key) whose first 512 numbers are also the values, so K and V are read once;
the query heads (128 in DeepSeek-V3, times the new tokens) are the rows of its
tiles of 64; the cache is paged in blocks of 64 tokens; the keys are split
over the GPU's processors and a second kernel merges the partial results by
their log-sum-exp, as :func:`merge_partials` does. Its FP8 cache (656 bytes a
token: 512 float8_e4m3 numbers, 4 float32 scales, 64 bfloat16 RoPE numbers)
belongs to its sparse decoding kernel, for DeepSeek-V3.2.
Source: github.com/deepseek-ai/FlashMLA at commit 9241ae3 (April 2026):
README.md, csrc/sm90/decode/dense/config.h (PAGE_BLOCK_SIZE = 64,
BLOCK_SIZE_M = 64, HEAD_DIM_K = 576, HEAD_DIM_V = 512), tests/ref.py,
csrc/smxx/decode/combine/combine.cu, docs/20250422-new-kernel-deep-dive.md.

Shapes follow the legend in :mod:`kqv`: q (B, H, T, D), k (B, H_kv, S, D),
v (B, H_kv, S, D_v), with any number of leading axes (or none: (T, D) is one
head). Causal masks are aligned bottom-right, as :func:`kqv.causal_mask`: the
T queries are the last T of the S tokens. A query that may see no key at all
gets an output of zeros (as PyTorch's own attention gives) and an lse of -inf.

The measurement helpers at the end give the chapter its numbers: the peak
memory of eager against tiled attention (:func:`attention_memory`), the
arithmetic intensity of prefill against decode (:func:`attention_intensity`),
and time-to-first-token against time-per-output-token on a real model
(:func:`generation_times`).
"""

from __future__ import annotations

import math
import statistics
import time
import weakref
from typing import Callable, Iterable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .attention import _check_qkv, _fold, _kv_splits, scaled_dot_product_attention
from .configs import ModelConfig, dtype_bytes

__all__ = [
    "online_softmax_step",
    "online_softmax_result",
    "online_softmax_attention",
    "tiled_attention",
    "merge_partials",
    "split_kv_decode",
    "decode_splits",
    "peak_memory",
    "attention_memory",
    "attention_intensity",
    "prefill_decode_intensity",
    "generation_times",
]


# --- Shapes and checks -----------------------------------------------------------


def _check_block(name: str, size: object) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"{name} must be a positive integer, got {size!r}")
    return size


def _with_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Check q, k, v; give (T, D) inputs a head axis. Returns q, k, v, q_per_kv, whether a head axis was added."""
    q_per_kv = _check_qkv(q, k, v)
    added = q.dim() == 2 or k.dim() == 2
    if added:
        if q.dim() != 2 or k.dim() != 2:
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must both have a head axis or neither")
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)                  # (1, T, D), (1, S, D)
    if q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree before the head axis")
    return q, k, v, q_per_kv, added


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """The running sums' dtype: float32, or float64 for float64 inputs (as GPU kernels accumulate in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- 1. The online softmax -----------------------------------------------------------


def online_softmax_step(
    m: torch.Tensor, l: torch.Tensor, o: torch.Tensor, scores: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one block of scores, and its values, into the running state (m, l, o).

    Args:
        m: (..., R) the largest score of each of R query rows so far (-inf before any).
        l: (..., R) the sum of exp(score - m) so far.
        o: (..., R, D_v) the sum of exp(score - m) * value so far (not yet divided by l).
        scores: (..., R, n) the scores of this block's n keys (-inf where masked).
        v: (..., n, D_v) this block's values.

    Returns:
        The new (m, l, o). The rescaling identity exp(x - m') = exp(m - m') *
        exp(x - m) moves what was summed under the old maximum m to the new
        one m'. A row whose scores have all been -inf so far keeps m = -inf and
        l = 0 (the exponentials are then taken against 0, not -inf, which
        would give exp(-inf + inf) = nan).
    """
    m_new = torch.maximum(m, scores.amax(-1))                              # (..., R)
    m_ref = m_new.masked_fill(m_new == float("-inf"), 0.0)                 # nothing seen yet: any finite reference
    alpha = torch.exp(m - m_ref)                                           # (..., R) old max -> new max
    p = torch.exp(scores - m_ref.unsqueeze(-1))                            # (..., R, n)
    l = alpha * l + p.sum(-1)                                              # (..., R)
    o = alpha.unsqueeze(-1) * o + p @ v                                    # (..., R, D_v)
    return m_new, l, o


def online_softmax_result(
    m: torch.Tensor, l: torch.Tensor, o: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output o / l (..., R, D_v) and the log-sum-exp m + log l (..., R) of a finished running state.

    A row that saw no key (l = 0) gets zeros and lse = -inf.
    """
    out = o / torch.where(l > 0, l, torch.ones_like(l)).unsqueeze(-1)      # (..., R, D_v)
    return out, m + torch.log(l)                                           # log 0 = -inf


def _start_state(rows: torch.Tensor, D_v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, l, o) before any key, for query rows (..., R, D)."""
    m = torch.full(rows.shape[:-1], float("-inf"), dtype=rows.dtype, device=rows.device)  # (..., R)
    l = torch.zeros(rows.shape[:-1], dtype=rows.dtype, device=rows.device)                 # (..., R)
    o = torch.zeros(*rows.shape[:-1], D_v, dtype=rows.dtype, device=rows.device)           # (..., R, D_v)
    return m, l, o


def online_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention in one pass over the keys, ``block_size`` keys at a time, every query at once.

    The online softmax of Milakov & Gimelshein (2018, arXiv 1805.02867),
    applied to attention: see :func:`online_softmax_step` and the module
    docstring. No mask: every query sees every key (for masks and causal
    attention, see :func:`tiled_attention`).

    Args:
        q: queries (B, H, T, D).
        k: keys (B, H_kv, S, D), H divisible by H_kv.
        v: values (B, H_kv, S, D_v).
        block_size: keys per block (the last block may be shorter).
        scale: multiplies the scores; default 1 / sqrt(D).
        return_lse: also return the log-sum-exp of each query's scores (B, H, T),
            what :func:`merge_partials` needs.

    Returns:
        The output (B, H, T, D_v) in the dtype of q (the running sums are kept
        in float32, or float64 for float64 inputs), and with ``return_lse``
        the log-sum-exp in that accumulation dtype.
    """
    _check_block("block_size", block_size)
    q, k, v, q_per_kv, added = _with_heads(q, k, v)
    T, D, S, D_v = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = _accumulator(q.dtype)
    # A group's q_per_kv query heads are q_per_kv * T rows against one KV head (K and V are not copied).
    rows = q.reshape(*q.shape[:-3], -1, q_per_kv * T, D).to(acc)                       # (B, H_kv, R, D)
    m, l, o = _start_state(rows, D_v)
    for start in range(0, S, block_size):
        k_blk = k[..., start : start + block_size, :].to(acc)                           # (B, H_kv, n, D)
        v_blk = v[..., start : start + block_size, :].to(acc)                           # (B, H_kv, n, D_v)
        scores = (rows @ k_blk.transpose(-2, -1)) * scale                               # (B, H_kv, R, n)
        m, l, o = online_softmax_step(m, l, o, scores, v_blk)
    out, lse = online_softmax_result(m, l, o)                                           # (B, H_kv, R, D_v)
    out = out.reshape(*q.shape[:-1], D_v).to(q.dtype)                                   # (B, H, T, D_v)
    lse = lse.reshape(q.shape[:-1])                                                     # (B, H, T)
    if added:
        out, lse = out.squeeze(0), lse.squeeze(0)
    return (out, lse) if return_lse else out


# --- 2. FlashAttention's tiling --------------------------------------------------------


def _grouped_mask(mask: torch.Tensor, q: torch.Tensor, S: int, q_per_kv: int) -> torch.Tensor:
    """A user mask as a view (B, H_kv, q_per_kv, T, S), without materialising the broadcast."""
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"mask must be boolean (True = may attend) or floating (added), got dtype {mask.dtype}")
    target = (*q.shape[:-1], S)                                                         # (B, H, T, S)
    try:
        fits = torch.broadcast_shapes(mask.shape, target) == target
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to (B, H, T, S) = {target}")
    return mask.to(q.device).expand(target).unflatten(-3, (-1, q_per_kv))              # (B, H_kv, q_per_kv, T, S)


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_q: int = 64,
    block_k: int = 64,
    is_causal: bool = False,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention's forward pass: tiles of (block_q queries, block_k keys), the (T, S) scores never stored.

    The loop order of FlashAttention-2's Algorithm 1 (Dao 2023, arXiv
    2307.08691): for each block of queries, a running state (m, l, o) is
    folded over the key blocks (:func:`online_softmax_step`) and divided once
    at the end. Rescaling keeps the result exact. Memory beyond the inputs
    and the output: one tile and one block's state, whatever T and S are.

    With ``is_causal`` the queries are the last T of the S tokens (bottom-right,
    as :func:`kqv.causal_mask`): query i sits at position S - T + i. The key
    blocks after the last position of a query block are never visited, and
    only the tiles that straddle the diagonal are masked.

    Under GQA each tile holds the q_per_kv query heads of a group for block_q
    tokens, q_per_kv * block_q rows against one KV head: K/V are never copied
    per query head.

    Args:
        q: queries (B, H, T, D).
        k: keys (B, H_kv, S, D), H divisible by H_kv.
        v: values (B, H_kv, S, D_v).
        block_q: query tokens per tile (the last may be shorter).
        block_k: keys per tile (the last may be shorter).
        is_causal: hide the future, aligned bottom-right.
        mask: boolean (True = may attend) or additive float, broadcastable to (B, H, T, S).
        scale: multiplies the scores; default 1 / sqrt(D).
        return_lse: also return each query's log-sum-exp (B, H, T).

    Returns:
        The output (B, H, T, D_v) in the dtype of q (sums kept in float32, or
        float64 for float64 inputs); with ``return_lse`` also the log-sum-exp.
    """
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    q, k, v, q_per_kv, added = _with_heads(q, k, v)
    T, D, S, D_v = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    if is_causal and T > S:
        raise ValueError(f"causal attention needs at least as many keys as queries, got T={T}, S={S}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = _accumulator(q.dtype)
    groups = q.unflatten(-3, (-1, q_per_kv))                                            # (B, H_kv, q_per_kv, T, D) view
    masks = None if mask is None else _grouped_mask(mask, q, S, q_per_kv)               # (B, H_kv, q_per_kv, T, S) view
    out = q.new_empty(*groups.shape[:-1], D_v)                                          # (B, H_kv, q_per_kv, T, D_v)
    lse = torch.empty(groups.shape[:-1], dtype=acc, device=q.device)                    # (B, H_kv, q_per_kv, T)
    offset = S - T                                                                      # query i is token offset + i

    for i0 in range(0, T, block_q):
        i1 = min(i0 + block_q, T)
        rows = groups[..., i0:i1, :].flatten(-3, -2).to(acc)                            # (B, H_kv, q_per_kv * bq, D)
        m, l, o = _start_state(rows, D_v)
        # Causal: no query of this block sees past position offset + i1 - 1, so
        # the key blocks after it (the tiles above the diagonal) are skipped.
        end = min(S, offset + i1) if is_causal else S
        for j0 in range(0, end, block_k):
            j1 = min(j0 + block_k, S)
            k_t = k[..., j0:j1, :].to(acc)                                              # (B, H_kv, bk, D)
            v_t = v[..., j0:j1, :].to(acc)                                              # (B, H_kv, bk, D_v)
            scores = (rows @ k_t.transpose(-2, -1)) * scale                             # (B, H_kv, q_per_kv * bq, bk)
            scores = scores.unflatten(-2, (q_per_kv, i1 - i0))                          # (B, H_kv, q_per_kv, bq, bk)
            if masks is not None:
                tile = masks[..., i0:i1, j0:j1]
                if tile.dtype == torch.bool:
                    scores = scores.masked_fill(~tile, float("-inf"))
                else:
                    scores = scores + tile.to(acc)
            if is_causal and j1 - 1 > offset + i0:
                # The tile straddles the diagonal: key j is hidden from query i when j > offset + i.
                query_pos = torch.arange(offset + i0, offset + i1, device=q.device)     # (bq,)
                key_pos = torch.arange(j0, j1, device=q.device)                         # (bk,)
                scores = scores.masked_fill(key_pos > query_pos.unsqueeze(-1), float("-inf"))
            m, l, o = online_softmax_step(m, l, o, scores.flatten(-3, -2), v_t)
        o, block_lse = online_softmax_result(m, l, o)                                   # (B, H_kv, q_per_kv * bq, D_v)
        out[..., i0:i1, :] = o.unflatten(-2, (q_per_kv, i1 - i0))
        lse[..., i0:i1] = block_lse.unflatten(-1, (q_per_kv, i1 - i0))

    out, lse = out.flatten(-4, -3), lse.flatten(-3, -2)                                 # (B, H, T, D_v), (B, H, T)
    if added:
        out, lse = out.squeeze(0), lse.squeeze(0)
    return (out, lse) if return_lse else out


# --- 3. Flash-decoding: split the keys, merge by log-sum-exp -----------------------------------


def merge_partials(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attentions over disjoint slices of the keys into the attention over all of them.

    Slice a gave o_a (normalised over its own keys) and L_a, the log-sum-exp of
    its scores. Its share of the full softmax is exp(L_a - L) with
    L = log sum_b exp(L_b), so the merged output is sum_a exp(L_a - L) o_a,
    exactly. A slice whose keys were all masked (L_a = -inf) gets weight 0.

    Args:
        outs: the partial outputs, each (..., T, D_v).
        lses: their log-sum-exps, each (..., T).

    Returns:
        The merged output (..., T, D_v) in the dtype of the first partial output,
        and the merged log-sum-exp (..., T) in float32 (float64 if given).
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"need as many log-sum-exps as outputs, at least one, got {len(outs)} and {len(lses)}")
    for a, (o, s) in enumerate(zip(outs, lses)):
        if o.shape[:-1] != s.shape or o.shape != outs[0].shape:
            raise ValueError(
                f"partial {a}: output {tuple(o.shape)} and log-sum-exp {tuple(s.shape)} must be (..., T, D_v) "
                f"and (..., T), like partial 0's output {tuple(outs[0].shape)}"
            )
    acc = torch.promote_types(_accumulator(outs[0].dtype), _accumulator(lses[0].dtype))
    L_a = torch.stack([s.to(acc) for s in lses])                                        # (slices, ..., T)
    L = torch.logsumexp(L_a, dim=0)                                                     # (..., T)
    weight = torch.exp(L_a - L.masked_fill(L == float("-inf"), 0.0))                    # (slices, ..., T)
    out = (weight.unsqueeze(-1) * torch.stack([o.to(acc) for o in outs])).sum(0)        # (..., T, D_v)
    return out.to(outs[0].dtype), L


def split_kv_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    splits: int,
    *,
    block_size: int = 64,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Flash-decoding: attend to ``splits`` slices of the keys independently, then merge by log-sum-exp.

    On a GPU each slice runs on its own processors at once, so even one
    query row per head keeps the whole GPU busy; here they run one after the
    other, to show that the merge (:func:`merge_partials`) is exact. Each slice
    is an :func:`online_softmax_attention`. The slices are as equal as
    possible (``torch.tensor_split``).

    Every query sees every key, as a decode step's one new token does (it
    comes after everything in the cache). For several new tokens with a causal
    mask, use :func:`tiled_attention`.

    Args:
        q: queries (B, H, T, D), typically T = 1.
        k: the cache's keys (B, H_kv, S, D), H divisible by H_kv.
        v: the cache's values (B, H_kv, S, D_v).
        splits: number of slices, 1 to S.
        block_size: keys per block within a slice.
        scale: multiplies the scores; default 1 / sqrt(D).
        return_lse: also return the merged log-sum-exp (B, H, T).

    Returns:
        The output (B, H, T, D_v) in the dtype of q, and with ``return_lse`` the log-sum-exp.
    """
    _check_qkv(q, k, v)
    S = k.shape[-2]
    if not isinstance(splits, int) or isinstance(splits, bool) or not 1 <= splits <= S:
        raise ValueError(f"splits must be an integer from 1 to the number of keys S ({S}), got {splits!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    outs, lses = [], []
    for k_a, v_a in zip(k.tensor_split(splits, dim=-2), v.tensor_split(splits, dim=-2)):  # views of the cache
        o_a, L_a = online_softmax_attention(q, k_a, v_a, block_size=block_size, scale=scale, return_lse=True)
        outs.append(o_a)                                                                # (B, H, T, D_v)
        lses.append(L_a)                                                                # (B, H, T)
    out, lse = merge_partials(outs, lses)
    return (out, lse) if return_lse else out


def decode_splits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Into how many slices of the keys kqv's fused path splits this decode step on a CPU (1: none).

    What ``scaled_dot_product_attention(q, k, v, fused=True)`` does for
    attention without a mask (a decode step's one new token sees every key):
    PyTorch's CPU kernel gives each thread whole (batch, KV head, block of 32
    query rows) items, so a step with fewer items than threads (MQA, absorbed
    MLA: one KV head) leaves cores idle. kqv then splits the keys into as
    many slices as it takes to keep every thread busy, at least 512 keys each,
    and merges them by log-sum-exp, as :func:`split_kv_decode` does. Returns 1
    off the CPU, where PyTorch's own kernels decide.

    Args:
        q: queries (B, H, T, D), typically T = 1.
        k: keys (B, H_kv, S, D), H divisible by H_kv.
        v: values (B, H_kv, S, D_v).
    """
    q_per_kv = _check_qkv(q, k, v)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, H, T, D) and (B, H_kv, S, D)")
    rows = _fold(q, q_per_kv) if q_per_kv > 1 else q                                  # (B, H_kv, q_per_kv * T, D)
    return _kv_splits(rows, k, v, None)


# --- 4. Measurements -------------------------------------------------------------------------


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storage that operations create while it is active, and their peak.

    Every PyTorch operation passes through ``__torch_dispatch__``. An output
    whose storage is not one of the operation's inputs' is a new allocation
    (views, in-place results and no-op conversions share their input's
    storage and are not counted); its bytes count until the storage is freed.
    What a kernel allocates for itself and frees before returning is not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        result = func(*args, **kwargs)
        for t in tree_leaves(result):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in inputs:
                continue
            inputs.add(storage.data_ptr())                   # two outputs of one storage count once
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, storage.nbytes())
        return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """The most bytes that ``fn()`` holds at once in tensors it creates (its result included).

    On CUDA: ``torch.cuda.max_memory_allocated`` during the call, less what was
    allocated before it (everything the caching allocator handed out,
    workspaces of the kernels included). Elsewhere: every storage that an
    operation creates, counted from its creation to its release (a
    ``TorchDispatchMode``); exact and deterministic for code made of PyTorch
    operations, blind to scratch memory a single kernel allocates and frees
    inside itself. Inputs that exist before the call are not counted.
    """
    device = torch.device(device)
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        _synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return int(peak)
    with _LiveBytes() as tracker:
        result = fn()
        _synchronize(device)
    del result
    return tracker.peak


@torch.no_grad()
def attention_memory(
    lengths: Iterable[int] = (256, 512, 1024, 2048),
    *,
    num_heads: int = 8,
    num_kv_heads: int | None = None,
    head_dim: int = 64,
    batch_size: int = 1,
    block_q: int = 64,
    block_k: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
) -> list[dict]:
    """Peak memory of causal self-attention over T tokens, eager against tiled, for each T.

    The eager path is :func:`kqv.scaled_dot_product_attention` (``fused=False``):
    it materialises the (B, H, T, T) scores, the mask and the weights, so its
    peak grows as T^2. :func:`tiled_attention` holds the output and one tile:
    its peak grows as T. Both are measured with :func:`peak_memory`, inputs
    excluded, each after one unmeasured call (so that one-time allocations,
    such as a GPU matmul library's workspace, are not counted).

    Returns:
        One dict per T: ``T``, ``eager_bytes``, ``tiled_bytes``,
        ``scores_bytes`` (one (B, H, T, T) matrix in ``dtype``),
        ``output_bytes`` ((B, H, T, D) in ``dtype``), and both outputs'
        largest difference ``max_abs_diff`` (they compute the same thing).
    """
    lengths = [int(T) for T in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be positive, got {lengths}")
    device = torch.device(device)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if seed is not None:
        torch.manual_seed(seed)
    e = dtype.itemsize
    rows = []
    for T in lengths:
        q = torch.randn(batch_size, num_heads, T, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch_size, num_kv_heads, T, head_dim, device=device, dtype=dtype) for _ in "kv")
        results = {}

        def eager():
            results["eager"] = scaled_dot_product_attention(q, k, v, is_causal=True)
            return results["eager"]

        def tiled():
            results["tiled"] = tiled_attention(q, k, v, is_causal=True, block_q=block_q, block_k=block_k)
            return results["tiled"]

        eager(), tiled()                                                                # warm up
        eager_bytes, tiled_bytes = peak_memory(eager, device), peak_memory(tiled, device)
        diff = (results["eager"].double() - results["tiled"].double()).abs().max().item()
        rows.append(
            {
                "T": T,
                "eager_bytes": eager_bytes,
                "tiled_bytes": tiled_bytes,
                "scores_bytes": batch_size * num_heads * T * T * e,
                "output_bytes": batch_size * num_heads * T * head_dim * e,
                "max_abs_diff": diff,
            }
        )
    return rows


def attention_intensity(
    config: ModelConfig,
    T: int,
    S: int | None = None,
    *,
    batch_size: int = 1,
    dtype: torch.dtype | str = torch.bfloat16,
    is_causal: bool = True,
) -> dict:
    """FLOPs, bytes and FLOPs per byte of one layer's attention: T new tokens against S.

    Prefill is T = S (the prompt against itself), decode T = 1 against the
    cache. Counted for a kernel that reads q, K and V once and writes the
    output once (FlashAttention's I/O; the scores never leave the chip):

    - FLOPs: 2 * B * H * pairs * (D_k + D_v), for q k^T and the weighted sum of
      values, where ``pairs`` counts the (query, key) pairs attended (T * S, or
      the bottom-right causal triangle's T * (S - T) + T * (T + 1) / 2).
    - bytes: (B * H * T * (D_k + D_v) + B * S * cache numbers per token) * element size.

    For GQA, MQA and MHA the cache holds K and V for each of H_kv heads
    (2 * H_kv * D numbers per token). For MLA the count is for the absorbed
    form FlashMLA runs: H query heads of width d_c + d_r against one latent
    head, the first d_c numbers of which serve as the values, read once
    (d_c + d_r numbers per token; in DeepSeek-V3, 576 with 512-wide values).
    Decode then does about H * (d_c + d_r + d_c) / (d_c + d_r) FLOPs per
    byte in bfloat16, FlashMLA's own estimate of "about 2 h_q s_q" (its
    docs/20250422-new-kernel-deep-dive.md, which finds decode compute-bound
    on an H800 once h_q s_q reaches 128, as with DeepSeek-V3's 128 heads).

    Decode reads every cached number for a handful of FLOPs: its intensity is
    about 2 * q_per_kv / element size (q_per_kv in bfloat16), whatever S is.
    Prefill reuses each key for T queries: its intensity grows with T.

    Returns:
        A dict: ``T``, ``S``, ``flops``, ``bytes``, ``flops_per_byte``, ``q_per_kv``.
    """
    S = T if S is None else S
    if T < 1 or S < 1 or batch_size < 1:
        raise ValueError(f"need T >= 1, S >= 1 and batch_size >= 1, got T={T}, S={S}, batch_size={batch_size}")
    if is_causal and T > S:
        raise ValueError(f"causal attention needs at least as many keys as queries, got T={T}, S={S}")
    e = dtype_bytes(dtype)
    B, H = batch_size, config.num_heads
    if config.is_mla:
        d_c, d_r = config.kv_lora_rank, config.qk_rope_head_dim
        D_k, D_v, cache_numbers, q_per_kv = d_c + d_r, d_c, d_c + d_r, H        # one latent KV head
    else:
        D_k = D_v = config.head_dim
        cache_numbers, q_per_kv = 2 * config.num_kv_heads * config.head_dim, config.q_per_kv
    pairs = T * (S - T) + T * (T + 1) // 2 if is_causal else T * S
    flops = 2 * B * H * pairs * (D_k + D_v)
    nbytes = (B * H * T * (D_k + D_v) + B * S * cache_numbers) * e
    return {"T": T, "S": S, "flops": flops, "bytes": nbytes, "flops_per_byte": flops / nbytes, "q_per_kv": q_per_kv}


def prefill_decode_intensity(
    config: ModelConfig, lengths: Iterable[int], *, dtype: torch.dtype | str = torch.bfloat16
) -> list[dict]:
    """For each length n: the intensity of prefilling n tokens and of decoding one token after n.

    Returns one dict per n: ``tokens``, ``prefill`` and ``decode`` (FLOPs per
    byte, from :func:`attention_intensity`), for a plot of both against n.
    """
    return [
        {
            "tokens": n,
            "prefill": attention_intensity(config, n, n, dtype=dtype)["flops_per_byte"],
            "decode": attention_intensity(config, 1, n, dtype=dtype)["flops_per_byte"],
        }
        for n in (int(n) for n in lengths)
    ]


@torch.inference_mode()
def generation_times(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int = 16,
    repeats: int = 5,
    warmup: int = 1,
) -> dict:
    """Time to first token and time per output token of greedy generation with a :class:`kqv.model.Decoder`.

    What :meth:`kqv.model.Decoder.generate` does with its cache, timed step by
    step: the time to first token (TTFT) is the prefill (the whole prompt in
    one forward pass, into a new cache) and the choice of the first token; each
    later step (one token through the model, reading the cache) is one time
    per output token (TPOT). Prefill does T tokens' work per weight and cache
    number read, a decode step one: TTFT grows with the prompt, TPOT barely.

    Args:
        model: a Decoder (for example SmolLM2 from :func:`kqv.smollm2.load_smollm2`).
        input_ids: the prompt (B, T), on the model's device.
        max_new_tokens: tokens generated per repeat (at least 2: one from the
            prefill, the rest from decode steps).
        repeats: timed generations; ``warmup`` untimed ones run before them.

    Returns:
        A dict: ``prompt_tokens``, ``new_tokens``, ``ttft_seconds`` (median over
        repeats), ``tpot_seconds`` (median over every decode step of every
        repeat), ``ttft_times`` and ``tpot_times`` (all of them), and
        ``tokens`` (B, T + max_new_tokens), the last repeat's output.
    """
    if max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be at least 2 (one prefill, one decode step), got {max_new_tokens}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
    device = input_ids.device
    B, T = input_ids.shape
    ttft, tpot = [], []
    for run in range(warmup + repeats):
        cache = model.new_cache(B, T + max_new_tokens)
        _synchronize(device)
        start = time.perf_counter()
        token = model(input_ids, cache=cache)[:, -1].argmax(-1)                        # (B,)
        _synchronize(device)
        first = time.perf_counter() - start
        tokens, steps = [token], []
        for _ in range(max_new_tokens - 1):
            start = time.perf_counter()
            token = model(token[:, None], cache=cache)[:, -1].argmax(-1)                # (B,)
            _synchronize(device)
            steps.append(time.perf_counter() - start)
            tokens.append(token)
        if run >= warmup:
            ttft.append(first)
            tpot.extend(steps)
    return {
        "prompt_tokens": T,
        "new_tokens": max_new_tokens,
        "ttft_seconds": statistics.median(ttft),
        "tpot_seconds": statistics.median(tpot),
        "ttft_times": ttft,
        "tpot_times": tpot,
        "tokens": torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1),            # (B, T + max_new_tokens)
    }
