"""Rotary position embeddings (RoPE), in the two conventions real models use.

Attention by itself has no sense of order. Su et al. (2021) rotate each pair
of coordinates of a query or key by an angle proportional to the token's
position, so that the dot product of a query at position m and a key at
position n depends only on m - n (:func:`rope_position_scores` measures it;
:func:`absolute_position_scores` measures what adding positions to the input
does instead). Pair i turns at the frequency ``theta ** (-2i / D)``: fast
pairs tell neighbours apart, slow ones barely turn over a whole context.

Which coordinates form a pair is a convention, and checkpoints are not
interchangeable between the two:

- ``interleaved=False`` (Hugging Face's Llama, GPT-NeoX: "rotate half"):
  pair i is (x[i], x[i + D/2]).
- ``interleaved=True`` (the RoFormer paper, Meta's own Llama code,
  DeepSeek-V2, llama.cpp: adjacent pairs): pair i is (x[2i], x[2i+1]).

The two are equal up to a permutation of each head's coordinates, that is, of
the rows of W_q and W_k: which is why :func:`kqv.smollm2.unpermute_qk` exists.

Longer contexts than a model was trained on: :func:`ntk_aware_theta` (a new
base) and :class:`~kqv.rope.YaRN` (Peng et al. 2023, arXiv 2309.00071), the scaling
DeepSeek-V2 and V3 ship with, which slows the slowest pairs down by a factor
so that their angles stay within what training saw, leaves the fastest pairs
alone, and blends the pairs in between.

Book: chapter "Rotary positions" (all of the above); chapter "Multi-head
latent attention" ("Decoupled RoPE") explains why RoPE stops MLA from folding
W_UK into the query, and why DeepSeek gives RoPE its own narrow slice (d_r).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

__all__ = [
    "YaRN",
    "yarn_mscale",
    "ntk_aware_theta",
    "rope_frequencies",
    "rope_angles",
    "apply_rope",
    "rope_matrix",
    "sinusoidal_positions",
    "rope_position_scores",
    "absolute_position_scores",
    "offset_spread",
]


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction, ``0.1 * mscale * ln(factor) + 1`` (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class YaRN:
    """YaRN RoPE scaling, with the fields of a config.json's ``rope_scaling`` (``"type": "yarn"``).

    Pair i of a D-wide rotation turns ``L / wavelength_i`` times over the
    ``original_max_position_embeddings`` (L) tokens of training. Pairs that
    turn more than ``beta_fast`` times keep their frequency (they have seen
    every angle already); pairs that turn fewer than ``beta_slow`` times are
    slowed down by ``factor`` (interpolated, so that ``factor * L`` tokens
    reach only angles that L tokens reached); a linear ramp blends the pairs
    in between. Two further corrections follow Hugging Face's
    ``_compute_yarn_parameters`` and DeepSeek's reference code:

    - :attr:`attention_factor` multiplies the cosines and sines (so the RoPE
      part of each score by its square): ``yarn_mscale(factor, mscale) /
      yarn_mscale(factor, mscale_all_dim)`` when both are given, else
      ``yarn_mscale(factor)``;
    - :attr:`softmax_scale` multiplies DeepSeek's attention scale:
      ``yarn_mscale(factor, mscale_all_dim) ** 2``, 1 without
      ``mscale_all_dim``. (Hugging Face's ``yarn_apply_mscale`` in
      ``modeling_deepseek_v2.py``; ``softmax_scale * mscale * mscale`` in
      DeepSeek-V3's ``inference/model.py``.)

    DeepSeek-V2 and V2-Lite: factor 40, L = 4096, beta_fast 32, beta_slow 1,
    mscale = mscale_all_dim = 0.707, so the cosines are unchanged and every
    score is multiplied by ``(0.1 * 0.707 * ln 40 + 1) ** 2``, about 1.59.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None

    def __post_init__(self) -> None:
        if not self.factor >= 1:
            raise ValueError(f"YaRN's factor must be at least 1, got {self.factor!r}")
        L = self.original_max_position_embeddings
        if not isinstance(L, int) or isinstance(L, bool) or L < 1:
            raise ValueError(f"original_max_position_embeddings must be a positive integer, got {L!r}")
        if not self.beta_fast >= self.beta_slow > 0:
            raise ValueError(
                f"YaRN needs beta_fast >= beta_slow > 0, got beta_fast={self.beta_fast!r}, beta_slow={self.beta_slow!r}"
            )
        for name in ("mscale", "mscale_all_dim"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be non-negative or None, got {value!r}")

    @property
    def attention_factor(self) -> float:
        """What multiplies RoPE's cosines and sines."""
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    @property
    def softmax_scale(self) -> float:
        """What multiplies the attention scale 1 / sqrt(D) in DeepSeek's attention."""
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0

    def ramp(self, dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
        """(D/2,): 0 for pairs that keep their frequency, 1 for pairs slowed by ``factor``, linear between.

        The bounds are the (fractional) pair indices that turn ``beta_fast``
        and ``beta_slow`` times over L tokens, rounded outwards as Hugging Face
        and DeepSeek do.
        """

        def pair_turning(turns: float) -> float:
            # Pair i turns L * theta**(-2i/D) / (2 pi) times; solve for i.
            return dim * math.log(self.original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(pair_turning(self.beta_fast)), 0)
        high = min(math.ceil(pair_turning(self.beta_slow)), dim - 1)
        if low == high:
            high += 0.001  # a step instead of a ramp; avoids dividing by zero
        i = torch.arange(dim // 2, dtype=torch.float32, device=device)
        return ((i - low) / (high - low)).clamp(0, 1)                      # (D/2,)


def rope_frequencies(
    dim: int, theta: float, scaling: YaRN | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """The D/2 angular frequencies ``theta ** (-2i / D)``, in float32, YaRN-scaled if given."""
    if dim % 2:
        raise ValueError(f"RoPE needs an even width, got dim={dim}")
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    inv_freq = 1.0 / (theta**exponents)                                   # (D/2,)
    if scaling is None:
        return inv_freq
    slowed = scaling.ramp(dim, theta, device)                              # (D/2,), 1 = interpolate
    return inv_freq / scaling.factor * slowed + inv_freq * (1 - slowed)    # (D/2,)


def rope_angles(
    positions: torch.Tensor, dim: int, theta: float, scaling: YaRN | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the rotation angles, in float32.

    Args:
        positions: integer positions, shape (T,) or (B, T).
        dim: the rotated width D (even).
        theta: the base of the frequencies (10000 in the RoFormer paper).
        scaling: YaRN's frequencies and magnitude (:class:`~kqv.rope.YaRN`), or None for plain RoPE.

    Returns:
        ``(cos, sin)``, each of shape ``(*positions.shape, D/2)``: one angle per pair.
    """
    if dim % 2:
        raise ValueError(f"RoPE needs an even width, got dim={dim}")
    if positions.is_floating_point() or positions.is_complex():
        raise TypeError(f"positions must be integers, got dtype {positions.dtype}")
    inv_freq = rope_frequencies(dim, theta, scaling, positions.device)     # (D/2,)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq          # (..., T, D/2)
    cos, sin = angles.cos(), angles.sin()
    if scaling is not None and scaling.attention_factor != 1.0:
        cos, sin = cos * scaling.attention_factor, sin * scaling.attention_factor
    return cos, sin


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False
) -> torch.Tensor:
    """Rotate the pairs of ``x`` by the angles whose cosines and sines are given.

    Args:
        x: queries or keys, shape (B, H, T, D) (any number of heads, 1 included).
        cos, sin: from :func:`rope_angles`, shape (T, D/2) or (B, T, D/2).
        interleaved: adjacent pairs (DeepSeek-V2) instead of halves (Llama).

    Returns:
        A tensor of the shape and dtype of ``x``.
    """
    if x.shape[-1] != 2 * cos.shape[-1]:
        raise ValueError(
            f"x has width {x.shape[-1]} but the angles cover {2 * cos.shape[-1]} coordinates"
        )
    if cos.dim() == 3:  # (B, T, D/2): one set of angles per sequence, shared by the heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                      # (B, 1, T, D/2)
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))                                   # (B, H, T, D/2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return out.flatten(-2)                                             # (B, H, T, D)
    x0, x1 = x.chunk(2, dim=-1)                                            # (B, H, T, D/2) each
    return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, H, T, D)


# --- Long contexts: a new base ------------------------------------------------------


def ntk_aware_theta(theta: float, factor: float, dim: int) -> float:
    """The base of "NTK-aware" scaling: ``theta * factor ** (D / (D - 2))``.

    Changing the base instead of the positions (bloc97, 2023; definition 1 and
    appendix A.1 of the YaRN paper, arXiv 2309.00071) leaves the fastest pair
    (i = 0) exactly as it was and slows the slowest (i = D/2 - 1) by exactly
    ``factor``, the pairs in between by less and less as they get faster::

        rope_frequencies(D, ntk_aware_theta(theta, s, D))

    Position interpolation (Chen et al. 2023), for comparison, divides every
    frequency by ``factor``.
    """
    if dim % 2 or dim < 4:
        raise ValueError(f"NTK-aware scaling needs an even width of at least 4, got dim={dim}")
    if not factor >= 1:
        raise ValueError(f"the scaling factor must be at least 1, got {factor!r}")
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta!r}")
    return theta * factor ** (dim / (dim - 2))


# --- Looking at RoPE: one rotation as a matrix, scores by position -----------------


def rope_matrix(
    position: int, dim: int, theta: float, *, interleaved: bool = False, device: torch.device | str | None = None
) -> torch.Tensor:
    """R_n, the (D, D) rotation of position n: ``R_n @ x`` equals ``apply_rope`` of x at position n.

    Block-diagonal (interleaved) or block-diagonal after reordering the
    coordinates (rotate half), and orthogonal: ``R_m.T @ R_n`` is
    ``R_(n - m)``, which is the relative-position property in one line.
    In float32.
    """
    try:
        position = operator.index(position)
    except TypeError:
        raise TypeError(f"position must be an integer, got {position!r}") from None
    positions = torch.full((dim,), position, dtype=torch.long, device=device)
    cos, sin = rope_angles(positions, dim, theta)                          # (D, D/2): one row per basis vector
    basis = torch.eye(dim, device=device)                                  # (D, D): row j is e_j
    return apply_rope(basis, cos, sin, interleaved=interleaved).T          # (D, D): column j is R_n e_j


def sinusoidal_positions(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The Transformer's absolute position embeddings (Vaswani et al. 2017, section 3.5), in float32.

    ``PE[pos, 2i] = sin(pos / base ** (2i / D))`` and ``PE[pos, 2i + 1] =
    cos(pos / base ** (2i / D))``: added to the token's vector at the input,
    not applied to queries and keys.

    Args:
        positions: integer positions, shape (T,).
        dim: the model width D (even).
        base: 10000 in the paper.

    Returns:
        (T, D).
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embeddings need an even width, got dim={dim}")
    if positions.is_floating_point() or positions.is_complex():
        raise TypeError(f"positions must be integers, got dtype {positions.dtype}")
    angles = positions.to(torch.float32).unsqueeze(-1) * rope_frequencies(dim, base, device=positions.device)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)   # (T, D): sin, cos, sin, cos, ...


def _check_projection(name: str, x: torch.Tensor, w: torch.Tensor) -> None:
    if x.dim() != 1 or w.dim() != 2 or w.shape[1] != x.shape[0]:
        raise ValueError(
            f"{name}: expected a vector (hidden,) and a projection (D, hidden), "
            f"got {tuple(x.shape)} and {tuple(w.shape)}"
        )


def rope_position_scores(
    x_q: torch.Tensor,
    x_k: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    positions: torch.Tensor,
    theta: float,
    *,
    interleaved: bool = False,
) -> torch.Tensor:
    """Scores of one query token against one key token, placed at every pair of positions, with RoPE.

    Entry ``[m, n]`` is ``(R_pm W_q x_q) . (R_pn W_k x_k)`` for ``pm =
    positions[m]`` and ``pn = positions[n]``: the same two tokens, only their
    positions change. With RoPE it depends on pm - pn alone, so every
    diagonal of the grid is constant (see :func:`offset_spread`).

    Args:
        x_q, x_k: the two tokens' vectors, (hidden,).
        w_q, w_k: one head's query and key projections, (D, hidden).
        positions: integer positions, (P,).
        theta: RoPE's base.
        interleaved: adjacent pairs instead of halves.

    Returns:
        (P, P), unscaled (no 1/sqrt(D)).
    """
    _check_projection("query", x_q, w_q)
    _check_projection("key", x_k, w_k)
    cos, sin = rope_angles(positions, w_q.shape[0], theta)                 # (P, D/2)
    P = positions.shape[0]
    q = apply_rope((w_q @ x_q).expand(P, -1), cos, sin, interleaved=interleaved)  # (P, D): at every position
    k = apply_rope((w_k @ x_k).expand(P, -1), cos, sin, interleaved=interleaved)  # (P, D)
    return q @ k.T                                                         # (P, P)


def absolute_position_scores(
    x_q: torch.Tensor,
    x_k: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    position_embeddings: torch.Tensor,
) -> torch.Tensor:
    """The same grid as :func:`rope_position_scores`, with absolute positions added to the input instead.

    Entry ``[m, n]`` is ``(W_q (x_q + p_m)) . (W_k (x_k + p_n))``, where row m
    of ``position_embeddings`` (P, hidden) is p_m (:func:`sinusoidal_positions`,
    or learned ones). Expanded, it is a content-content term plus
    ``x_q W_q^T W_k p_n`` (depends on n), ``p_m W_q^T W_k x_k`` (on m) and
    ``p_m W_q^T W_k p_n``: not a function of m - n in general.

    Returns:
        (P, P), unscaled.
    """
    _check_projection("query", x_q, w_q)
    _check_projection("key", x_k, w_k)
    if position_embeddings.dim() != 2 or position_embeddings.shape[1] != x_q.shape[0]:
        raise ValueError(
            f"position_embeddings must be (P, {x_q.shape[0]}), got {tuple(position_embeddings.shape)}"
        )
    q = (x_q + position_embeddings) @ w_q.T                                # (P, D)
    k = (x_k + position_embeddings) @ w_k.T                                # (P, D)
    return q @ k.T                                                         # (P, P)


def offset_spread(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How much a (P, P) grid of scores depends on more than the offset m - n.

    Returns:
        ``(offsets, spread)``, each (2P - 1,): for each offset ``m - n`` from
        -(P - 1) to P - 1, the largest minus the smallest entry with that
        offset. All zeros (up to rounding) when the grid is constant along its
        diagonals, that is, when scores depend on m - n alone.
    """
    if grid.dim() != 2 or grid.shape[0] != grid.shape[1]:
        raise ValueError(f"expected a square (P, P) grid, got shape {tuple(grid.shape)}")
    P = grid.shape[0]
    offsets = torch.arange(-(P - 1), P)                                    # m - n
    spread = torch.empty(2 * P - 1, dtype=grid.dtype, device=grid.device)
    for i, offset in enumerate(offsets.tolist()):
        same = torch.diagonal(grid, -offset)       # the entries [m, m - offset]: all with m - n = offset
        spread[i] = same.max() - same.min()
    return offsets, spread                                                 # (2P - 1,) each
