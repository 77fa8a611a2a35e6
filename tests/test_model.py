"""kqv.model: cached decoding equals one full forward for every variant; greedy generation."""

import pytest
import torch

from kqv import configs
from kqv.cache import KVCache, LatentCache
from kqv.model import Decoder

BASE = configs.get("HuggingFaceTB/SmolLM2-135M-Instruct").replace(
    name="tiny", num_layers=2, hidden_size=48, num_heads=6, num_kv_heads=6, head_dim=8,
    vocab_size=97, intermediate_size=64,
)
VARIANTS = {
    "MHA": BASE,
    "GQA": BASE.replace(num_kv_heads=2),
    "MQA": BASE.replace(num_kv_heads=1),
    "MLA": BASE.replace(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=12),
}


def build(name, device, absorb=False):
    torch.manual_seed(1)
    return Decoder(VARIANTS[name], absorb=absorb).to(device).eval()


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("chunks", [[9], [5, 1, 1, 1, 1], [3, 4, 1, 1]])
def test_cached_decoding_equals_full_forward(device, name, chunks):
    model = build(name, device)
    ids = torch.randint(0, 97, (3, 9), device=device)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(3, 9)
        out, start = [], 0
        for n in chunks:
            out.append(model(ids[:, start : start + n], cache=cache))
            start += n
    assert cache.length == 9
    assert torch.allclose(torch.cat(out, 1), full, atol=1e-4)


@pytest.mark.parametrize("name", VARIANTS)
def test_generation_with_and_without_cache(device, name):
    model = build(name, device)
    ids = torch.randint(0, 97, (2, 5), device=device)
    with_cache = model.generate(ids, 6)
    assert with_cache.shape == (2, 11) and torch.equal(with_cache[:, :5], ids)
    assert torch.equal(with_cache, model.generate(ids, 6, use_cache=False))
    assert torch.equal(with_cache, model.generate(ids, 6, prefill_chunk=2))


def test_mla_decoder_absorbed_equals_naive(device):
    naive, absorbed = build("MLA", device), build("MLA", device, absorb=True)
    ids = torch.randint(0, 97, (2, 7), device=device)
    with torch.no_grad():
        assert torch.allclose(naive(ids), absorbed(ids), atol=1e-4)
    assert torch.equal(naive.generate(ids, 4), absorbed.generate(ids, 4))


def test_cache_sizes_follow_the_family():
    per_token = {}
    for name in VARIANTS:
        cache = build(name, "cpu").new_cache(1, 4)
        per_token[name] = cache.bytes_per_token
        assert cache.nbytes == sum(b.element_size() * b.numel() for c in cache for b in c.buffers.values())
        assert isinstance(cache[0], LatentCache if name == "MLA" else KVCache)
        assert per_token[name] == configs.kv_elements_per_token(VARIANTS[name]) * 4
    assert per_token["MHA"] == 6 * per_token["MQA"] == 3 * per_token["GQA"]


def test_eos_stops_generation():
    model = build("GQA", "cpu")
    ids = torch.randint(0, 97, (1, 4))
    first = model.generate(ids, 1)[0, -1].item()
    assert model.generate(ids, 5, eos_token_id=first).shape == (1, 5)


def test_errors():
    model = build("GQA", "cpu")
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"\['vocab_size', 'intermediate_size'\]"):
        Decoder(configs.get("article/MHA"))
    cache = model.new_cache(1, 5)
    model(torch.randint(0, 97, (1, 3)), cache=cache)
    with pytest.raises(ValueError, match="continue the cache, which holds 3 tokens: expected 3..3, got \\[0\\]"):
        model(torch.randint(0, 97, (1, 1)), positions=torch.tensor([0]), cache=cache)
    with pytest.raises(RuntimeError, match="holds 3 of max_len=5 tokens and cannot take 4 more"):
        model(torch.randint(0, 97, (1, 4)), cache=cache)
    with pytest.raises(ValueError, match="batch size 1, x has 2"):
        model(torch.randint(0, 97, (2, 1)), cache=cache)


@pytest.mark.parametrize("name", VARIANTS)
def test_layers_given_the_decoders_angles_compute_the_same(device, name):
    """A layer handed RoPE angles (as the Decoder hands them) equals the layer computing its own."""
    model = build(name, device)
    attn = model.layers[0].self_attn
    x = torch.randn(2, 5, BASE.hidden_size, device=device)
    positions = torch.arange(3, 8, device=device)
    with torch.no_grad():
        own = attn(x, positions)
        given = attn(x, None, angles=attn.rope_angles(positions))
    assert torch.equal(own, given)


def test_decoder_computes_rope_angles_once_per_forward(monkeypatch):
    model = build("GQA", "cpu")
    calls = []
    for i, layer in enumerate(model.layers):
        original = layer.self_attn.rope_angles
        monkeypatch.setattr(
            layer.self_attn, "rope_angles", lambda p, i=i, f=original: calls.append(i) or f(p)
        )
    ids = torch.randint(0, 97, (1, 4))
    with torch.no_grad():
        cache = model.new_cache(1, 6)
        model(ids, cache=cache)
        model(ids[:, :1], cache=cache)
    assert calls == [0, 0]  # one per forward, by the first layer, for all layers


def test_angles_must_cover_the_new_tokens():
    model = build("GQA", "cpu")
    attn = model.layers[0].self_attn
    angles = attn.rope_angles(torch.arange(2))
    with pytest.raises(ValueError, match="the RoPE angles cover 2 tokens, x has T=3"):
        attn(torch.randn(1, 3, BASE.hidden_size), angles=angles)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_llamas(dtype):
    """float32 takes PyTorch's one-call rms_norm; half precision normalizes in float32, then scales."""
    from kqv.norm import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 64, dtype=dtype)
    x32 = x.double()
    normalized = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    expected = norm.weight.double() * normalized.double()      # Llama: weight * x.to(input dtype)
    got = norm(x)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.double(), expected, atol=tol, rtol=tol)


def test_generate_returns_inference_tensors():
    model = build("GQA", "cpu")
    tokens = model.generate(torch.randint(0, 97, (1, 4)), 2)
    assert tokens.is_inference() and tokens.shape == (1, 6)
