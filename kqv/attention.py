"""Scaled dot-product attention and one module for MHA, GQA and MQA.

The search-engine picture of chapter 1 in one line: each query scores every
key by a dot product, the scores become weights by a softmax, and the answer is
the weighted sum of the values::

    Attention(Q, K, V) = softmax(Q K^T / sqrt(D)) V

Shapes follow the legend in :mod:`kqv`: queries (B, H, T, D), keys and values
(B, H_kv, S, D). When H_kv < H, each KV head serves a group of
``q_per_kv = H / H_kv`` consecutive query heads (grouped-query attention)::

    query heads   q0 q1 q2 q3 q4 q5 q6 q7        H    = 8
                  \\___/ \\___/ \\___/ \\___/
    KV heads        k0    k1    k2    k3         H_kv = 4, q_per_kv = 2

    H_kv == H  ->  multi-head attention (MHA, chapter 3)
    H_kv == 1  ->  multi-query attention (MQA, chapter 6)
    otherwise  ->  grouped-query attention (GQA, chapter 7)

Two paths compute the same thing. The eager path spells out every step and can
return the weights (for plots); the fused path hands the work to PyTorch's
``scaled_dot_product_attention`` (FlashAttention-style kernels where the
device has them). Neither copies K/V once per query head. Both fold a group
into the query axis: the q_per_kv query heads of a group, T rows each, become
q_per_kv * T rows against their one KV head, an ordinary attention of shape
(B, H_kv, q_per_kv * T, D) by (B, H_kv, S, D). (Broadcasting instead, with
queries (B, H_kv, q_per_kv, T, D) against keys (B, H_kv, 1, S, D), looks
free but is not: ``torch.matmul`` expands the keys over the q_per_kv axis and
reshapes them for a batched matmul, which copies K, and then V, q_per_kv
times.) On a GPU, causal attention without a mask goes to the flash kernel,
which reads each KV head once for its whole group by itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import Cache, KVCache
from .rope import apply_rope, rope_angles

__all__ = [
    "causal_mask",
    "repeat_kv",
    "scaled_dot_product_attention",
    "resolve_positions",
    "check_input",
    "Attention",
]


def causal_mask(T: int, S: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask (T, S), True where a query may look: the last T of S tokens are new.

    The mask is aligned bottom-right: new query i sits at position S - T + i and
    sees keys 0 .. S - T + i. For a full prefill (T == S) this is the usual
    lower triangle; for one decode query (T == 1) it is a row of all True.
    (PyTorch's ``is_causal=True`` aligns top-left, so one decode query would see
    only key 0: right for prefill, wrong for a cache.)
    """
    if T > S:
        raise ValueError(f"causal attention needs at least as many keys as queries, got T={T}, S={S}")
    rows = torch.arange(T, device=device).unsqueeze(1) + (S - T)   # (T, 1) absolute positions
    cols = torch.arange(S, device=device).unsqueeze(0)             # (1, S)
    return cols <= rows                                            # (T, S)


def repeat_kv(x: torch.Tensor, q_per_kv: int) -> torch.Tensor:
    """Copy each KV head ``q_per_kv`` times: (B, H_kv, S, D) -> (B, H, S, D).

    ``repeat_interleave``, not ``repeat``: query heads 0 and 1 share KV head 0,
    so the copies must come out as [K0, K0, K1, K1], not [K0, K1, K0, K1].
    kqv never needs this on its own paths; it is the reference the tests and
    the benchmark compare against, and what many implementations do.
    """
    return x.repeat_interleave(q_per_kv, dim=-3)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Validate shapes, dtypes and devices; return q_per_kv (1 without heads)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() < 2:
            raise ValueError(f"{name} needs at least 2 dimensions (tokens, width), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"queries have width D={q.shape[-1]} but keys have width {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"keys hold S={k.shape[-2]} tokens but values hold {v.shape[-2]}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} disagree before the last axis")
    if q.dim() >= 3 and k.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        H, H_kv = q.shape[-3], k.shape[-3]
        if H % H_kv:
            raise ValueError(
                f"the number of query heads H ({H}) must be divisible by the number of KV heads H_kv ({H_kv})"
            )
        if q.dim() != k.dim() or q.shape[:-3] != k.shape[:-3]:
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree before the head axis")
        return H // H_kv
    return 1


def _full_mask(
    mask: torch.Tensor | None, is_causal: bool, T: int, S: int, device: torch.device
) -> torch.Tensor | None:
    """Combine a user mask (bool: True = attend; or float: added) with the causal one."""
    if not is_causal:
        return mask
    causal = causal_mask(T, S, device)
    if mask is None:
        return causal
    if mask.dtype == torch.bool:
        return mask & causal
    return mask.masked_fill(~causal, float("-inf"))


def _fold(x: torch.Tensor, q_per_kv: int) -> torch.Tensor:
    """(..., H, T, X) -> (..., H_kv, q_per_kv * T, X): each group's query heads stacked as rows.

    Query head h = g * q_per_kv + j, row t becomes row j * T + t of KV head g,
    the grouping of :func:`repeat_kv`. A view when x is contiguous; otherwise
    a copy of x only (queries or masks, never keys or values).
    """
    return x.unflatten(-3, (-1, q_per_kv)).flatten(-3, -2)


def _unfold(x: torch.Tensor, q_per_kv: int, T: int) -> torch.Tensor:
    """(..., H_kv, q_per_kv * T, X) -> (..., H, T, X): the inverse of :func:`_fold`."""
    return x.unflatten(-2, (q_per_kv, T)).flatten(-4, -3)


def _fold_mask(mask: torch.Tensor, q_per_kv: int, T: int, S: int) -> torch.Tensor:
    """A mask broadcastable to (B, H, T, S), laid out for folded rows (:func:`_fold`).

    A mask that differs between query heads is folded like the queries. One
    that is the same for every head (a head axis of size 1, or none, as the
    causal mask (T, S)) becomes its T rows tiled q_per_kv times,
    (..., q_per_kv * T, S): one mask that every KV head shares, never expanded
    over batch or heads.
    """
    mask = mask.expand(*mask.shape[:-2], T, S)                     # (..., T, S), a view
    if mask.dim() >= 3 and mask.shape[-3] > 1:                     # one mask per query head
        return _fold(mask, q_per_kv)                               # (..., H_kv, q_per_kv*T, S)
    tiled = mask.unsqueeze(-3).expand(*mask.shape[:-2], q_per_kv, T, S)
    return tiled.flatten(-3, -2)                                   # (..., q_per_kv*T, S)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
    fused: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v, for any number of query and KV heads.

    Args:
        q: queries (B, H, T, D); any leading axes, or none: (T, D) is one head.
        k: keys (B, H_kv, S, D), with H divisible by H_kv.
        v: values (B, H_kv, S, D_v).
        mask: boolean (True = may attend) or additive float, broadcastable to
            (B, H, T, S).
        is_causal: also hide the future, aligned bottom-right (the last T of the
            S keys are the queries' own tokens); see :func:`causal_mask`.
        scale: multiplies the scores; default 1 / sqrt(D).
        return_weights: also return the attention weights (B, H, T, S) (eager only).
        fused: use PyTorch's fused kernel instead of the readable eager path.

    Returns:
        The output (B, H, T, D_v) in the dtype of q, and with ``return_weights``
        the weights as well.
    """
    q_per_kv = _check_qkv(q, k, v)
    T, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if is_causal and T > S:
        raise ValueError(f"causal attention needs at least as many keys as queries, got T={T}, S={S}")
    if is_causal and T == 1:
        # Decoding: the one new token comes after every key it attends to, so its
        # causal mask is all True; leave it out.
        is_causal = False
    if fused:
        if return_weights:
            raise ValueError("the fused kernel does not expose its weights; use fused=False")
        return _fused(q, k, v, mask, is_causal, scale, q_per_kv)

    full = _full_mask(mask, is_causal, T, S, q.device)
    # Each group's query heads become rows against their KV head, so K and V
    # are read as they are (broadcasting them instead would copy them; see the
    # module docstring). Masks and softmax see the same numbers as (B, H, T, S).
    if q_per_kv > 1:
        q = _fold(q, q_per_kv)                                       # (B, H_kv, q_per_kv*T, D)
    scores = (q @ k.transpose(-2, -1)) * scale                       # (B, H_kv, q_per_kv*T, S)
    if q_per_kv > 1:
        scores = _unfold(scores, q_per_kv, T)                        # (B, H, T, S), a view
    if full is not None:
        if full.dtype == torch.bool:
            scores = scores.masked_fill(~full, float("-inf"))
        else:
            scores = scores + full
    # Softmax in at least float32: half-precision exponentials lose the small
    # weights. float64 stays float64.
    exact = torch.promote_types(scores.dtype, torch.float32)
    weights = torch.softmax(scores.to(exact), dim=-1).to(q.dtype)    # (B, H, T, S)
    w = _fold(weights, q_per_kv) if q_per_kv > 1 else weights        # (B, H_kv, q_per_kv*T, S), a view
    out = w @ v                                                      # (B, H_kv, q_per_kv*T, D_v)
    if q_per_kv > 1:
        out = _unfold(out, q_per_kv, T)                              # (B, H, T, D_v)
    return (out, weights) if return_weights else out


def _flash_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_per_kv: int) -> bool:
    """Whether PyTorch's CUDA flash kernel accepts these inputs as they are (groups included).

    It needs a GPU that has it, half precision, a head width it supports, and
    no mask tensor; then it masks causally by itself and reads each KV head
    once for its group (``enable_gqa``).
    """
    if q.device.type != "cuda" or q.dim() != 4:
        return False
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, q_per_kv > 1)
    return torch.backends.cuda.can_use_flash_attention(params)


def _fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    q_per_kv: int,
) -> torch.Tensor:
    """PyTorch's fused attention, fed so that it never repeats K/V per query head."""
    T, S = q.shape[-2], k.shape[-2]
    gqa = q_per_kv > 1
    if is_causal and mask is None and _flash_takes(q, k, v, q_per_kv):
        # Prefill on a GPU: the flash kernel needs no mask tensor and handles
        # groups natively. PyTorch's is_causal aligns top-left, right only for a
        # full prefill (T == S); a chunk of a longer prompt (T < S) needs the
        # bottom-right triangle, which causal_lower_right gives to the same kernel.
        if T == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        # Imported here: the module imports torch._dynamo, a second at startup.
        from torch.nn.attention.bias import causal_lower_right

        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, S), scale=scale, enable_gqa=gqa)
    if not gqa:
        if is_causal and T == S and mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return _fused_kernel(q, k, v, _full_mask(mask, is_causal, T, S, q.device), scale)
    # Fold the group into the query axis: a group's q_per_kv * T query rows all
    # attend to the same KV head, so (B, H_kv, q_per_kv * T, D) against
    # (B, H_kv, S, D) is one ordinary attention per KV head. The mask follows
    # the rows: a mask shared by the heads (the causal one) is tiled, not expanded.
    full = _full_mask(mask, is_causal, T, S, q.device)
    if full is not None:
        full = _fold_mask(full, q_per_kv, T, S)                      # (..., q_per_kv*T, S)
    out = _fused_kernel(_fold(q, q_per_kv), k, v, full, scale)       # (B, H_kv, q_per_kv*T, D_v)
    return _unfold(out, q_per_kv, T)                                 # (B, H, T, D_v)


def _fused_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, or on a CPU its kernel over slices of the keys (:func:`_split_kv`)."""
    splits = _kv_splits(q, k, v, mask)
    if splits > 1:
        return _split_kv(q, k, v, scale, splits)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# PyTorch's CPU flash-attention kernel, called directly because it also returns
# the log-sum-exp of each query's scores, which merging slices needs.
_cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _kv_splits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> int:
    """Into how many slices of the keys to split a CPU attention (1: do not split).

    PyTorch's CPU kernel gives each thread whole (batch, head, block of 32 query
    rows) items. Decoding with few KV heads (MQA, absorbed MLA) makes fewer items
    than threads: with one KV head and one block of queries, one core works and
    the others wait. Splitting the keys makes more items. Only unmasked
    attention of one batch row or one KV head, equal key and value widths and
    at least 512 keys per slice qualifies.
    """
    if _cpu_flash is None or q.device.type != "cpu" or mask is not None or q.dim() != 4:
        return 1
    B, H_kv, R, _ = q.shape
    S = k.shape[-2]
    if (B != 1 and H_kv != 1) or R > 32 or k.shape[-1] != v.shape[-1]:
        return 1
    splits = min(torch.get_num_threads() // (B * H_kv), S // 512)
    return splits if splits > 1 else 1


def _split_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, splits: int) -> torch.Tensor:
    """Attend to ``splits`` slices of the keys at once, then merge: flash-decoding on a CPU.

    q (B, H_kv, R, D) against k, v (B, H_kv, S, D), with B or H_kv equal to 1
    (the slices take that axis's place, so they stay views of the cache).
    Each slice s gives an output o_s normalized over its own keys and the
    log-sum-exp l_s of its scores; the full softmax weighs slice s by
    exp(l_s) / sum_s' exp(l_s'), that is, softmax over the l_s.
    """
    B, H_kv, R, D = q.shape
    S = k.shape[-2]
    size = S // splits
    ax = 0 if B == 1 else 1                                              # the size-1 axis

    def slices(x: torch.Tensor, start: int, n: int, length: int) -> torch.Tensor:
        return x.narrow(-2, start, n * length).squeeze(ax).unflatten(-2, (n, length))  # (B*H_kv, n, length, D)

    parts = [(slices(k, 0, splits, size), slices(v, 0, splits, size))]
    if splits * size < S:                                                # the few keys left over
        rest = S - splits * size
        parts.append((slices(k, splits * size, 1, rest), slices(v, splits * size, 1, rest)))
    outs, lses = [], []
    for k_s, v_s in parts:
        q_s = q.squeeze(ax).unsqueeze(1).expand(-1, k_s.shape[1], R, D)  # (B*H_kv, n, R, D), no copy
        out, lse = _cpu_flash(q_s, k_s, v_s, scale=scale)                # (B*H_kv, n, R, D_v), (B*H_kv, n, R)
        outs.append(out)
        lses.append(lse)
    exact = torch.promote_types(q.dtype, torch.float32)                  # float32, or float64 for float64
    weight = torch.softmax(torch.cat(lses, 1).to(exact), dim=1)          # (B*H_kv, slices, R)
    out = (torch.cat(outs, 1).to(exact) * weight.unsqueeze(-1)).sum(1)   # (B*H_kv, R, D_v)
    return out.unsqueeze(ax).to(q.dtype)                                 # (B, H_kv, R, D_v)


def resolve_positions(
    positions: torch.Tensor | None,
    B: int,
    T: int,
    start: int | torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Absolute positions of T new tokens, (T,) or (B, T), checked against a cache.

    ``start`` is the cache's :attr:`~kqv.cache.Cache.next_position` (None
    without a cache): how many tokens it already holds, or a (B,) tensor of
    them when its sequences have different lengths (a paged cache). The new
    tokens are written after them, so they must sit at start .. start + T - 1.
    Without a cache any positions are accepted.
    """
    steps = torch.arange(T, device=device)
    if isinstance(start, torch.Tensor):
        expected = start.to(device).unsqueeze(1) + steps                   # (B, T): one row per sequence
    else:
        expected = steps + (start or 0)                                    # (T,)
    if positions is None:
        return expected
    if positions.is_floating_point():
        raise TypeError(f"positions must be integers, got dtype {positions.dtype}")
    if positions.shape not in ((T,), (B, T)):
        raise ValueError(f"positions must have shape ({T},) or ({B}, {T}), got {tuple(positions.shape)}")
    positions = positions.to(device)
    if start is not None and not bool((positions == expected).all()):
        got = positions.flatten()[:4].tolist()
        if isinstance(start, torch.Tensor):  # one start per sequence
            held, want = start.tolist(), f"each sequence's {start.tolist()} + 0..{T - 1}"
        else:
            held, want = start, f"{start}..{start + T - 1}"
        raise ValueError(
            f"positions must continue the cache, which holds {held} tokens: expected "
            f"{want}, got {got}{'...' if positions.numel() > 4 else ''}"
        )
    return positions


def check_input(
    x: torch.Tensor,
    hidden_size: int,
    positions: torch.Tensor | None,
    cache: Cache | None,
    angles: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """Check an attention module's input x (B, T, hidden) and return the new tokens' positions.

    With ``angles`` (RoPE cosines and sines that a caller such as
    :class:`kqv.model.Decoder` computed once for all its layers, from positions
    it has resolved itself) the positions are not needed: only the angles'
    number of tokens is checked, and None is returned.
    """
    if x.dim() != 3 or x.shape[-1] != hidden_size:
        raise ValueError(f"x must have shape (B, T, {hidden_size}), got {tuple(x.shape)}")
    B, T, _ = x.shape
    start = None
    if cache is not None:
        if cache.batch_size != B:
            raise ValueError(f"the cache holds batch size {cache.batch_size}, x has {B}")
        start = cache.next_position
    if angles is not None:
        if angles[0].shape[-2] != T:
            raise ValueError(f"the RoPE angles cover {angles[0].shape[-2]} tokens, x has T={T}")
        return None
    return resolve_positions(positions, B, T, start, x.device)


class Attention(nn.Module):
    """Causal self-attention with H query heads and H_kv key/value heads.

    One knob, ``num_kv_heads``, spans the family: ``num_heads`` gives MHA
    (the default), 1 gives MQA, anything that divides ``num_heads`` gives GQA.
    Parameters have the shapes of Hugging Face's ``LlamaAttention``, so a
    Llama-family checkpoint's tensors load unchanged::

        q_proj: (H * D, hidden)      k_proj, v_proj: (H_kv * D, hidden)
        o_proj: (hidden, H * D)

    Args:
        hidden_size: the model width.
        num_heads: H, query heads.
        num_kv_heads: H_kv, key/value heads (default H).
        head_dim: D (default hidden_size / H).
        rope_theta: apply RoPE (Llama's rotate-half pairs) with this base; None for none.
        bias: biases on all four projections (Llama's ``attention_bias``).
        fused: run PyTorch's fused kernel (default) or the readable eager path.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        rope_theta: float | None = None,
        bias: bool = False,
        fused: bool = True,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1:
            raise ValueError(f"num_heads ({num_heads}) and num_kv_heads ({num_kv_heads}) must be positive")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})"
            )
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(
                    f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}) "
                    f"unless head_dim is given"
                )
            head_dim = hidden_size // num_heads
        if rope_theta is not None and head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_per_kv = num_heads // num_kv_heads
        self.rope_theta = rope_theta
        self.fused = fused
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"rope_theta={self.rope_theta}, fused={self.fused}"
        )

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty :class:`~kqv.cache.KVCache` (B, H_kv, S_max, D), on this module's device and dtype by default."""
        w = self.k_proj.weight
        return KVCache(
            batch_size, self.num_kv_heads, max_len, self.head_dim,
            dtype=dtype or w.dtype, device=device or w.device,
        )

    def rope_angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE's (cos, sin) for these positions, each (T, D/2) or (B, T, D/2); None without RoPE."""
        if self.rope_theta is None:
            return None
        return rope_angles(positions, self.head_dim, self.rope_theta)

    def project(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        angles: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries for the new tokens and keys/values for every token (cached ones too).

        ``angles``: this module's :meth:`rope_angles` of the new tokens'
        positions, if the caller has them (a :class:`~kqv.model.Decoder`
        computes them once per step for all its layers); ``positions`` is then
        not used.

        Returns q (B, H, T, D) and k, v (B, H_kv, S, D), where S counts the
        cached tokens plus the T new ones.
        """
        positions = check_input(x, self.hidden_size, positions, cache, angles)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        if self.rope_theta is not None:
            cos, sin = angles or self.rope_angles(positions)                             # (T, D/2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)                                                    # (B, H_kv, S, D)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        angles: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, hidden), causal, appending to ``cache`` if given (see :meth:`project`)."""
        q, k, v = self.project(x, positions, cache, angles=angles)
        # The cache knows where its keys sit (in order, in blocks, in a window): it attends.
        attend = scaled_dot_product_attention if cache is None else cache.attend
        out = attend(q, k, v, is_causal=True, fused=self.fused)                          # (B, H, T, D)
        B, T = x.shape[:2]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The causal attention weights (B, H, T, T) of a forward pass over x, for plots."""
        q, k, v = self.project(x, positions)
        _, weights = scaled_dot_product_attention(q, k, v, is_causal=True, return_weights=True)
        return weights
