"""Against implementations we did not write: Hugging Face transformers' Llama and DeepSeek-V2 attention.

Their state dicts load into kqv unchanged (same names, same shapes) and give the
same outputs. transformers is a test-only dependency.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_ds  # noqa: E402
from transformers.models.llama import modeling_llama as hf_llama  # noqa: E402

import kqv  # noqa: E402
from kqv.rope import YaRN  # noqa: E402


def llama_pair(num_kv_heads, bias):
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=num_kv_heads, head_dim=8,
        attention_bias=bias, rope_theta=10000.0, max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    theirs = hf_llama.LlamaAttention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    ours = kqv.Attention(64, 8, num_kv_heads, 8, rope_theta=10000.0, bias=bias)
    ours.load_state_dict(theirs.state_dict())  # strict: the same names and shapes
    rope = hf_llama.LlamaRotaryEmbedding(cfg)
    return theirs, ours, rope


@pytest.mark.parametrize("num_kv_heads", [8, 2, 1])
@pytest.mark.parametrize("bias", [False, True])
def test_llama_attention(num_kv_heads, bias):
    theirs, ours, rope = llama_pair(num_kv_heads, bias)
    x = torch.randn(2, 11, 64)
    positions = torch.arange(11).expand(2, 11)
    with torch.no_grad():
        expected, _ = theirs(x, position_embeddings=rope(x, positions), attention_mask=None)
        for fused in (False, True):
            ours.fused = fused
            assert torch.allclose(ours(x), expected, atol=1e-5)


def test_llama_attention_decode_against_their_prefill():
    """Our cached decode of the last token equals the last row of their full prefill."""
    theirs, ours, rope = llama_pair(2, False)
    x = torch.randn(1, 9, 64)
    with torch.no_grad():
        expected, _ = theirs(x, position_embeddings=rope(x, torch.arange(9)[None]), attention_mask=None)
        cache = ours.new_cache(1, 9)
        ours(x[:, :8], cache=cache)
        last = ours(x[:, 8:], cache=cache)
    assert torch.allclose(last, expected[:, 8:], atol=1e-5)


def deepseek_pair(q_lora_rank, yarn=None):
    """Hugging Face's DeepseekV2Attention with small random weights, plain RoPE or the given YaRN parameters."""
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn is not None:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, **yarn}
    cfg = transformers.DeepseekV2Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        rope_parameters=rope, max_position_embeddings=64 if yarn is None else 163840, attention_bias=False,
        attn_implementation="sdpa",
    )
    theirs = hf_ds.DeepseekV2Attention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)
    rope = hf_ds.DeepseekV2RotaryEmbedding(cfg)
    return theirs, rope


def assert_same_as_theirs(theirs, rope, ours):
    """Our prefill, and our prefill then cached decode steps, equal their prefill."""
    ours.load_state_dict(theirs.state_dict())  # strict: the same names and shapes
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        expected, _ = theirs(x, attention_mask=None, position_embeddings=rope(x, torch.arange(10).expand(2, 10)))
        assert torch.allclose(ours(x), expected, atol=1e-5)
        cache = ours.new_cache(2, 10)
        steps = [ours(x[:, :6], cache=cache)] + [ours(x[:, i : i + 1], cache=cache) for i in range(6, 10)]
    assert torch.allclose(torch.cat(steps, 1), expected, atol=1e-5)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("absorb", [False, True])
def test_deepseek_v2_attention(q_lora_rank, absorb):
    theirs, rope = deepseek_pair(q_lora_rank)
    ours = kqv.MultiHeadLatentAttention(
        64, 4, q_lora_rank=q_lora_rank, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, rope_theta=10000.0, absorb=absorb,
    )
    assert_same_as_theirs(theirs, rope, ours)


# DeepSeek-V2's own YaRN; and one whose two mscales differ, so that the cosines are scaled too.
YARNS = {
    "DeepSeek-V2": dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                        mscale=0.707, mscale_all_dim=0.707),
    "mscales differ": dict(factor=8.0, original_max_position_embeddings=256, beta_fast=32, beta_slow=1,
                           mscale=1.0, mscale_all_dim=0.5),
}


@pytest.mark.parametrize("yarn", list(YARNS.values()), ids=list(YARNS))
@pytest.mark.parametrize("absorb", [False, True])
def test_deepseek_v2_attention_with_yarn(yarn, absorb):
    """YaRN's frequencies and both of its scales, as transformers applies them to DeepseekV2Attention."""
    theirs, rope = deepseek_pair(24, yarn)
    scaling = YaRN(**yarn)
    ours = kqv.MultiHeadLatentAttention(
        64, 4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        rope_theta=10000.0, rope_scaling=scaling, absorb=absorb,
    )
    assert ours.scale == pytest.approx(theirs.scaling)
    assert scaling.softmax_scale > 1.2 and (scaling.attention_factor != 1.0) == (yarn["mscale"] != yarn["mscale_all_dim"])
    assert_same_as_theirs(theirs, rope, ours)


def test_registry_deepseek_v2_lite_builds_hugging_faces_scale():
    """The registry's V2-Lite (YaRN, eps 1e-6) gives the attention scale transformers computes from its config.json."""
    lite = kqv.configs.get("deepseek-ai/DeepSeek-V2-Lite")
    with torch.device("meta"):
        ours = kqv.model.make_attention(lite)
    y = lite.rope_scaling
    cfg = transformers.DeepseekV2Config(
        hidden_size=lite.hidden_size, num_attention_heads=lite.num_heads, q_lora_rank=None,
        kv_lora_rank=lite.kv_lora_rank, qk_nope_head_dim=lite.qk_nope_head_dim,
        qk_rope_head_dim=lite.qk_rope_head_dim, v_head_dim=lite.v_head_dim, max_position_embeddings=163840,
        rope_parameters={"rope_type": "yarn", "rope_theta": lite.rope_theta, "factor": y.factor,
                         "original_max_position_embeddings": y.original_max_position_embeddings,
                         "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "mscale": y.mscale,
                         "mscale_all_dim": y.mscale_all_dim},
    )
    with torch.device("meta"):
        theirs = hf_ds.DeepseekV2Attention(cfg, layer_idx=0)
    assert ours.scale == pytest.approx(theirs.scaling)
    assert ours.kv_a_layernorm.eps == 1e-6
