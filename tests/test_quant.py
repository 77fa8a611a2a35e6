"""kqv.quant: quantization error bounds, exact byte counts (FlashMLA's 656), attention over what is stored."""

import pytest
import torch

import kqv
from kqv import configs
from kqv.model import Decoder
from kqv.quant import (
    FORMATS,
    QuantizedKVCache,
    QuantizedLatentCache,
    cache_quality,
    dequantize,
    quantize,
    quantized_cache,
)

needs_fp8 = pytest.mark.skipif("fp8" not in FORMATS, reason="this torch has no float8_e4m3fn")


def occupied(cache):
    return sum(t.element_size() * t.numel() for t in cache.buffers.values())


# --- quantizing ---------------------------------------------------------------------

def test_int8_error_is_at_most_half_a_step(device):
    x = torch.randn(4, 3, 64, device=device) * torch.logspace(-3, 3, 64, device=device)  # wildly different scales
    q, scale = quantize(x, "int8", 16)
    assert q.dtype == torch.int8 and scale.shape == (4, 3, 4) and scale.dtype == torch.float32
    err = (dequantize(q, scale, torch.float32) - x).abs().unflatten(-1, (4, 16))
    assert bool((err <= scale.unsqueeze(-1) / 2 * (1 + 1e-6)).all())
    assert int(q.abs().max()) == 127  # each group's largest number uses the whole range


@needs_fp8
def test_fp8_keeps_three_significant_bits(device):
    x = torch.randn(8, 128, device=device)
    q, scale = quantize(x, "fp8", 128)
    assert q.dtype == torch.float8_e4m3fn
    back = dequantize(q, scale, torch.float32)
    normal = x.abs() > scale * 2**-6  # e4m3's normal range (below it, fixed steps)
    rel = ((back - x).abs() / x.abs())[normal]
    assert float(rel.max()) <= 2**-4 * (1 + 1e-6)  # 3 mantissa bits: half a step is 1/16 of the number


def test_zeros_stay_zeros_and_floats_are_casts():
    q, scale = quantize(torch.zeros(2, 8), "int8", 8)
    assert torch.equal(dequantize(q, scale, torch.float32), torch.zeros(2, 8))
    x = torch.randn(3, 5)
    q, scale = quantize(x, "bfloat16", 5)
    assert scale is None and torch.equal(q, x.bfloat16())


# --- sizes ----------------------------------------------------------------------------

@pytest.mark.parametrize("format, per_token", [
    ("int8", 2 * 3 * (64 * 1 + 4)),        # values and one float32 scale per token and KV head
    ("fp8", 2 * 3 * (64 * 1 + 4)),
    ("bfloat16", 2 * 3 * 64 * 2),          # a cast: no scales
    ("float32", 2 * 3 * 64 * 4),
])
def test_kv_bytes_count_the_scales(device, format, per_token):
    if format not in FORMATS:
        pytest.skip("this torch has no float8_e4m3fn")
    c = QuantizedKVCache(2, 3, 10, 64, format=format, device=device)
    assert c.bytes_per_token == per_token
    assert c.nbytes == occupied(c) == 2 * 10 * per_token


@needs_fp8
def test_mla_latent_in_fp8_is_flashmla_656_bytes(device):
    # FlashMLA's "FP8 with scale": 512 fp8 values, 4 float32 scales, 64 bfloat16 RoPE numbers.
    c = QuantizedLatentCache(1, 512, 64, 4, device=device)
    assert c.bytes_per_token == 512 + 16 + 128 == 656
    assert c.nbytes == occupied(c) == 4 * 656
    assert c.buffers["c_kv"].dtype == torch.float8_e4m3fn and c.buffers["k_rope"].dtype == torch.bfloat16
    assert c.buffers["c_kv_scale"].shape == (1, 4, 4)


# --- attention reads what is stored -------------------------------------------------------

@pytest.mark.parametrize("format", ["int8", "fp8", "float16"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_cached_attention_is_attention_over_the_stored_keys(device, format, kv_heads):
    if format not in FORMATS:
        pytest.skip("this torch has no float8_e4m3fn")
    torch.manual_seed(0)
    attn = kqv.Attention(32, 4, kv_heads, rope_theta=10000.0).to(device).eval()
    x = torch.randn(2, 9, 32, device=device)
    with torch.no_grad():
        q, k, v = attn.project(x)
        stored = [dequantize(*quantize(t, format, 8), torch.float32) for t in (k, v)]
        ref = kqv.scaled_dot_product_attention(q, *stored, is_causal=True)
        ref = attn.o_proj(ref.transpose(1, 2).reshape(2, 9, 32))
        cache = quantized_cache(attn, 2, 9, format=format)
        out = torch.cat([attn(x[:, :4], cache=cache), attn(x[:, 4:5], cache=cache), attn(x[:, 5:], cache=cache)], 1)
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out, attn(x), atol=1e-5) or format == "float16"  # it did change something


@needs_fp8
@pytest.mark.parametrize("absorb", [False, True])
def test_quantized_latent_keeps_rope_exact_in_bf16(device, absorb):
    torch.manual_seed(0)
    mla = kqv.MultiHeadLatentAttention(
        32, 4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, absorb=absorb
    ).to(device).eval()
    cache = quantized_cache(mla, 2, 6, format="fp8")
    assert isinstance(cache, QuantizedLatentCache) and cache.group_size == 16  # 128 does not divide 16
    x = torch.randn(2, 6, 32, device=device)
    with torch.no_grad():
        _, _, exact = mla.project(x)
        _, _, held = mla.project(x, cache=cache)
        assert torch.equal(held[..., 16:], exact[..., 16:].bfloat16().float())       # RoPE part: bf16 only
        assert (held[..., :16] - exact[..., :16]).abs().max() <= exact[..., :16].abs().max() / 16
        cache.reset()
        out = mla(x, cache=cache)
    assert torch.allclose(out, mla(x), atol=0.1)


@pytest.mark.parametrize("name", ["GQA", "MLA"])
def test_float32_cache_generates_what_the_dense_one_does(device, name):
    config = configs.get("HuggingFaceTB/SmolLM2-135M-Instruct").replace(
        name="tiny", num_layers=2, hidden_size=48, num_heads=6, num_kv_heads=2, head_dim=8, vocab_size=97,
        intermediate_size=64,
    )
    if name == "MLA":
        config = config.replace(num_kv_heads=6, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    torch.manual_seed(1)
    model = Decoder(config).to(device).eval()
    ids = torch.randint(0, 97, (2, 5), device=device)
    cache = quantized_cache(model, 2, 11, format="float32")
    assert torch.equal(model.generate(ids, 6, cache=cache), model.generate(ids, 6))


def test_cache_quality_rows():
    from kqv.evaluate import perplexity

    torch.manual_seed(1)
    config = configs.get("HuggingFaceTB/SmolLM2-135M-Instruct").replace(
        name="tiny", num_layers=2, hidden_size=48, num_heads=6, num_kv_heads=2, head_dim=8, vocab_size=97,
        intermediate_size=64,
    )
    model = Decoder(config).eval()
    ids = torch.randint(0, 97, (40,))
    rows = cache_quality(model, ids, ["int8", "float32"], chunk=16)
    assert [r["format"] for r in rows] == ["int8", "float32"]
    int8, fp32 = rows
    assert fp32["agreement_float32"] == 1.0 and 0 < fp32["agreement_bfloat16"] <= 1
    assert int8["bytes_per_token"] == 2 * 2 * 2 * (8 + 4) and fp32["bytes_per_token"] == 2 * 2 * 2 * 8 * 4
    assert fp32["perplexity"] == pytest.approx(perplexity(model, ids), rel=1e-5)  # a float32 cache changes nothing
    assert int8["perplexity"] != fp32["perplexity"]


# --- errors ---------------------------------------------------------------------------

def test_errors_name_the_values_and_lose_nothing():
    with pytest.raises(ValueError, match=r"unsupported cache format 'int4'; known formats: \[.*'int8'"):
        QuantizedKVCache(1, 1, 4, 8, format="int4")
    with pytest.raises(TypeError, match="hands out floating-point numbers, got dtype torch.int32"):
        QuantizedKVCache(1, 1, 4, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"group_size \(3\) must divide head_dim \(8\)"):
        QuantizedKVCache(1, 1, 4, 8, group_size=3)
    c = QuantizedKVCache(1, 2, 4, 8)
    k = torch.randn(1, 2, 3, 8)
    c.update(k, k)
    before = {n: b.clone() for n, b in c.buffers.items()}
    with pytest.raises(RuntimeError, match="holds 3 of max_len=4 tokens and cannot take 2 more"):
        c.update(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))
    with pytest.raises(TypeError, match="the cache takes torch.float32"):
        c.update(k.double()[:, :, :1], k.double()[:, :, :1])
    with pytest.raises(ValueError, match=r"k has shape \(1, 3, 1, 8\), the cache expects \(1, 2, 1, 8\)"):
        c.update(torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8))
    assert len(c) == 3 and all(torch.equal(before[n], b) for n, b in c.buffers.items())


# --- the real model -------------------------------------------------------------------

pytest_plugins = ["conftest_smollm2"]


@needs_fp8
def test_smollm2_barely_notices_an_8_bit_cache(smol_model, smol_tokenizer):
    from kqv.evaluate import eval_text
    from kqv.smollm2 import encode

    ids = encode(smol_tokenizer, eval_text())[:, :300]
    rows = {r["format"]: r for r in cache_quality(smol_model, ids, ("float32", "fp8", "int8"))}
    for fmt in ("fp8", "int8"):
        assert rows[fmt]["bytes_per_token"] == 30 * 2 * 3 * (64 + 4)     # a quarter of float32's, plus scales
        assert rows[fmt]["agreement_float32"] >= 0.9
        assert rows[fmt]["perplexity"] == pytest.approx(rows["float32"]["perplexity"], rel=0.03)
