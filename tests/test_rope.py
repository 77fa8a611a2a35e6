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


# --- Looking at RoPE (chapter "Rotary positions") -------------------------------------------------

from kqv.rope import (  # noqa: E402
    absolute_position_scores,
    ntk_aware_theta,
    offset_spread,
    rope_matrix,
    rope_position_scores,
    sinusoidal_positions,
)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_matrix_is_the_rotation_apply_rope_applies(interleaved):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g)
    for n in (0, 3, 1000, -7):
        cos, sin = rope_angles(torch.full((5,), n), 8, 500.0)
        rotated = apply_rope(x, cos, sin, interleaved=interleaved)
        torch.testing.assert_close(x @ rope_matrix(n, 8, 500.0, interleaved=interleaved).T, rotated)
    torch.testing.assert_close(rope_matrix(0, 8, 500.0), torch.eye(8))


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotations_compose_into_the_offset(interleaved):
    """R_m^T R_n = R_(n - m): orthogonal, and only the difference of the positions is left."""
    R = {n: rope_matrix(n, 16, 10000.0, interleaved=interleaved) for n in (0, 2, 5, 9, 12)}
    torch.testing.assert_close(R[9].T @ R[9], torch.eye(16), atol=1e-6, rtol=0)
    torch.testing.assert_close(R[5].T @ R[12], rope_matrix(7, 16, 10000.0, interleaved=interleaved), atol=1e-6, rtol=0)
    torch.testing.assert_close(R[9].T @ R[2], rope_matrix(-7, 16, 10000.0, interleaved=interleaved), atol=1e-6, rtol=0)


def test_rope_matrix_errors_name_values():
    with pytest.raises(TypeError, match="position must be an integer, got 1.5"):
        rope_matrix(1.5, 8, 10000.0)
    with pytest.raises(ValueError, match="even width, got dim=7"):
        rope_matrix(1, 7, 10000.0)


def test_sinusoidal_positions_follow_the_transformer_paper():
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)) (Vaswani et al., section 3.5)."""
    pe = sinusoidal_positions(torch.arange(50), 16)
    assert pe.shape == (50, 16)
    for pos, i in ((0, 0), (7, 0), (7, 3), (49, 7)):
        angle = pos / 10000 ** (2 * i / 16)
        assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
        assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    with pytest.raises(ValueError, match="even width, got dim=5"):
        sinusoidal_positions(torch.arange(3), 5)
    with pytest.raises(TypeError, match="integers, got dtype torch.float32"):
        sinusoidal_positions(torch.arange(3.0), 4)


def _tokens_and_head(hidden=24, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(hidden, generator=g), torch.randn(hidden, generator=g),
            torch.randn(D, hidden, generator=g) / hidden**0.5, torch.randn(D, hidden, generator=g) / hidden**0.5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_scores_depend_on_the_offset_alone(interleaved):
    x_q, x_k, w_q, w_k = _tokens_and_head()
    positions = torch.arange(3, 40)
    grid = rope_position_scores(x_q, x_k, w_q, w_k, positions, 100.0, interleaved=interleaved)
    assert grid.shape == (37, 37)
    m, n = 30, 11                                                # one entry, computed the long way
    q = rope_matrix(int(positions[m]), 8, 100.0, interleaved=interleaved) @ (w_q @ x_q)
    k = rope_matrix(int(positions[n]), 8, 100.0, interleaved=interleaved) @ (w_k @ x_k)
    assert grid[m, n].item() == pytest.approx(float(q @ k), abs=1e-5)
    offsets, spread = offset_spread(grid)
    assert offsets.tolist() == list(range(-36, 37))
    assert spread.max() < 1e-4 * grid.abs().max()
    assert grid.std() > 0.1 * grid.abs().max()                   # and it does depend on the offset


def test_absolute_scores_depend_on_both_positions():
    x_q, x_k, w_q, w_k = _tokens_and_head()
    positions = torch.arange(40)
    pe = sinusoidal_positions(positions, 24)
    grid = absolute_position_scores(x_q, x_k, w_q, w_k, pe)
    m, n = 17, 4
    expected = (w_q @ (x_q + pe[m])) @ (w_k @ (x_k + pe[n]))
    assert grid[m, n].item() == pytest.approx(float(expected), abs=1e-5)
    assert offset_spread(grid)[1].max() > 0.1 * grid.abs().max()
    # Without positions the grid is one number everywhere: attention alone has no order.
    flat = absolute_position_scores(x_q, x_k, w_q, w_k, torch.zeros(40, 24))
    assert offset_spread(flat)[1].max() < 1e-6 and torch.allclose(flat, flat[0, 0].expand(40, 40))


def test_position_score_errors_name_shapes():
    x_q, x_k, w_q, w_k = _tokens_and_head()
    with pytest.raises(ValueError, match=r"query: expected a vector \(hidden,\) and a projection \(D, hidden\), got \(24,\) and \(8, 23\)"):
        rope_position_scores(x_q, x_k, w_q[:, :23], w_k, torch.arange(4), 100.0)
    with pytest.raises(ValueError, match=r"position_embeddings must be \(P, 24\), got \(4, 16\)"):
        absolute_position_scores(x_q, x_k, w_q, w_k, torch.zeros(4, 16))
    with pytest.raises(ValueError, match=r"square \(P, P\) grid, got shape \(3, 4\)"):
        offset_spread(torch.zeros(3, 4))


def test_offset_spread_measures_each_diagonal():
    grid = torch.tensor([[0.0, 1.0, 2.0], [5.0, 0.5, 1.0], [9.0, 5.0, 0.0]])
    offsets, spread = offset_spread(grid)
    assert offsets.tolist() == [-2, -1, 0, 1, 2]
    torch.testing.assert_close(spread, torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0]))


def test_ntk_aware_base_keeps_the_fastest_pair_and_slows_the_slowest_by_the_factor():
    """YaRN paper, definition 1 and appendix A.1: b' = b s^(D / (D - 2))."""
    for dim, theta, factor in ((64, 10000.0, 40.0), (128, 500000.0, 4.0), (8, 100.0, 2.0)):
        plain = rope_frequencies(dim, theta).double()
        scaled = rope_frequencies(dim, ntk_aware_theta(theta, factor, dim)).double()
        assert scaled[0].item() == pytest.approx(plain[0].item())
        assert (plain[-1] / scaled[-1]).item() == pytest.approx(factor, rel=1e-4)
        ratio = plain / scaled                                    # how much each pair slows down
        assert bool((ratio[1:] >= ratio[:-1]).all())               # more and more towards the slow end
    assert ntk_aware_theta(10000.0, 1.0, 64) == 10000.0
    with pytest.raises(ValueError, match="factor must be at least 1, got 0.5"):
        ntk_aware_theta(10000.0, 0.5, 64)
    with pytest.raises(ValueError, match="even width of at least 4, got dim=2"):
        ntk_aware_theta(10000.0, 2.0, 2)
