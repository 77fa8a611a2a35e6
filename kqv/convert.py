"""Converting a trained GQA model to a smaller cache, without training it again.

Each conversion takes a :class:`kqv.model.Decoder` and returns a new one (the
input is left untouched) whose cache really holds fewer numbers per token:

- :func:`pool_kv_heads` / :func:`gqa_to_mqa`: fewer KV heads. Each new KV head
  is the mean of the old ones in its group, as Ainslie et al. (2023) convert
  MHA checkpoints to GQA. Cache: ``2 * H_kv * D`` numbers per token per layer.
- :func:`gqa_to_latent`: a low-rank latent cache. The key and value
  projections of a layer are factorized jointly, ``[W_k; W_v] ~ W_up W_down``;
  the cache keeps ``c = W_down x`` (d_c numbers per token per layer) and K, V
  are rebuilt as ``W_up c``. SmolLM2 rotates every coordinate of every key, so
  the rotation sits between ``W_up`` and the query: the latent cannot be
  absorbed, and every step must rebuild and re-rotate every cached key
  (:class:`LatentKVAttention`).
- :func:`gqa_to_decoupled_latent`: DeepSeek's way out. Keep RoPE on only d_r
  coordinates of each key, the fastest-turning pairs, and cache them apart;
  compress the rest with the values. The unrotated part of each query can then
  absorb ``W_up`` and attend straight against the latent
  (:class:`DecoupledRopeLatentAttention`). The price: the other pairs lose
  their rotation, a change to the model that no factorization can undo.

No conversion here is trained afterwards. Ainslie et al. uptrain with about 5%
of the original pretraining compute to win back what pooling loses, and the
methods that turn pretrained models into latent attention fine-tune as well;
the numbers measured with these functions are the cost before any of that.

Shapes follow the legend in :mod:`kqv` (d_c is the latent width, d_r the RoPE
width kept per key).

Book: chapters 6 and 7 (pooling), chapter 8 (latent cache, decoupled RoPE,
absorption), chapter 9 (the measurements side by side), chapter 12 (repaired).
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import torch
from torch import nn

from .attention import Attention, causal_mask, check_input, scaled_dot_product_attention
from .cache import Cache
from .rope import apply_rope, rope_angles

__all__ = [
    "LatentKVCache",
    "LatentKVAttention",
    "DecoupledRopeLatentAttention",
    "fit_kv_group",
    "pool_kv_heads",
    "gqa_to_mqa",
    "joint_low_rank",
    "attention_inputs",
    "gqa_to_latent",
    "gqa_to_decoupled_latent",
]


# --- The cache -------------------------------------------------------------------


class LatentKVCache(Cache):
    """A latent cache: per token, a latent c (d_c) and, if d_r > 0, RoPE keys (H_kv, d_r).

    Buffers ``latent`` (B, S_max, d_c) and, for decoupled RoPE, ``k_rope``
    (B, H_kv, S_max, d_r): ``d_c + H_kv * d_r`` numbers per token, which
    :attr:`~kqv.cache.Cache.bytes_per_token` counts exactly.

    Args:
        batch_size: B.
        kv_lora_rank: d_c.
        max_len: S_max.
        num_kv_heads: H_kv, the heads that own a RoPE key (only with ``rope_dim``).
        rope_dim: d_r, the rotated width of each key kept apart (0: none).
        dtype, device: of the buffers.
    """

    def __init__(
        self,
        batch_size: int,
        kv_lora_rank: int,
        max_len: int,
        *,
        num_kv_heads: int = 1,
        rope_dim: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if kv_lora_rank < 1 or rope_dim < 0 or num_kv_heads < 1:
            raise ValueError(
                f"need kv_lora_rank >= 1, rope_dim >= 0 and num_kv_heads >= 1, "
                f"got {kv_lora_rank}, {rope_dim} and {num_kv_heads}"
            )
        shapes: dict[str, tuple[int | None, ...]] = {"latent": (batch_size, None, kv_lora_rank)}
        if rope_dim:
            shapes["k_rope"] = (batch_size, num_kv_heads, None, rope_dim)
        super().__init__(shapes, max_len=max_len, dtype=dtype, device=device)
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim

    def update(
        self, latent: torch.Tensor, k_rope: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Append latent (B, T, d_c) [and k_rope (B, H_kv, T, d_r)]; return all S of each."""
        if self.rope_dim:
            if k_rope is None:
                raise ValueError(f"this cache keeps RoPE keys of width {self.rope_dim}; pass k_rope")
            return self.append(latent=latent, k_rope=k_rope)  # type: ignore[return-value]
        if k_rope is not None:
            raise ValueError("this cache keeps no RoPE keys (rope_dim=0), got k_rope")
        (latent_all,) = self.append(latent=latent)
        return latent_all


def _check_widths(hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, rank: int) -> None:
    for name, value in dict(hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                            head_dim=head_dim, kv_lora_rank=rank).items():
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")


# --- A latent cache under full RoPE: rebuild and rotate every key, every step ------


class LatentKVAttention(nn.Module):
    """GQA whose cache holds a latent c = W_down x; K and V are rebuilt from it each step.

    Per token and layer the cache keeps d_c numbers instead of ``2 * H_kv * D``::

        c      = kv_a_proj(x)                  (d_c)          cached
        [k; v] = kv_b_proj(c)                  (2 * H_kv * D) rebuilt for all S tokens
        k      = RoPE(k, position)             every key rotated again, every step

    ``kv_b_proj``'s rows are the keys of all KV heads, then their values (the
    stacked [W_k; W_v] that was factorized). Queries are as in
    :class:`kqv.Attention`. Because RoPE turns the whole key, ``q . RoPE(W_uk
    c)`` cannot be rewritten as ``(something fixed) . c``: there is no
    absorbed path, which is the reason for :class:`DecoupledRopeLatentAttention`.

    Args:
        hidden_size: the model width.
        num_heads: H.
        num_kv_heads: H_kv of the rebuilt keys and values.
        head_dim: D.
        kv_lora_rank: d_c, the cached width.
        rope_theta: RoPE base (rotate-half pairs, as Llama).
        fused: attend with PyTorch's fused kernel (True) or kqv's eager path.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        kv_lora_rank: int,
        *,
        rope_theta: float = 10000.0,
        fused: bool = True,
    ) -> None:
        super().__init__()
        _check_widths(hidden_size, num_heads, num_kv_heads, head_dim, kv_lora_rank)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_per_kv = num_heads // num_kv_heads
        self.kv_lora_rank = kv_lora_rank
        self.rope_theta = rope_theta
        self.fused = fused
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.kv_a_proj = nn.Linear(hidden_size, kv_lora_rank, bias=False)
        self.kv_b_proj = nn.Linear(kv_lora_rank, 2 * num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"kv_lora_rank={self.kv_lora_rank}, rope_theta={self.rope_theta}"
        )

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LatentKVCache:
        """An empty :class:`LatentKVCache` (B, S_max, d_c), on this module's device and dtype by default."""
        w = self.kv_a_proj.weight
        return LatentKVCache(batch_size, self.kv_lora_rank, max_len, dtype=dtype or w.dtype, device=device or w.device)

    def rope_angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's (cos, sin) for these positions, each (T, D/2)."""
        return rope_angles(positions, self.head_dim, self.rope_theta)

    def project(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentKVCache | None = None,
        *,
        angles: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, D) and k, v (B, H_kv, S, D), rebuilt from every cached latent.

        ``angles``: :meth:`rope_angles` of the new tokens' positions, if the
        caller has them (as :meth:`kqv.Attention.project`).
        """
        positions = check_input(x, self.hidden_size, positions, cache, angles)
        B, T, _ = x.shape
        H, H_kv, D = self.num_heads, self.num_kv_heads, self.head_dim
        cos_q, sin_q = angles or self.rope_angles(positions)                     # (T, D/2)
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)                      # (B, H, T, D)
        c = self.kv_a_proj(x)                                                    # (B, T, d_c)
        if cache is not None:
            c = cache.update(c)                                                  # (B, S, d_c)
            cos_k, sin_k = self.rope_angles(torch.arange(c.shape[1], device=x.device))  # keys 0 .. S-1
        else:
            cos_k, sin_k = cos_q, sin_q                                          # the keys are the new tokens
        S = c.shape[1]
        # The expensive part: every cached token's key and value, rebuilt.
        kv = self.kv_b_proj(c).view(B, S, 2 * H_kv, D).transpose(1, 2)           # (B, 2 H_kv, S, D)
        k, v = kv.split([H_kv, H_kv], dim=1)                                     # (B, H_kv, S, D) each
        q = apply_rope(q, cos_q, sin_q)
        k = apply_rope(k, cos_k, sin_k)                                          # ... and rotated again
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentKVCache | None = None,
        *,
        angles: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, hidden), causal, appending to ``cache`` if given (see :meth:`project`)."""
        q, k, v = self.project(x, positions, cache, angles=angles)
        out = scaled_dot_product_attention(q, k, v, is_causal=True, fused=self.fused)  # (B, H, T, D)
        B, T = x.shape[:2]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The causal attention weights (B, H, T, T) of a forward pass over x, for plots."""
        q, k, v = self.project(x, positions)
        _, weights = scaled_dot_product_attention(q, k, v, is_causal=True, return_weights=True)
        return weights


# --- Decoupled RoPE: a narrow rotated part apart, the rest absorbed -----------------


class DecoupledRopeLatentAttention(nn.Module):
    """GQA with partial RoPE: d_r rotated coordinates per key cached apart, the rest in a latent.

    Each head's D coordinates are split in two. The RoPE part keeps the d_r/2
    fastest-turning rotation pairs; its keys are cached per KV head. The rest,
    D_nope = D - d_r coordinates, is no longer rotated, and its keys are
    compressed with the values into the latent::

        c        = kv_a_proj(x)                          (d_c)            cached
        k_rope   = RoPE(k_rope_proj(x))                  (H_kv, d_r)      cached
        [k_nope; v] = kv_b_proj(c)                       (H_kv * (D_nope + D))
        score    = q_rope . k_rope + q_nope . k_nope     scale 1 / sqrt(D)

    Since nothing turns between ``W_uk`` and c, ``q_nope . (W_uk c) =
    (W_uk^T q_nope) . c``: with ``absorb=True`` the queries are carried into
    latent space once and the scores taken straight against the cached
    latents, and ``W_uv`` is applied after the weighted sum. The two paths give
    the same output.

    Parameters, per head laid out as [rope part ; nope part]::

        q_proj: (H * D, hidden)            k_rope_proj: (H_kv * d_r, hidden), None if d_r = 0
        kv_a_proj: (d_c, hidden)           kv_b_proj: (H_kv * D_nope + H_kv * D, d_c)
        o_proj: (hidden, H * D)

    Args:
        hidden_size: the model width.
        num_heads: H.
        num_kv_heads: H_kv.
        head_dim: D.
        kv_lora_rank: d_c.
        rope_dim: d_r, even, at most D: the rotated width kept per key.
        rope_theta: RoPE base of the original D-wide rotation (its pair i
            turns at ``rope_theta ** (-2i / D)``; the kept pairs are i < d_r/2).
        absorb: attend in latent space (True) or rebuild per-head keys and values (False).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        kv_lora_rank: int,
        rope_dim: int,
        *,
        rope_theta: float = 10000.0,
        absorb: bool = True,
    ) -> None:
        super().__init__()
        _check_widths(hidden_size, num_heads, num_kv_heads, head_dim, kv_lora_rank)
        if rope_dim < 0 or rope_dim % 2 or rope_dim > head_dim:
            raise ValueError(f"rope_dim must be even and between 0 and head_dim ({head_dim}), got {rope_dim}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_per_kv = num_heads // num_kv_heads
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.nope_dim = head_dim - rope_dim
        self.rope_theta = rope_theta
        self.absorb = absorb
        self.scale = 1.0 / math.sqrt(head_dim)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        # With d_r = 0 (no RoPE left at all) there is nothing to project.
        self.k_rope_proj = nn.Linear(hidden_size, num_kv_heads * rope_dim, bias=False) if rope_dim else None
        self.kv_a_proj = nn.Linear(hidden_size, kv_lora_rank, bias=False)
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_kv_heads * (self.nope_dim + head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"kv_lora_rank={self.kv_lora_rank}, rope_dim={self.rope_dim}, absorb={self.absorb}"
        )

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LatentKVCache:
        """An empty :class:`LatentKVCache`: latent (B, S_max, d_c) and k_rope (B, H_kv, S_max, d_r)."""
        w = self.kv_a_proj.weight
        return LatentKVCache(
            batch_size, self.kv_lora_rank, max_len, num_kv_heads=self.num_kv_heads, rope_dim=self.rope_dim,
            dtype=dtype or w.dtype, device=device or w.device,
        )

    def up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk (H_kv, D_nope, d_c) and W_uv (H_kv, D, d_c), views of ``kv_b_proj``'s weight."""
        H_kv, d_c = self.num_kv_heads, self.kv_lora_rank
        w_k, w_v = self.kv_b_proj.weight.split([H_kv * self.nope_dim, H_kv * self.head_dim])
        return w_k.view(H_kv, self.nope_dim, d_c), w_v.view(H_kv, self.head_dim, d_c)

    def rope_angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept pairs' angles: the first d_r/2 frequencies of the full D-wide RoPE, each (T, d_r/2)."""
        cos, sin = rope_angles(positions, self.head_dim, self.rope_theta)         # (..., D/2)
        half = self.rope_dim // 2
        return cos[..., :half], sin[..., :half]                                   # (..., d_r/2)

    def project(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentKVCache | None = None,
        *,
        angles: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q_rope (B, H, T, d_r), q_nope (B, H, T, D_nope), k_rope (B, H_kv, S, d_r) and the latents (B, S, d_c).

        ``angles``: :meth:`rope_angles` of the new tokens' positions, if the
        caller has them (as :meth:`kqv.Attention.project`).
        """
        positions = check_input(x, self.hidden_size, positions, cache, angles)
        B, T, _ = x.shape
        H, H_kv, D, d_r = self.num_heads, self.num_kv_heads, self.head_dim, self.rope_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)                       # (B, H, T, D)
        q_rope, q_nope = q.split([d_r, self.nope_dim], dim=-1)
        c = self.kv_a_proj(x)                                                     # (B, T, d_c)
        if d_r:
            k_rope = self.k_rope_proj(x).view(B, T, H_kv, d_r).transpose(1, 2)    # (B, H_kv, T, d_r)
            cos, sin = angles or self.rope_angles(positions)                      # (T, d_r/2)
            q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
            if cache is not None:
                c, k_rope = cache.update(c, k_rope)                               # (B, S, d_c), (B, H_kv, S, d_r)
        else:
            if cache is not None:
                c = cache.update(c)                                               # (B, S, d_c)
            k_rope = c.new_zeros(B, H_kv, c.shape[1], 0)                          # nothing rotated
        return q_rope, q_nope, k_rope, c

    def _naive(self, q_rope, q_nope, k_rope, c, weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rebuild per-KV-head keys and values from every latent, then attend as GQA."""
        B, S, _ = c.shape
        H_kv, D = self.num_kv_heads, self.head_dim
        k_nope, v = self.kv_b_proj(c).split([H_kv * self.nope_dim, H_kv * D], dim=-1)
        k_nope = k_nope.view(B, S, H_kv, self.nope_dim).transpose(1, 2)           # (B, H_kv, S, D_nope)
        v = v.view(B, S, H_kv, D).transpose(1, 2)                                 # (B, H_kv, S, D)
        q = torch.cat((q_rope, q_nope), dim=-1)                                   # (B, H, T, D)
        k = torch.cat((k_rope, k_nope), dim=-1)                                   # (B, H_kv, S, D)
        if weights:
            return scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, return_weights=True)
        return scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, fused=True), None

    def _absorbed(self, q_rope, q_nope, k_rope, c) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores against the latents themselves; W_uv applied after the weighted sum."""
        B, H, T, _ = q_nope.shape
        S = c.shape[1]
        W_uk, W_uv = self.up_projections()                                        # (H_kv, D_nope, d_c), (H_kv, D, d_c)
        # Stack each group's query heads against their KV head: g = KV head, q = head in group.
        qn = q_nope.unflatten(1, (self.num_kv_heads, self.q_per_kv))              # (B, H_kv, q_per_kv, T, D_nope)
        qr = q_rope.unflatten(1, (self.num_kv_heads, self.q_per_kv))              # (B, H_kv, q_per_kv, T, d_r)
        q_latent = torch.einsum("bgqtn,gnc->bgqtc", qn, W_uk)                     # (B, H_kv, q_per_kv, T, d_c)
        scores = torch.einsum("bgqtc,bsc->bgqts", q_latent, c)                    # latent part, one shared c
        scores = scores + torch.einsum("bgqtr,bgsr->bgqts", qr, k_rope)           # RoPE part, per KV head
        scores = scores * self.scale
        scores = scores.masked_fill(~causal_mask(T, S, c.device), float("-inf"))
        exact = torch.promote_types(scores.dtype, torch.float32)                  # half precision up, float64 kept
        weights = torch.softmax(scores.to(exact), dim=-1).to(c.dtype)             # (B, H_kv, q_per_kv, T, S)
        o_latent = torch.einsum("bgqts,bsc->bgqtc", weights, c)                   # (B, H_kv, q_per_kv, T, d_c)
        out = torch.einsum("bgqtc,gvc->bgqtv", o_latent, W_uv)                    # (B, H_kv, q_per_kv, T, D)
        return out.flatten(1, 2), weights.flatten(1, 2)                           # (B, H, T, D), (B, H, T, S)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentKVCache | None = None,
        *,
        angles: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, hidden), causal, appending to ``cache`` if given (see :meth:`project`)."""
        parts = self.project(x, positions, cache, angles=angles)
        out, _ = self._absorbed(*parts) if self.absorb else self._naive(*parts)  # (B, H, T, D)
        B, T = x.shape[:2]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The causal attention weights (B, H, T, T) of a forward pass over x, for plots."""
        parts = self.project(x, positions)
        _, weights = self._absorbed(*parts) if self.absorb else self._naive(*parts, weights=True)
        return weights


# --- The conversions -------------------------------------------------------------


def _gqa_layers(model: nn.Module) -> list[Attention]:
    attns = [layer.self_attn for layer in model.layers]
    for i, a in enumerate(attns):
        if not isinstance(a, Attention):
            raise TypeError(f"layer {i} has {type(a).__name__}; these conversions start from kqv.Attention (GQA)")
        if a.q_proj.bias is not None:
            raise ValueError(f"layer {i} has biased projections; these conversions handle Llama's bias-free ones")
        if a.rope_theta is None:
            raise ValueError(f"layer {i} has no RoPE; these conversions assume Llama's rotary keys")
    return attns


def _copy_without_attention(model: nn.Module, name: str, **config_changes) -> nn.Module:
    """A deep copy of ``model`` with a new config; its attention modules are replaced next."""
    new = copy.deepcopy(model)
    new.config = model.config.replace(name=name, **config_changes)
    return new


def _like(module: nn.Module, reference: nn.Module) -> nn.Module:
    """Put a new module on the reference's device and dtype, frozen if it was."""
    w = reference.q_proj.weight
    module.to(device=w.device, dtype=w.dtype)
    module.requires_grad_(w.requires_grad)
    return module


@torch.no_grad()
def fit_kv_group(
    inputs: torch.Tensor, k_weights: torch.Tensor, v_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One KV head fitted to stand for a group of g, on the activations ``inputs``.

    Mean pooling gives every old head the same share and ignores the data. This
    fits the shared head to what the group's heads actually produce, and puts
    what distinguishes each old head into the weights that read it:

    - values: the top-D principal directions U (g D, D) of the group's stacked
      values on the inputs. The shared value is ``v = U^T [v_1; ...; v_g]``
      and old head j's value is rebuilt as ``U_j v`` (U_j: rows j D .. (j+1) D
      of U). Since the weighted sum over tokens is linear, ``U_j`` moves into
      ``o_proj`` of every query head that read head j: exact, nothing cached.
    - keys: a fixed matrix between the key and the query cannot move past RoPE,
      which rotates each pair of coordinates by an angle that changes with the
      position. A complex scalar can: read pair i of a key, (k[i], k[i + D/2]),
      as the complex number z = k[i] + i k[i + D/2]; RoPE multiplies it by
      e^(i angle), and scalars commute. So for each pair i, the group's keys
      Z (N, g) are fitted by one shared key times one complex coefficient per
      old head, ``z_j ~ a_j z``, the best rank-1 fit (top eigenvector u of Z^H Z,
      ``z = Z u``, ``a_j = conj(u_j)``), and each query head that read head j
      has its pair i multiplied by ``conj(a_j)``: ``q . (a_j z) = (conj(a_j) q) . z``.

    With ``u_j = 1/g`` and ``U_j = I`` this is mean pooling; fitted, it is the
    best shared head of this form for the inputs given (keys and values are
    fitted, not the attention scores, so it is a start for repair, not an end).

    Args:
        inputs: X (N, hidden), what the layer's attention reads.
        k_weights, v_weights: the group's key and value rows, (g, D, hidden) each
            (rotate-half layout, as Llama and kqv).

    Returns:
        ``(k_proj, v_proj, key_coeff, value_up)``: the shared head's key and value
        rows, (D, hidden) each; the complex coefficient ``conj(a_j)`` that query
        heads of old head j multiply their pair i by, (g, D/2) complex; and
        ``U_j``, (g, D, D), that their ``o_proj`` columns are multiplied by.
        All float64 on the CPU.
    """
    g, D, hidden = k_weights.shape
    if v_weights.shape != (g, D, hidden) or D % 2:
        raise ValueError(
            f"need key and value rows of one even shape (g, D, hidden), got {tuple(k_weights.shape)} "
            f"and {tuple(v_weights.shape)}"
        )
    X = inputs.detach().to("cpu", torch.float64)                                  # (N, hidden)
    Wk = k_weights.detach().to("cpu", torch.float64)
    Wv = v_weights.detach().to("cpu", torch.float64).reshape(g * D, hidden)       # (g D, hidden)
    with _one_thread():
        V = X @ Wv.T                                                              # (N, g D)
        _, vectors = torch.linalg.eigh(V.T @ V)                                   # ascending
        U = vectors[:, -D:].flip(-1)                                              # (g D, D)
        v_proj = U.T @ Wv                                                         # (D, hidden)
        half = D // 2
        w = torch.complex(Wk[:, :half], Wk[:, half:])                             # (g, D/2, hidden)
        Z = torch.einsum("nd,gid->ign", X.to(torch.complex128), w)                # (D/2, g, N)
        _, vecs = torch.linalg.eigh(Z @ Z.conj().transpose(1, 2))                 # (D/2, g, g), Hermitian
        u = vecs[..., -1].conj()                                                  # (D/2, g): z = sum_j u_j z_j
    shared = torch.einsum("ig,gid->id", u, w)                                     # (D/2, hidden)
    k_proj = torch.cat((shared.real, shared.imag))                               # (D, hidden)
    key_coeff = u.T.contiguous()                                                  # (g, D/2): conj(a_j) = u_j
    return k_proj, v_proj, key_coeff, U.view(g, D, D)


@torch.no_grad()
def pool_kv_heads(model: nn.Module, num_kv_heads: int, *, calibration: torch.Tensor | None = None) -> nn.Module:
    """A copy of a GQA decoder with fewer KV heads, each standing for a group of old ones.

    Query head h used KV head ``h // (H / H_kv)``; it now uses ``h // (H /
    num_kv_heads)``. So each new KV head replaces ``H_kv / num_kv_heads``
    consecutive old ones. Without calibration its key and value projections
    are their mean, as Ainslie et al. (2023) convert MHA checkpoints to GQA.
    Averaging the projection rows equals averaging the keys themselves, even
    after RoPE: the rotation is linear and the same for every head.

    With ``calibration``, each new head is fitted to the activations of that
    text instead (:func:`fit_kv_group`), and the query and output projections
    absorb what told the old heads apart. The cache is the same size either way.

    Args:
        model: a :class:`kqv.model.Decoder` with :class:`kqv.Attention` layers.
        num_kv_heads: the new H_kv; must divide the current one (1 gives MQA).
        calibration: token ids (B, T) to fit to; several times the model's
            width in tokens (a few thousand for SmolLM2). None: mean pooling.

    Returns:
        A new decoder (the input is unchanged); ``config.num_kv_heads`` is updated.
    """
    attns = _gqa_layers(model)
    H_kv = attns[0].num_kv_heads
    if num_kv_heads < 1 or H_kv % num_kv_heads:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide the current number of KV heads ({H_kv})")
    group = H_kv // num_kv_heads
    inputs = _calibration(model, calibration)
    how = "fitted" if calibration is not None else "mean-pooled"
    new = _copy_without_attention(
        model, f"{model.config.name} (KV heads {how} {H_kv} -> {num_kv_heads})", num_kv_heads=num_kv_heads
    )
    for layer, old, X in zip(new.layers, attns, inputs):
        D, hidden = old.head_dim, old.hidden_size
        attn = Attention(hidden, old.num_heads, num_kv_heads, D, rope_theta=old.rope_theta, fused=old.fused)
        wk = old.k_proj.weight.view(num_kv_heads, group, D, hidden)               # (H_kv', group, D, hidden)
        wv = old.v_proj.weight.view(num_kv_heads, group, D, hidden)
        if X is None:
            attn.q_proj.weight.copy_(old.q_proj.weight)
            attn.o_proj.weight.copy_(old.o_proj.weight)
            attn.k_proj.weight.copy_(wk.float().mean(1).reshape(num_kv_heads * D, hidden))
            attn.v_proj.weight.copy_(wv.float().mean(1).reshape(num_kv_heads * D, hidden))
        else:
            half = D // 2
            wq = old.q_proj.weight.detach().to("cpu", torch.float64).view(old.num_heads, D, hidden).clone()
            wo = old.o_proj.weight.detach().to("cpu", torch.float64).view(hidden, old.num_heads, D).clone()
            ks, vs = [], []
            for n in range(num_kv_heads):
                k_proj, v_proj, coeff, up = fit_kv_group(X, wk[n], wv[n])
                ks.append(k_proj)
                vs.append(v_proj)
                for h in range(old.num_heads):
                    j = h // old.q_per_kv - n * group                             # old head, within the group
                    if not 0 <= j < group:
                        continue
                    q = torch.complex(wq[h, :half], wq[h, half:]) * coeff[j][:, None]   # (D/2, hidden)
                    wq[h] = torch.cat((q.real, q.imag))
                    wo[:, h] = wo[:, h] @ up[j]                                   # (hidden, D)
            attn.q_proj.weight.copy_(wq.view(-1, hidden))
            attn.o_proj.weight.copy_(wo.view(hidden, -1))
            attn.k_proj.weight.copy_(torch.cat(ks))
            attn.v_proj.weight.copy_(torch.cat(vs))
        layer.self_attn = _like(attn, old)
    return new


def gqa_to_mqa(model: nn.Module, *, calibration: torch.Tensor | None = None) -> nn.Module:
    """Multi-query attention: every query head shares one KV head (:func:`pool_kv_heads` with 1).

    Mean-pooled by default; fitted to the activations of ``calibration`` if given.
    """
    return pool_kv_heads(model, 1, calibration=calibration)


@contextlib.contextmanager
def _one_thread():
    """Run small CPU decompositions on one thread, then restore the thread count.

    A 384 x 384 eigendecomposition gains nothing from a second thread, and on a
    busy machine LAPACK's threads can wait on each other a hundred times longer
    than the work takes (measured: 20 ms on one thread, 1.8 s on two).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def joint_low_rank(
    weight: torch.Tensor, rank: int, inputs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor a projection (n_out, hidden) as W_up (n_out, r) @ W_down (r, hidden).

    Without ``inputs``: the truncated SVD of the weight, ``W ~ U_r S_r V_r^T``,
    with ``W_up = U_r S_r`` and ``W_down = V_r^T``: the best rank-r weight in
    the Frobenius norm, treating every input direction alike.

    With ``inputs`` X (N, hidden), the activations the layer really sees: the
    best rank-r map on those inputs. Its outputs Y = X W^T are projected onto
    their top-r principal directions U_r (eigenvectors of Y^T Y), so
    ``W_up = U_r`` and ``W_down = U_r^T W``. Among all rank-r matrices M, this
    one minimises ``||X W^T - X M^T||`` (Eckart-Young on Y). It matters because
    a transformer's hidden states are far from isotropic: a few directions
    carry most of the energy, and the plain SVD spends its rank on directions
    the model never uses.

    How many calibration tokens: N tokens span at most N of the ``hidden``
    input directions, so with N < hidden the activations' Gram matrix
    ``X^T X`` is rank-deficient and the fit learns nothing about the
    directions the calibration text never visited (a :class:`UserWarning`
    says so). Several times the hidden width is advised (for SmolLM2, width
    576, a few thousand tokens); the more directions the text covers, the less
    the fit depends on it.

    Computed in float64 on the CPU (exact and available on every backend);
    returned in the weight's dtype and on its device.
    """
    n_out, hidden = weight.shape
    if not 1 <= rank <= min(n_out, hidden):
        raise ValueError(
            f"rank must be between 1 and {min(n_out, hidden)} for a ({n_out}, {hidden}) weight, got {rank}"
        )
    if inputs is not None and (inputs.dim() != 2 or inputs.shape[1] != hidden):
        raise ValueError(f"inputs must have shape (N, {hidden}), got {tuple(inputs.shape)}")
    if inputs is not None and inputs.shape[0] < hidden:
        warnings.warn(
            f"joint_low_rank: {inputs.shape[0]} calibration tokens for a hidden width of {hidden}: "
            f"the activations' Gram matrix has rank at most {inputs.shape[0]}, so the fit ignores the input "
            f"directions the text never visits; use several times {hidden} tokens",
            UserWarning,
            stacklevel=2,
        )
    W = weight.detach().to("cpu", torch.float64)
    with _one_thread():
        if inputs is None:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            up, down = U[:, :rank] * S[:rank], Vh[:rank]                      # (n_out, r), (r, hidden)
        else:
            Y = inputs.detach().to("cpu", torch.float64) @ W.T                # (N, n_out)
            _, vectors = torch.linalg.eigh(Y.T @ Y)                           # ascending eigenvalues
            up = vectors[:, -rank:].flip(-1)                                  # (n_out, r), largest first
            down = up.T @ W                                                   # (r, hidden)
    return up.to(weight.device, weight.dtype), down.to(weight.device, weight.dtype)


@torch.no_grad()
def attention_inputs(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """What each layer's attention reads on a text: input_layernorm(h_l), flattened to (B * T, hidden)."""
    from .heads import hidden_states

    states = hidden_states(model, input_ids)
    return [layer.input_layernorm(h).flatten(0, 1) for layer, h in zip(model.layers, states)]


def _calibration(model: nn.Module, calibration: torch.Tensor | None) -> list[torch.Tensor | None]:
    if calibration is None:
        return [None] * len(model.layers)
    return attention_inputs(model, calibration)


@torch.no_grad()
def gqa_to_latent(
    model: nn.Module, rank: int, *, calibration: torch.Tensor | None = None
) -> nn.Module:
    """A copy of a GQA decoder that caches a rank-d_c latent per token per layer.

    Each layer's stacked ``[W_k; W_v]`` (2 H_kv D, hidden) is factorized by
    :func:`joint_low_rank`; the cache keeps ``c = W_down x`` and every step
    rebuilds and re-rotates all keys (:class:`LatentKVAttention`). At
    ``rank = 2 * H_kv * D`` (384 for SmolLM2) the factorization is exact.

    Args:
        model: a :class:`kqv.model.Decoder` with :class:`kqv.Attention` layers.
        rank: d_c, the cached width per token and layer.
        calibration: token ids (B, T) of a text; fit each layer to the
            activations it sees there (see :func:`joint_low_rank`; B * T should
            be several times the hidden width, and fewer tokens than the width
            warn). None: plain SVD.

    Returns:
        A new decoder whose layers hold :class:`LatentKVAttention`; the input is unchanged.
    """
    attns = _gqa_layers(model)
    inputs = _calibration(model, calibration)
    how = "activation-aware" if calibration is not None else "SVD"
    new = _copy_without_attention(model, f"{model.config.name} (latent KV cache, d_c={rank}, {how})")
    for layer, old, X in zip(new.layers, attns, inputs):
        W = torch.cat((old.k_proj.weight, old.v_proj.weight))                     # (2 H_kv D, hidden)
        up, down = joint_low_rank(W, rank, X)
        attn = LatentKVAttention(
            old.hidden_size, old.num_heads, old.num_kv_heads, old.head_dim, rank,
            rope_theta=old.rope_theta, fused=old.fused,
        )
        attn.q_proj.weight.copy_(old.q_proj.weight)
        attn.o_proj.weight.copy_(old.o_proj.weight)
        attn.kv_a_proj.weight.copy_(down)
        attn.kv_b_proj.weight.copy_(up)
        layer.self_attn = _like(attn, old)
    return new


def _rope_split(
    num_heads: int, head_dim: int, rope_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of a (heads * D, hidden) projection: each head's kept RoPE rows, then the rest.

    Llama pairs coordinate i with i + D/2 (rotate-half). Keeping the d_r/2
    fastest pairs i < d_r/2 keeps rows [0, d_r/2) and [D/2, D/2 + d_r/2) of
    each head, in that order, which is itself a rotate-half layout of width d_r.
    """
    half, keep = head_dim // 2, rope_dim // 2
    rope = torch.cat((torch.arange(keep), half + torch.arange(keep)))                # (d_r,)
    nope = torch.tensor([i for i in range(head_dim) if i % half >= keep], dtype=torch.long)  # (D - d_r,)
    base = (torch.arange(num_heads) * head_dim).unsqueeze(1)                          # (heads, 1)
    return (base + rope).flatten().to(device), (base + nope).flatten().to(device)


@torch.no_grad()
def gqa_to_decoupled_latent(
    model: nn.Module,
    rank: int,
    rope_dim: int,
    *,
    calibration: torch.Tensor | None = None,
    absorb: bool = True,
) -> nn.Module:
    """A copy of a GQA decoder with partial RoPE and an absorbable latent cache.

    Per head, RoPE is kept on the d_r/2 fastest-turning pairs only (those carry
    the fine position information; the slowest pairs of SmolLM2, base 100000,
    turn less than a thousandth of a radian per token). Their keys are cached
    apart, ``H_kv * d_r`` numbers per token; the unrotated rest of the keys and
    the values are factorized jointly to width d_c. Cache per token and layer:
    ``d_c + H_kv * d_r``. Dropping the other pairs' rotation changes the model
    even at full rank; compare ``rank = H_kv * (2 D - d_r)`` (exact) with the
    original to see that cost alone.

    Args:
        model: a :class:`kqv.model.Decoder` with :class:`kqv.Attention` layers.
        rank: d_c.
        rope_dim: d_r per key, even, at most D.
        calibration: token ids (B, T) to fit the factorization to (see :func:`joint_low_rank`).
        absorb: build the layers on the absorbed path (True) or the naive one.

    Returns:
        A new decoder whose layers hold :class:`DecoupledRopeLatentAttention`.
    """
    attns = _gqa_layers(model)
    inputs = _calibration(model, calibration)
    how = "activation-aware" if calibration is not None else "SVD"
    new = _copy_without_attention(
        model, f"{model.config.name} (decoupled RoPE d_r={rope_dim}, latent d_c={rank}, {how})"
    )
    for layer, old, X in zip(new.layers, attns, inputs):
        H, H_kv, D = old.num_heads, old.num_kv_heads, old.head_dim
        attn = DecoupledRopeLatentAttention(
            old.hidden_size, H, H_kv, D, rank, rope_dim, rope_theta=old.rope_theta, absorb=absorb
        )
        device = old.q_proj.weight.device
        q_rope_rows, q_nope_rows = _rope_split(H, D, rope_dim, device)
        k_rope_rows, k_nope_rows = _rope_split(H_kv, D, rope_dim, device)
        # Queries: each head's rows reordered to [rope part ; nope part].
        wq, hidden = old.q_proj.weight, old.hidden_size
        attn.q_proj.weight.copy_(torch.cat((wq[q_rope_rows].view(H, rope_dim, hidden),
                                            wq[q_nope_rows].view(H, D - rope_dim, hidden)), dim=1).flatten(0, 1))
        wk = old.k_proj.weight
        if rope_dim:
            attn.k_rope_proj.weight.copy_(wk[k_rope_rows])
        W = torch.cat((wk[k_nope_rows], old.v_proj.weight))                         # (H_kv (D_nope + D), hidden)
        up, down = joint_low_rank(W, rank, X)
        attn.kv_a_proj.weight.copy_(down)
        attn.kv_b_proj.weight.copy_(up)
        attn.o_proj.weight.copy_(old.o_proj.weight)
        layer.self_attn = _like(attn, old)
    return new
