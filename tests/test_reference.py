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


def deepseek_pair(q_lora_rank):
    cfg = transformers.DeepseekV2Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        rope_theta=10000.0, max_position_embeddings=64, attention_bias=False,
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


@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("absorb", [False, True])
def test_deepseek_v2_attention(q_lora_rank, absorb):
    theirs, rope = deepseek_pair(q_lora_rank)
    ours = kqv.MultiHeadLatentAttention(
        64, 4, q_lora_rank=q_lora_rank, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, rope_theta=10000.0, absorb=absorb,
    )
    ours.load_state_dict(theirs.state_dict())  # strict: the same names and shapes
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        expected, _ = theirs(x, attention_mask=None, position_embeddings=rope(x, torch.arange(10).expand(2, 10)))
        assert torch.allclose(ours(x), expected, atol=1e-5)
        cache = ours.new_cache(2, 10)
        steps = [ours(x[:, :6], cache=cache)] + [ours(x[:, i : i + 1], cache=cache) for i in range(6, 10)]
    assert torch.allclose(torch.cat(steps, 1), expected, atol=1e-5)
