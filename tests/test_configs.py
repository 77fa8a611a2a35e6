"""kqv.configs: self-checking configs, the registry, and the calculator's published figures."""

import dataclasses

import pytest
import torch

from kqv import configs
from kqv.configs import ModelConfig, YaRN, kv_elements_per_token
from kqv.model import make_attention


def test_article_figures_per_token_per_layer():
    """The source article: d_model 4096, 32 heads -> 8192, 256, 2048 and 512 numbers."""
    per_layer = {n: kv_elements_per_token(configs.get(f"article/{n}"), per_layer=True) for n in ("MHA", "MQA", "GQA", "MLA")}
    assert per_layer == {"MHA": 8192, "MQA": 256, "GQA": 2048, "MLA": 512}
    assert per_layer["MLA"] / per_layer["MHA"] == 0.0625
    assert per_layer["MHA"] / per_layer["MQA"] == 32


def test_deepseek_v2_mla_figures():
    """DeepSeek-V2 Table 9: 34.6K (DeepSeek-V2) and 15.6K (the small MoE, V2-Lite) elements per token."""
    assert round(kv_elements_per_token(configs.get("deepseek-ai/DeepSeek-V2")) / 1000, 1) == 34.6
    assert round(kv_elements_per_token(configs.get("deepseek-ai/DeepSeek-V2-Lite")) / 1000, 1) == 15.6
    # With RoPE counted, MLA keeps 512 + 64 = 576 numbers per token per layer.
    assert kv_elements_per_token(configs.get("deepseek-ai/DeepSeek-V2"), per_layer=True) == 576


def test_small_moe_mha_baseline():
    """Table 9's 110.6K: the V2-Lite geometry with every head caching its own K and V."""
    lite = configs.get("deepseek-ai/DeepSeek-V2-Lite")
    mha = ModelConfig("mha-baseline", lite.num_layers, lite.hidden_size, lite.num_heads, lite.num_heads, lite.head_dim)
    assert round(kv_elements_per_token(mha) / 1000, 1) == 110.6


def test_formula_against_buffers():
    """2 * layers * H_kv * D numbers, in bytes of the dtype."""
    c = configs.get("meta-llama/Meta-Llama-3-8B")
    assert configs.kv_bytes_per_token(c, torch.float16) == 2 * 32 * 8 * 128 * 2
    assert configs.kv_cache_bytes(c, 8192, batch_size=4, dtype="float32") == 2 * 32 * 8 * 128 * 4 * 8192 * 4


@pytest.mark.parametrize(
    "name, layers, hidden, heads, kv_heads, head_dim",
    [
        ("meta-llama/Llama-2-7b-hf", 32, 4096, 32, 32, 128),
        ("meta-llama/Llama-2-70b-hf", 80, 8192, 64, 8, 128),
        ("meta-llama/Meta-Llama-3-8B", 32, 4096, 32, 8, 128),
        ("mistralai/Mistral-7B-v0.1", 32, 4096, 32, 8, 128),
        ("Qwen/Qwen2.5-7B", 28, 3584, 28, 4, 128),
        ("openai-community/gpt2", 12, 768, 12, 12, 64),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", 30, 576, 9, 3, 64),
    ],
)
def test_published_configs(name, layers, hidden, heads, kv_heads, head_dim):
    c = configs.get(name)
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (layers, hidden, heads, kv_heads, head_dim)
    assert c.source


# Published attention shapes: layers l, heads H, KV heads H_kv, head width D; MLA: d_c, d_r, d_q.
MQA_MODELS = [
    # name, l, hidden, H, H_kv, D
    ("paper/PaLM-540B", 118, 18432, 48, 1, 256),        # D = 256, not 18432 / 48 = 384
    ("tiiuae/falcon-7b", 32, 4544, 71, 1, 64),
    ("bigcode/starcoder", 40, 6144, 48, 1, 128),
    ("google/gemma-2b", 18, 2048, 8, 1, 256),
]
MLA_MODELS = [
    # name, l, hidden, H, d_c, d_r, d_q, D_nope, D_v
    ("deepseek-ai/DeepSeek-V2", 60, 5120, 128, 512, 64, 1536, 128, 128),
    ("deepseek-ai/DeepSeek-V2-Lite", 27, 2048, 16, 512, 64, None, 128, 128),
    ("deepseek-ai/DeepSeek-V3", 61, 7168, 128, 512, 64, 1536, 128, 128),
    ("moonshotai/Kimi-K2-Instruct", 61, 7168, 64, 512, 64, 1536, 128, 128),
    ("openbmb/MiniCPM3-4B", 62, 2560, 40, 256, 32, 768, 64, 64),
]


@pytest.mark.parametrize("name, layers, hidden, heads, kv_heads, head_dim", MQA_MODELS)
def test_mqa_models(name, layers, hidden, heads, kv_heads, head_dim):
    """One KV head each: the calculator keeps 2 * D numbers per token per layer, 2 * D * l in all."""
    c = configs.get(name)
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (layers, hidden, heads, kv_heads, head_dim)
    assert c.attention == "MQA" and c.source
    assert kv_elements_per_token(c, per_layer=True) == 2 * head_dim
    assert configs.kv_bytes_per_token(c, torch.bfloat16) == 2 * head_dim * layers * 2


@pytest.mark.parametrize("name, layers, hidden, heads, d_c, d_r, d_q, d_nope, d_v", MLA_MODELS)
def test_mla_models(name, layers, hidden, heads, d_c, d_r, d_q, d_nope, d_v):
    """(d_c + d_r) numbers per token per layer, whatever the number of heads."""
    c = configs.get(name)
    got = (c.num_layers, c.hidden_size, c.num_heads, c.kv_lora_rank, c.qk_rope_head_dim, c.q_lora_rank,
           c.qk_nope_head_dim, c.v_head_dim)
    assert got == (layers, hidden, heads, d_c, d_r, d_q, d_nope, d_v)
    assert c.attention == "MLA" and c.source
    assert kv_elements_per_token(c) == (d_c + d_r) * layers
    assert configs.kv_bytes_per_token(c, "float8_e4m3fn") == (d_c + d_r) * layers


def test_deepseek_yarn_and_norm_eps():
    """The released config.json files: YaRN factor 40 from 4096 tokens, RMSNorm eps 1e-6."""
    v2, lite, v3 = (configs.get(f"deepseek-ai/DeepSeek-{n}") for n in ("V2", "V2-Lite", "V3"))
    for c in (v2, lite, v3):
        y = c.rope_scaling
        assert (y.factor, y.original_max_position_embeddings, y.beta_fast, y.beta_slow) == (40, 4096, 32, 1)
        assert c.rms_norm_eps == 1e-6 and c.rope_theta == 10000.0
    assert v2.rope_scaling.mscale == v2.rope_scaling.mscale_all_dim == lite.rope_scaling.mscale_all_dim == 0.707
    assert v3.rope_scaling.mscale == v3.rope_scaling.mscale_all_dim == 1.0
    assert round(v2.rope_scaling.softmax_scale, 3) == 1.59 and round(v3.rope_scaling.softmax_scale, 3) == 1.874
    # Only the DeepSeek models carry YaRN here.
    assert {n for n in configs.names() if configs.get(n).rope_scaling} == {v2.name, lite.name, v3.name}


def test_rope_scaling_is_checked():
    c = configs.get("article/MLA")
    with pytest.raises(TypeError, match=r"rope_scaling must be a kqv.rope.YaRN or None, got \{'type': 'yarn'\}"):
        c.replace(rope_scaling={"type": "yarn"})
    with pytest.raises(ValueError, match="rope_theta is None"):
        c.replace(rope_scaling=YaRN(factor=2, original_max_position_embeddings=8), rope_theta=None)
    with pytest.raises(ValueError, match=r"article/MHA: kqv.Attention has plain RoPE only"):
        make_attention(configs.get("article/MHA").replace(rope_scaling=YaRN(factor=2, original_max_position_embeddings=8)))


def test_deepseek_widths():
    v2, v3 = configs.get("deepseek-ai/DeepSeek-V2"), configs.get("deepseek-ai/DeepSeek-V3")
    for c in (v2, v3):
        assert (c.kv_lora_rank, c.qk_rope_head_dim, c.q_lora_rank, c.num_heads) == (512, 64, 1536, 128)
    assert (v2.num_layers, v2.hidden_size, v3.num_layers, v3.hidden_size) == (60, 5120, 61, 7168)
    assert configs.get("deepseek-ai/DeepSeek-V2-Lite").q_lora_rank is None


def test_attention_kinds():
    kinds = {n: configs.get(n).attention for n in ("article/MHA", "article/GQA", "article/MQA", "article/MLA")}
    assert kinds == {"article/MHA": "MHA", "article/GQA": "GQA", "article/MQA": "MQA", "article/MLA": "MLA"}


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError) as err:
        configs.get("llama")  # no guessing by substring
    assert "meta-llama/Meta-Llama-3-8B" in str(err.value) and "'llama'" in str(err.value)


def test_configs_are_frozen_and_check_themselves():
    c = configs.get("article/MHA")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_heads = 8  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"num_heads \(32\) must be divisible by num_kv_heads \(6\)"):
        c.replace(num_kv_heads=6)
    with pytest.raises(ValueError, match="num_layers must be a positive integer, got 0"):
        c.replace(num_layers=0)
    with pytest.raises(ValueError, match="MLA config needs"):
        c.replace(kv_lora_rank=512)
    with pytest.raises(ValueError, match="unknown dtype 'float13'"):
        configs.dtype_bytes("float13")


def test_calculator_rejects_bad_sizes():
    with pytest.raises(ValueError, match="-1 and 1"):
        configs.kv_cache_bytes(configs.get("article/MHA"), -1)
