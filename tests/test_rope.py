"""kqv.rope: plain RoPE, and YaRN as DeepSeek-V2 and V3 configure it (checked against Hugging Face's own)."""

import math

import pytest
import torch

from kqv.rope import YaRN, apply_rope, rope_angles, rope_frequencies, yarn_mscale

V2 = YaRN(factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)


def test_plain_rope_is_unchanged_without_scaling():
    positions = torch.arange(7)
    cos, sin = rope_angles(positions, 8, 10000.0)
    inv = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    torch.testing.assert_close(cos, (positions[:, None] * inv).cos())
    torch.testing.assert_close(sin, (positions[:, None] * inv).sin())


def test_yarn_keeps_fast_pairs_and_slows_slow_pairs_by_the_factor():
    """DeepSeek-V2's d_r = 64: pairs that turn > 32 times in 4096 tokens keep their frequency, < 1 time are / 40."""
    dim, theta, L = 64, 10000.0, 4096
    plain, scaled = rope_frequencies(dim, theta), rope_frequencies(dim, theta, V2)
    turns = L * plain / (2 * math.pi)                                   # rotations over the training length
    fast, slow = turns > 32, turns < 1
    assert fast.any() and slow.any() and not (fast & slow).any()
    torch.testing.assert_close(scaled[fast], plain[fast])
    torch.testing.assert_close(scaled[slow], plain[slow] / 40)
    between = ~(fast | slow)                                            # the ramp: in between, never outside
    assert bool(((scaled[between] <= plain[between]) & (scaled[between] >= plain[between] / 40)).all())
    ramp = V2.ramp(dim, theta)
    assert bool((ramp[1:] >= ramp[:-1]).all()) and ramp.min() == 0 and ramp.max() == 1


def test_yarn_scales_deepseek_v2():
    """mscale = mscale_all_dim: cosines unchanged, scores times (0.1 * 0.707 * ln 40 + 1)^2, about 1.59."""
    assert V2.attention_factor == 1.0
    assert V2.softmax_scale == pytest.approx((0.1 * 0.707 * math.log(40) + 1) ** 2)
    assert round(V2.softmax_scale, 2) == 1.59
    plain = YaRN(factor=40, original_max_position_embeddings=4096)  # no mscales: the YaRN paper's sqrt(1/t)
    assert plain.attention_factor == pytest.approx(0.1 * math.log(40) + 1) and plain.softmax_scale == 1.0
    assert yarn_mscale(1.0, 0.707) == 1.0
    cos, sin = rope_angles(torch.arange(5), 8, 10000.0, plain)
    assert torch.allclose(cos**2 + sin**2, torch.full_like(cos, plain.attention_factor**2))


@pytest.mark.parametrize("mscale, mscale_all_dim", [(0.707, 0.707), (1.0, 1.0), (1.0, 0.707), (None, None)])
def test_yarn_equals_hugging_face(mscale, mscale_all_dim):
    """Frequencies and cos/sin factor from transformers' _compute_yarn_parameters, its softmax scale from yarn_get_mscale."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
              "beta_fast": 32, "beta_slow": 1}
    params.update({k: v for k, v in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim)) if v is not None})
    cfg = transformers.DeepseekV2Config(
        hidden_size=64, num_attention_heads=4, qk_rope_head_dim=64, max_position_embeddings=163840,
        rope_parameters=params,
    )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    ours = YaRN(factor=40, original_max_position_embeddings=4096, mscale=mscale, mscale_all_dim=mscale_all_dim)
    torch.testing.assert_close(rope_frequencies(64, 10000.0, ours), inv_freq)
    assert ours.attention_factor == pytest.approx(attention_factor)


def test_yarn_checks_itself():
    with pytest.raises(ValueError, match="factor must be at least 1, got 0.5"):
        YaRN(factor=0.5, original_max_position_embeddings=4096)
    with pytest.raises(ValueError, match="original_max_position_embeddings must be a positive integer, got 0"):
        YaRN(factor=40, original_max_position_embeddings=0)
    with pytest.raises(ValueError, match="beta_fast >= beta_slow > 0, got beta_fast=1, beta_slow=32"):
        YaRN(factor=40, original_max_position_embeddings=4096, beta_fast=1, beta_slow=32)
    with pytest.raises(ValueError, match="mscale_all_dim must be non-negative or None, got -1"):
        YaRN(factor=40, original_max_position_embeddings=4096, mscale_all_dim=-1)


def test_rope_errors_name_values():
    with pytest.raises(ValueError, match="even width, got dim=7"):
        rope_angles(torch.arange(3), 7, 10000.0)
    with pytest.raises(TypeError, match="float32"):
        rope_angles(torch.arange(3.0), 8, 10000.0)
    cos, sin = rope_angles(torch.arange(3), 8, 10000.0)
    with pytest.raises(ValueError, match="width 6 but the angles cover 8"):
        apply_rope(torch.randn(1, 1, 3, 6), cos, sin)
