"""Rotary position embeddings (RoPE), in the two conventions real models use.

Su et al. (2021) rotate each pair of coordinates of a query or key by an angle
proportional to the token's position, so that the dot product of a query at
position m and a key at position n depends only on m - n. Pair i turns at the
frequency ``theta ** (-2i / D)``.

Which coordinates form a pair is a convention, and checkpoints are not
interchangeable between the two:

- ``interleaved=False`` (Llama, "rotate half"): pair i is (x[i], x[i + D/2]).
- ``interleaved=True`` (DeepSeek-V2, adjacent pairs): pair i is (x[2i], x[2i+1]).

Longer contexts than a model was trained on: :class:`YaRN` (Peng et al. 2023,
arXiv 2309.00071), the scaling DeepSeek-V2 and V3 ship with, slows the slowest
pairs down by a factor so that their angles stay within what training saw,
leaves the fastest pairs alone, and blends the pairs in between.

Book: chapter 7 ("Decoupled RoPE") explains why RoPE stops MLA from folding
W_UK into the query, and why DeepSeek gives RoPE its own narrow slice (d_r).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["YaRN", "yarn_mscale", "rope_frequencies", "rope_angles", "apply_rope"]


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
        scaling: YaRN's frequencies and magnitude (:class:`YaRN`), or None for plain RoPE.

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
