"""kqv.window: a rolling buffer equals attention under a window mask; sinks at text or cache positions (StreamingLLM)."""

import pytest
import torch

import kqv
from kqv import configs
from kqv.evaluate import perplexity
from kqv.model import Decoder
from kqv.window import (
    SlidingWindowKVCache,
    SlidingWindowLatentCache,
    window_cache,
    window_perplexity,
    window_sweep,
)

HIDDEN = 32
MODULES = ["MHA", "GQA", "MQA", "MLA naive", "MLA absorbed"]


def make_module(kind, device):
    torch.manual_seed(1)
    if kind.startswith("MLA"):
        m = kqv.MultiHeadLatentAttention(
            HIDDEN, 4, q_lora_rank=None, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5,
            absorb=kind.endswith("absorbed"),
        )
    else:
        m = kqv.Attention(HIDDEN, 4, {"MHA": 4, "GQA": 2, "MQA": 1}[kind], rope_theta=10000.0)
    return m.to(device).eval()


def kept(p, window, sinks):
    """The tokens query p sees: the sinks, and the window - sinks most recent (itself included)."""
    return sorted(set(range(min(sinks, p + 1))) | set(range(max(0, p - (window - sinks) + 1), p + 1)))


@torch.no_grad()
def reference(module, x, window, sinks, sink_positions):
    """Each query alone over the tokens it sees, through the module without a cache.

    With ``"text"`` the tokens keep their positions in the text; with
    ``"cache"`` they are numbered by their place in the cache, 0, 1, 2, ...:
    StreamingLLM's scheme, computed literally.
    """
    outs = []
    for p in range(x.shape[1]):
        keep = kept(p, window, sinks)
        positions = torch.tensor(keep) if sink_positions == "text" else torch.arange(len(keep))
        outs.append(module(x[:, keep], positions.to(x.device))[:, -1:])
    return torch.cat(outs, 1)


def run(module, x, cache, chunks):
    out, start = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(module(x[:, start : start + n], cache=cache))
            start += n
    return torch.cat(out, 1)


# --- the rolling buffer -------------------------------------------------------------------

def test_slots_roll_as_mistral_and_keep_the_sinks():
    c = SlidingWindowKVCache(1, 1, 2, 4)
    assert [c.slot(p) for p in range(9)] == [p % 4 for p in range(9)]  # Mistral: position i in slot i mod W
    c = SlidingWindowKVCache(1, 1, 2, 6, sinks=2)
    assert [c.slot(p) for p in range(12)] == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 2, 3]
    c.seen = 11
    assert c.slot_positions().tolist() == [0, 1, 10, 7, 8, 9]
    c.seen = 3
    assert c.slot_positions().tolist() == [0, 1, 2, -1, -1, -1]


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("window, sinks", [(5, 0), (6, 2), (4, 3)])
@pytest.mark.parametrize("chunks", [[1] * 17, [17], [6, 1, 1, 4, 5], [2] * 8 + [1]])
def test_text_positions_equal_attention_under_a_window_mask(device, kind, window, sinks, chunks):
    module = make_module(kind, device)
    x = torch.randn(2, 17, HIDDEN, device=device)
    cache = window_cache(module, 2, window, sinks=sinks, sink_positions="text")
    out = run(module, x, cache, chunks)
    assert torch.allclose(out, reference(module, x, window, sinks, "text"), atol=1e-5)
    assert cache.length == window and cache.next_position == 17


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("window, sinks", [(6, 2), (5, 1), (8, 4)])
def test_cache_positions_equal_streamingllm_one_token_at_a_time(device, kind, window, sinks):
    module = make_module(kind, device)
    x = torch.randn(2, 20, HIDDEN, device=device)
    cache = window_cache(module, 2, window, sinks=sinks)  # sink_positions="cache"
    out = run(module, x, cache, [window] + [1] * (20 - window))
    assert torch.allclose(out, reference(module, x, window, sinks, "cache"), atol=1e-5)
    # ...which is not the same as keeping the sinks where they were
    assert not torch.allclose(out, reference(module, x, window, sinks, "text"), atol=1e-3)


def test_cache_positions_in_a_chunk_place_the_sinks_before_its_first_window():
    """A chunk's first token sees exactly StreamingLLM's positions; its later ones differ slightly."""
    module = make_module("GQA", "cpu")
    x = torch.randn(1, 16, HIDDEN)
    cache = window_cache(module, 1, 6, sinks=2)
    out = run(module, x, cache, [10, 6])
    ref = reference(module, x, 6, 2, "cache")
    assert torch.allclose(out[:, 10], ref[:, 10], atol=1e-5)
    assert not torch.allclose(out[:, 11:], ref[:, 11:], atol=1e-4)


@pytest.mark.parametrize("sinks", [0, 3])
def test_a_window_longer_than_the_text_is_full_attention(device, sinks):
    module = make_module("GQA", device)
    x = torch.randn(2, 9, HIDDEN, device=device)
    with torch.no_grad():
        full = module(x)
    cache = window_cache(module, 2, 9, sinks=sinks)
    assert torch.allclose(run(module, x, cache, [4, 1, 4]), full, atol=1e-5)


def test_keys_without_rope_need_no_moving():
    torch.manual_seed(0)
    attn = kqv.Attention(HIDDEN, 4, 2).eval()  # no RoPE: positions do not enter the scores
    x = torch.randn(1, 12, HIDDEN)
    a = run(attn, x, window_cache(attn, 1, 5, sinks=2, sink_positions="cache"), [1] * 12)
    b = run(attn, x, window_cache(attn, 1, 5, sinks=2, sink_positions="text"), [1] * 12)
    assert torch.equal(a, b)


# --- sizes ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_are_what_the_tensors_occupy(device, dtype):
    e = torch.empty((), dtype=dtype).element_size()
    kv = SlidingWindowKVCache(2, 3, 8, 10, dtype=dtype, device=device)
    assert kv.bytes_per_token == 2 * 3 * 8 * e and kv.nbytes == 2 * 10 * kv.bytes_per_token
    assert kv.nbytes == sum(t.element_size() * t.numel() for t in kv.buffers.values())
    # StreamingLLM positions keep the sinks' keys as first rotated, to move them from: counted too.
    s = SlidingWindowKVCache(2, 3, 8, 10, sinks=4, rope_theta=1e4, dtype=dtype, device=device)
    assert s.sink_keys.shape == (2, 3, 4, 8)
    assert s.nbytes == 2 * 10 * s.bytes_per_token + 2 * 3 * 4 * 8 * e
    assert s.nbytes == sum(t.element_size() * t.numel() for t in [*s.buffers.values(), s.sink_keys])
    latent = SlidingWindowLatentCache(2, 12, 4, 10, sinks=4, dtype=dtype, device=device)
    assert latent.bytes_per_token == 16 * e and latent.sink_keys.shape == (2, 4, 4)
    assert latent.nbytes == 2 * 10 * 16 * e + 2 * 4 * 4 * e


# --- the model --------------------------------------------------------------------------

BASE = configs.get("HuggingFaceTB/SmolLM2-135M-Instruct").replace(
    name="tiny", num_layers=2, hidden_size=48, num_heads=6, num_kv_heads=2, head_dim=8,
    vocab_size=97, intermediate_size=64,
)


@pytest.mark.parametrize("config", [BASE, BASE.replace(num_kv_heads=6, kv_lora_rank=16, qk_nope_head_dim=8,
                                                       qk_rope_head_dim=4, v_head_dim=8)], ids=["GQA", "MLA"])
def test_generate_with_a_window(device, config):
    torch.manual_seed(1)
    model = Decoder(config).to(device).eval()
    ids = torch.randint(0, 97, (2, 5), device=device)
    wide = window_cache(model, 2, 16)
    assert torch.equal(model.generate(ids, 10, cache=wide), model.generate(ids, 10))  # nothing evicted
    narrow = window_cache(model, 2, 6, sinks=2)
    out = model.generate(ids, 20, cache=narrow)  # far past the window: the buffer rolls
    assert out.shape == (2, 25) and narrow.length == 6 and narrow.next_position == 24


def test_window_perplexity_and_sweep():
    torch.manual_seed(1)
    model = Decoder(BASE).eval()
    ids = torch.randint(0, 97, (1, 30))
    assert window_perplexity(model, ids, 30) == pytest.approx(perplexity(model, ids), rel=1e-5)
    exact = window_perplexity(model, ids, 8, sinks=2, sink_positions="text")
    assert window_perplexity(model, ids, 8, sinks=2, sink_positions="text", chunk=5) == pytest.approx(exact, rel=1e-5)
    assert window_perplexity(model, ids, 8, sinks=2) != pytest.approx(exact, rel=1e-5)
    rows = window_sweep(model, ids, [8, 16], sinks=(0, 2), chunk=4)
    assert [(r["window"], r["sinks"]) for r in rows] == [(8, 0), (8, 2), (16, 0), (16, 2), (None, 0)]
    assert rows[-1]["perplexity"] == pytest.approx(perplexity(model, ids))
    assert rows[0]["cache_bytes"] == 8 * model.new_cache(1, 1).bytes_per_token


# --- errors -----------------------------------------------------------------------------

def test_errors_name_the_values_and_lose_nothing():
    with pytest.raises(ValueError, match=r"window \(4\) must be larger than sinks \(4\)"):
        SlidingWindowKVCache(1, 1, 2, 4, sinks=4)
    with pytest.raises(ValueError, match=r"window \(2\) must be larger than sinks \(3\)"):
        SlidingWindowKVCache(1, 1, 2, 2, sinks=3)
    with pytest.raises(ValueError, match="sinks must be non-negative, got -1"):
        SlidingWindowKVCache(1, 1, 2, 4, sinks=-1)
    with pytest.raises(ValueError, match=r"sink_positions must be one of \('cache', 'text'\), got 'absolute'"):
        SlidingWindowKVCache(1, 1, 2, 4, sinks=1, sink_positions="absolute")
    with pytest.raises(TypeError, match="int64"):
        SlidingWindowKVCache(1, 1, 2, 4, dtype=torch.int64)
    c = SlidingWindowKVCache(1, 2, 4, 5, sinks=1, rope_theta=1e4)
    k = torch.randn(1, 2, 7, 4)
    c.update(k, k)
    before = {n: b.clone() for n, b in c.buffers.items()}, c.sink_keys.clone(), c.seen
    with pytest.raises(ValueError, match=r"k has shape \(1, 3, 1, 4\), the cache expects \(1, 2, 1, 4\)"):
        c.update(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))
    with pytest.raises(TypeError, match="float16, the cache holds torch.float32"):
        c.update(k[:, :, :1].half(), k[:, :, :1].half())
    with pytest.raises(ValueError, match=r"disagree on the number of tokens"):
        c.update(k[:, :, :1], k[:, :, :2])
    assert all(torch.equal(before[0][n], b) for n, b in c.buffers.items())
    assert torch.equal(before[1], c.sink_keys) and c.seen == before[2] == 7


# --- the real model -------------------------------------------------------------------

pytest_plugins = ["conftest_smollm2"]


def test_smollm2_needs_its_attention_sinks(smol_model, smol_tokenizer):
    """StreamingLLM's finding: evict the first tokens and perplexity jumps; keep 4 of them and it does not."""
    from kqv.evaluate import eval_text
    from kqv.smollm2 import encode

    ids = encode(smol_tokenizer, eval_text())[:, :256]
    full = perplexity(smol_model, ids)
    without = window_perplexity(smol_model, ids, 64, chunk=32)
    with_sinks = window_perplexity(smol_model, ids, 64, sinks=4, chunk=32)
    assert with_sinks < without
    assert with_sinks - full < (without - full) / 2
