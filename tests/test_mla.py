"""kqv.mla: naive equals absorbed, the latent cache is what is stored, shapes are DeepSeek-V2's."""

import pytest
import torch

from kqv import MultiHeadLatentAttention
from kqv.cache import LatentCache

from conftest import TOL

WIDTHS = dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)


def pair(q_lora_rank, device, dtype=torch.float32):
    naive = MultiHeadLatentAttention(64, 4, q_lora_rank=q_lora_rank, **WIDTHS).to(device=device, dtype=dtype)
    absorbed = MultiHeadLatentAttention(64, 4, q_lora_rank=q_lora_rank, absorb=True, **WIDTHS).to(device=device, dtype=dtype)
    absorbed.load_state_dict(naive.state_dict())
    return naive, absorbed


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_naive_equals_absorbed_at_prefill(device, q_lora_rank):
    naive, absorbed = pair(q_lora_rank, device)
    x = torch.randn(2, 7, 64, device=device)
    assert torch.allclose(naive(x), absorbed(x), atol=1e-5)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_naive_equals_absorbed_at_decode(device, q_lora_rank):
    naive, absorbed = pair(q_lora_rank, device)
    x = torch.randn(2, 9, 64, device=device)
    full = naive(x)
    for model in (naive, absorbed):
        cache = model.new_cache(2, 9)
        steps = [model(x[:, :4], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(4, 9)]
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(device, dtype):
    naive, absorbed = pair(None, device, dtype)
    x = torch.randn(1, 5, 64, device=device, dtype=dtype)
    a, b = naive(x), absorbed(x)
    assert a.dtype == b.dtype == dtype
    assert torch.allclose(a.float(), b.float(), atol=TOL[dtype] * 10)


def test_float64_paths_agree_to_float64_precision(device):
    """Nothing on either path rounds through float32."""
    naive, absorbed = pair(24, device, torch.float64)
    x = torch.randn(2, 7, 64, device=device, dtype=torch.float64)
    torch.testing.assert_close(naive(x), absorbed(x), atol=1e-12, rtol=0)


def test_yarn_sharpens_the_scale_and_leaves_the_paths_equal(device):
    """With YaRN the scale is 1 / sqrt(D_nope + d_r) times mscale^2; naive still equals absorbed."""
    from kqv.rope import YaRN

    yarn = YaRN(factor=40, original_max_position_embeddings=64, mscale=0.707, mscale_all_dim=0.707)
    naive = MultiHeadLatentAttention(64, 4, q_lora_rank=None, rope_scaling=yarn, **WIDTHS).to(device)
    absorbed = MultiHeadLatentAttention(64, 4, q_lora_rank=None, rope_scaling=yarn, absorb=True, **WIDTHS).to(device)
    absorbed.load_state_dict(naive.state_dict())
    assert naive.scale == pytest.approx(yarn.softmax_scale / (16 + 8) ** 0.5)
    assert "rope_scaling=YaRN(factor=40" in repr(naive)
    x = torch.randn(2, 7, 64, device=device)
    assert torch.allclose(naive(x), absorbed(x), atol=1e-5)
    plain = MultiHeadLatentAttention(64, 4, q_lora_rank=None, **WIDTHS).to(device)
    plain.load_state_dict(naive.state_dict())
    assert not torch.allclose(plain(x), naive(x), atol=1e-3)  # the scaling changes the output
    with pytest.raises(TypeError, match="rope_scaling must be a kqv.rope.YaRN or None"):
        MultiHeadLatentAttention(64, 4, q_lora_rank=None, rope_scaling={"factor": 40}, **WIDTHS)


def test_cache_holds_only_latent_and_rope_key(device):
    _, absorbed = pair(None, device)
    cache = absorbed.new_cache(3, 10, dtype=torch.bfloat16)
    assert isinstance(cache, LatentCache)
    assert cache.bytes_per_token == (32 + 8) * 2  # (d_c + d_r) numbers, whatever the number of heads
    assert cache.nbytes == sum(t.element_size() * t.numel() for t in cache.buffers.values())


def test_cached_latent_is_the_normalized_latent_and_rotated_key():
    naive, _ = pair(None, "cpu")
    x = torch.randn(1, 3, 64)
    cache = naive.new_cache(1, 3)
    naive(x, cache=cache)
    c_kv, _ = naive.kv_a_proj_with_mqa(x).split([32, 8], -1)
    assert torch.allclose(cache.buffers["latent"][..., :32], naive.kv_a_layernorm(c_kv), atol=1e-6)


def test_hugging_face_parameter_shapes():
    m = MultiHeadLatentAttention(2048, 16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {
        "q_proj.weight": (16 * 192, 2048),
        "kv_a_proj_with_mqa.weight": (576, 2048),
        "kv_a_layernorm.weight": (512,),
        "kv_b_proj.weight": (16 * 256, 512),
        "o_proj.weight": (2048, 16 * 128),
    }
    q = MultiHeadLatentAttention(64, 4, q_lora_rank=24, **WIDTHS)
    assert {n for n, _ in q.named_parameters()} >= {"q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"}


def test_attention_weights_are_a_distribution():
    naive, _ = pair(None, "cpu")
    w = naive.attention_weights(torch.randn(1, 5, 64))
    assert w.shape == (1, 4, 5, 5)
    assert torch.allclose(w.sum(-1), torch.ones(1, 4, 5)) and (w.triu(1) == 0).all()


def test_errors():
    with pytest.raises(ValueError, match="qk_rope_head_dim must be even.*got 7"):
        MultiHeadLatentAttention(64, 4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=7, v_head_dim=12)
    naive, _ = pair(None, "cpu")
    with pytest.raises(ValueError, match=r"\(B, T, 64\)"):
        naive(torch.randn(1, 3, 32))
    cache = naive.new_cache(1, 4)
    naive(torch.randn(1, 3, 64), cache=cache)
    with pytest.raises(RuntimeError, match="holds 3 of max_len=4"):
        naive(torch.randn(1, 2, 64), cache=cache)
    with pytest.raises(ValueError, match="expected 3..3, got \\[5\\]"):
        naive(torch.randn(1, 1, 64), positions=torch.tensor([5]), cache=cache)
