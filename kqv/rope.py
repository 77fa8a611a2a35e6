"""Rotary position embeddings (RoPE), in the two conventions real models use.

Su et al. (2021) rotate each pair of coordinates of a query or key by an angle
proportional to the token's position, so that the dot product of a query at
position m and a key at position n depends only on m - n. Pair i turns at the
frequency ``theta ** (-2i / D)``.

Which coordinates form a pair is a convention, and checkpoints are not
interchangeable between the two:

- ``interleaved=False`` (Llama, "rotate half"): pair i is (x[i], x[i + D/2]).
- ``interleaved=True`` (DeepSeek-V2, adjacent pairs): pair i is (x[2i], x[2i+1]).

Book: chapter 7 ("Decoupled RoPE") explains why RoPE stops MLA from folding
W_UK into the query, and why DeepSeek gives RoPE its own narrow slice (d_r).
"""

from __future__ import annotations

import torch

__all__ = ["rope_angles", "apply_rope"]


def rope_angles(
    positions: torch.Tensor, dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the rotation angles, in float32.

    Args:
        positions: integer positions, shape (T,) or (B, T).
        dim: the rotated width D (even).
        theta: the base of the frequencies (10000 in the RoFormer paper).

    Returns:
        ``(cos, sin)``, each of shape ``(*positions.shape, D/2)``: one angle per pair.
    """
    if dim % 2:
        raise ValueError(f"RoPE needs an even width, got dim={dim}")
    if positions.is_floating_point() or positions.is_complex():
        raise TypeError(f"positions must be integers, got dtype {positions.dtype}")
    exponents = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim
    inv_freq = 1.0 / (theta**exponents)                                   # (D/2,)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq          # (..., T, D/2)
    return angles.cos(), angles.sin()


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
