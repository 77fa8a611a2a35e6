"""Multi-head latent attention (MLA), as in DeepSeek-V2 (arXiv 2405.04434).

The index-card idea of chapter 7: instead of caching every head's key and
value, cache one short latent vector per token and rebuild the heads' keys and
values from it. For each token (widths from the legend in :mod:`kqv`)::

    c_kv   = RMSNorm(W_DKV x)            (d_c)      the latent: cached
    k_rope = RoPE(W_KR x)                (d_r)      one RoPE key for all heads: cached
    k_h    = [W_UK_h c_kv ; k_rope]      (D_nope + d_r) per head, rebuilt
    v_h    =  W_UV_h c_kv                (D_v)      per head, rebuilt

Queries have the same two parts, ``q_h = [q_nope_h ; RoPE(q_rope_h)]``, so
each score is ``q_nope_h . (W_UK_h c_kv) + q_rope_h . k_rope``.

Why the RoPE part is separate (decoupled RoPE): the first term equals
``(W_UK_h^T q_nope_h) . c_kv``, so W_UK_h can be folded into the query once
and the scores computed straight against the cached latents ("absorption").
If RoPE rotated the whole key, a position-dependent rotation would sit between
W_UK_h and c_kv and nothing could be folded. So the position lives in a narrow
extra slice, d_r wide, shared by every head and cached beside the latent.
Likewise W_UV_h moves past the weighted sum: ``sum_s w_s W_UV_h c_s =
W_UV_h (sum_s w_s c_s)``.

Two paths, chosen by ``absorb``, give the same output:

- ``absorb=False`` (naive): expand the cached latents to per-head K and V at
  every step, then attend as in MHA.
- ``absorb=True``: attend in latent space, one shared "KV head" of width
  d_c + d_r for all H query heads, like MQA (FlashMLA's decode layout).

Parameter names and shapes are Hugging Face's ``DeepseekV2Attention``::

    q_proj: (H * (D_nope + d_r), hidden)                  if q_lora_rank is None
    q_a_proj: (d_q, hidden), q_a_layernorm: (d_q,),
    q_b_proj: (H * (D_nope + d_r), d_q)                   otherwise
    kv_a_proj_with_mqa: (d_c + d_r, hidden)   kv_a_layernorm: (d_c,)
    kv_b_proj: (H * (D_nope + D_v), d_c)      o_proj: (hidden, H * D_v)

Queries are never cached: ``q_lora_rank`` (1536 in DeepSeek-V2) compresses
the query only to save activation memory in training.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import check_input, scaled_dot_product_attention
from .cache import LatentCache
from .norm import RMSNorm
from .rope import YaRN, apply_rope, rope_angles

__all__ = ["MultiHeadLatentAttention"]


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2's multi-head latent attention, causal, with a latent cache.

    Args:
        hidden_size: the model width.
        num_heads: H.
        q_lora_rank: the query's latent width d_q, or None for a plain ``q_proj``.
        kv_lora_rank: d_c, the cached latent width (512 in DeepSeek-V2).
        qk_nope_head_dim: D_nope, the per-head query/key width without RoPE (128).
        qk_rope_head_dim: d_r, the RoPE width shared by all heads (64).
        v_head_dim: D_v, the per-head value width (128).
        rope_theta: RoPE base (adjacent-pair convention, as DeepSeek-V2).
        rope_scaling: YaRN (:class:`kqv.rope.YaRN`), as the released DeepSeek-V2
            and V3 configs have it: it changes the RoPE frequencies and
            multiplies the attention scale by ``rope_scaling.softmax_scale``
            (about 1.59 for DeepSeek-V2). None: plain RoPE, scale 1 / sqrt(D_nope + d_r).
        absorb: attend in latent space (True) or expand to per-head K, V (False).
        eps: of the two RMSNorms.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        rope_theta: float = 10000.0,
        rope_scaling: YaRN | None = None,
        absorb: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        widths = dict(
            hidden_size=hidden_size, num_heads=num_heads, kv_lora_rank=kv_lora_rank,
            qk_nope_head_dim=qk_nope_head_dim, v_head_dim=v_head_dim,
        )
        for name, value in widths.items():
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if qk_rope_head_dim < 0 or qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even and non-negative, got {qk_rope_head_dim}")
        if q_lora_rank is not None and q_lora_rank < 1:
            raise ValueError(f"q_lora_rank must be positive or None, got {q_lora_rank}")
        if rope_scaling is not None and not isinstance(rope_scaling, YaRN):
            raise TypeError(f"rope_scaling must be a kqv.rope.YaRN or None, got {rope_scaling!r}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.absorb = absorb
        # The scale counts both parts of a query-key dot product; YaRN sharpens it.
        self.scale = 1.0 / math.sqrt(self.qk_head_dim)
        if rope_scaling is not None:
            self.scale *= rope_scaling.softmax_scale

        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(q_lora_rank, eps=eps)
            self.q_b_proj = nn.Linear(q_lora_rank, num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps=eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=False)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, q_lora_rank={self.q_lora_rank}, kv_lora_rank={self.kv_lora_rank}, "
            f"qk_nope_head_dim={self.qk_nope_head_dim}, qk_rope_head_dim={self.qk_rope_head_dim}, "
            f"v_head_dim={self.v_head_dim}, absorb={self.absorb}"
            + ("" if self.rope_scaling is None else f", rope_scaling={self.rope_scaling}")
        )

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LatentCache:
        """An empty :class:`~kqv.cache.LatentCache`, (B, S_max, d_c + d_r)."""
        w = self.kv_b_proj.weight
        return LatentCache(
            batch_size, self.kv_lora_rank, self.qk_rope_head_dim, max_len,
            dtype=dtype or w.dtype, device=device or w.device,
        )

    def up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (H, D_nope, d_c) and W_UV (H, D_v, d_c), views of ``kv_b_proj``'s weight."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def rope_angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's (cos, sin) for these positions over the d_r rotated coordinates, each (T, d_r/2)."""
        return rope_angles(positions, self.qk_rope_head_dim, self.rope_theta, self.rope_scaling)

    def project(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        *,
        angles: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries for the new tokens and the latent rows of every token (cached ones too).

        ``angles``: :meth:`rope_angles` of the new tokens' positions, if the
        caller has them (as :meth:`kqv.Attention.project`).

        Returns q_nope (B, H, T, D_nope), q_rope (B, H, T, d_r) and the latent
        rows [c_kv ; k_rope] (B, S, d_c + d_r), where S counts the cached tokens
        plus the T new ones.
        """
        positions = check_input(x, self.hidden_size, positions, cache, angles)
        B, T, _ = x.shape
        H, d_c, d_r, D_nope = self.num_heads, self.kv_lora_rank, self.qk_rope_head_dim, self.qk_nope_head_dim

        # Queries: H heads, each [q_nope ; q_rope].
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, self.qk_head_dim).transpose(1, 2)              # (B, H, T, D_nope + d_r)
        q_nope, q_rope = q.split([D_nope, d_r], dim=-1)

        # What is cached: the normalized latent and one RoPE key per token.
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([d_c, d_r], dim=-1)  # (B, T, d_c), (B, T, d_r)
        # RMSNorm's float32 weight would promote a bfloat16 latent under autocast;
        # keep it in the dtype of its RoPE neighbour, so that keys and queries agree.
        c_kv = self.kv_a_layernorm(c_kv).to(k_rope.dtype)
        cos, sin = angles or self.rope_angles(positions)                    # (T, d_r/2)
        q_rope = apply_rope(q_rope, cos, sin, interleaved=True)             # (B, H, T, d_r)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin, interleaved=True).squeeze(1)  # (B, T, d_r)
        if cache is not None:
            latent = cache.update(c_kv, k_rope)                             # (B, S, d_c + d_r)
        else:
            latent = torch.cat((c_kv, k_rope), dim=-1)                      # (B, S=T, d_c + d_r)
        return q_nope, q_rope, latent

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        *,
        angles: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, hidden), causal, appending to ``cache`` if given (see :meth:`project`)."""
        q_nope, q_rope, latent = self.project(x, positions, cache, angles=angles)
        # The cache knows where its latent rows sit (in order, in blocks, in a window): it attends.
        attend = scaled_dot_product_attention if cache is None else cache.attend
        if self.absorb:
            out = self._attend_absorbed(q_nope, q_rope, latent, attend)
        else:
            out = self._attend_naive(q_nope, q_rope, latent, attend)        # (B, H, T, D_v)
        B, T, _ = x.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.v_head_dim))

    def _attend_naive(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, attend=scaled_dot_product_attention
    ) -> torch.Tensor:
        """Rebuild per-head K and V from every cached latent, then attend as MHA.

        (A paged cache hands over its pool of blocks, (num_blocks, block_size,
        d_c + d_r), instead of (B, S, d_c + d_r): every line below reads it the same way.)
        """
        B, S, _ = latent.shape
        H, d_c, D_nope = self.num_heads, self.kv_lora_rank, self.qk_nope_head_dim
        c_kv, k_rope = latent.split([d_c, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(B, S, H, D_nope + self.v_head_dim).transpose(1, 2)  # (B, H, S, D_nope + D_v)
        k_nope, v = kv.split([D_nope, self.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.unsqueeze(1).expand(B, H, S, -1)), dim=-1)  # (B, H, S, D_nope + d_r)
        q = torch.cat((q_nope, q_rope), dim=-1)                                  # (B, H, T, D_nope + d_r)
        return attend(q, k, v, is_causal=True, scale=self.scale, fused=True)

    def _absorbed_qkv(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries in latent space against one shared "KV head" made of the latent rows."""
        W_UK, _ = self.up_projections()                                     # (H, D_nope, d_c)
        q_latent = torch.einsum("bhtn,hnc->bhtc", q_nope, W_UK)             # (B, H, T, d_c)
        q = torch.cat((q_latent, q_rope), dim=-1)                           # (B, H, T, d_c + d_r)
        # Keys and values are the same latent rows, no copies. The values that
        # matter are only the first d_c numbers of each row (a view,
        # latent[..., :d_c]), and FlashMLA, which reads both from one buffer,
        # computes just those d_c outputs (its head_dim_v, 512). PyTorch's flash
        # kernels instead need keys and values of one width, and given d_c-wide
        # values they fall back to the math kernel. So the whole row goes in and
        # the caller drops the last d_r outputs: d_r / d_c = 12.5% more P.V work
        # (64 of 512), yet on a CPU about twice as fast as the math kernel
        # without it (one decode step, H = 16, S = 16384, float32, 2 threads:
        # 7 ms against 26 ms, 10 ms for the eager path; noisy, one run).
        k = v = latent.unsqueeze(1)                                         # (B, 1, S, d_c + d_r)
        return q, k, v

    def _attend_absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, attend=scaled_dot_product_attention
    ) -> torch.Tensor:
        """Fold W_UK into the queries and W_UV into the output; attend against the latents."""
        q, k, v = self._absorbed_qkv(q_nope, q_rope, latent)
        o_rows = attend(q, k, v, is_causal=True, scale=self.scale, fused=True)
        o_latent = o_rows[..., : self.kv_lora_rank]                         # (B, H, T, d_c): sum_s w_s c_s
        _, W_UV = self.up_projections()                                     # (H, D_v, d_c)
        return torch.einsum("bhtc,hvc->bhtv", o_latent, W_UV)               # (B, H, T, D_v)

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The causal attention weights (B, H, T, T) of a forward pass over x, for plots."""
        q, k, v = self._absorbed_qkv(*self.project(x, positions))
        _, weights = scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scale, return_weights=True
        )
        return weights
