"""kqv.flash: online softmax, tiled attention and split-KV decoding equal PyTorch's attention; the measurements."""

import math

import pytest
import torch
import torch.nn.functional as F

import kqv
from kqv import flash
from kqv.attention import _split_kv, causal_mask, repeat_kv
from kqv.model import Decoder
from kqv.flash import (
    attention_intensity,
    attention_memory,
    decode_splits,
    generation_times,
    merge_partials,
    online_softmax_attention,
    peak_memory,
    prefill_decode_intensity,
    split_kv_decode,
    tiled_attention,
)

from conftest import TOL

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Heads (H, H_kv): MHA, GQA, MQA, and a group of 3.
HEADS = [(4, 4), (8, 2), (6, 1), (6, 2)]
# (T, S): prefill, one decode query, a chunk after a cache, sizes no block divides.
SHAPES = [(5, 5), (1, 9), (3, 11), (37, 53)]


def tol(dtype):
    return 1e-12 if dtype == torch.float64 else 4 * TOL[dtype]


def sdpa(q, k, v, mask=None):
    """PyTorch's own attention, in float64, with K/V repeated to every query head."""
    q_per_kv = q.shape[-3] // k.shape[-3]
    q, k, v = q.double(), repeat_kv(k.double(), q_per_kv), repeat_kv(v.double(), q_per_kv)
    if mask is not None and mask.is_floating_point():
        mask = mask.double()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def qkv(H, H_kv, T, S, *, D=16, D_v=12, B=2, device="cpu", dtype=torch.float32):
    q = torch.randn(B, H, T, D, device=device, dtype=dtype)
    k = torch.randn(B, H_kv, S, D, device=device, dtype=dtype)
    v = torch.randn(B, H_kv, S, D_v, device=device, dtype=dtype)
    return q, k, v


def scores_lse(q, k, mask=None):
    """log sum_j exp(score_j) of each query, from the full (T, S) scores."""
    k = repeat_kv(k.double(), q.shape[-3] // k.shape[-3])
    s = q.double() @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(s, -1)


# --- the online softmax ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("shape", SHAPES)
def test_online_softmax_equals_pytorch(device, dtype, heads, shape):
    (H, H_kv), (T, S) = heads, shape
    q, k, v = qkv(H, H_kv, T, S, device=device, dtype=dtype)
    out = online_softmax_attention(q, k, v, block_size=4)
    assert out.dtype == dtype and out.shape == (2, H, T, 12)
    assert torch.allclose(out.double(), sdpa(q, k, v), atol=tol(dtype), rtol=0)


@pytest.mark.parametrize("block_size", [1, 3, 16, 1000])
def test_online_softmax_any_block_size_gives_the_same_output_and_lse(block_size):
    q, k, v = qkv(6, 2, 4, 17, dtype=torch.float64)
    out, lse = online_softmax_attention(q, k, v, block_size=block_size, return_lse=True)
    assert torch.allclose(out, sdpa(q, k, v), atol=1e-12, rtol=0)
    assert torch.allclose(lse, scores_lse(q, k), atol=1e-12, rtol=0)


def test_online_softmax_survives_scores_that_overflow_a_naive_exp():
    # exp(1000) is inf in float64: only the running maximum keeps the sums finite.
    q = torch.full((1, 1, 1, 4), 100.0, dtype=torch.float64)
    k = torch.randn(1, 1, 10, 4, dtype=torch.float64) + 10.0
    v = torch.randn(1, 1, 10, 4, dtype=torch.float64)
    out = online_softmax_attention(q, k, v, block_size=3, scale=1.0)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, torch.softmax(q @ k.transpose(-2, -1), -1) @ v, atol=1e-12)


def test_online_softmax_one_head_without_a_head_axis():
    q, k, v = torch.randn(3, 8), torch.randn(7, 8), torch.randn(7, 5)
    out, lse = online_softmax_attention(q, k, v, block_size=2, return_lse=True)
    assert out.shape == (3, 5) and lse.shape == (3,)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6)


# --- tiled attention -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_tiled_equals_pytorch(device, dtype, heads, shape, is_causal):
    (H, H_kv), (T, S) = heads, shape
    q, k, v = qkv(H, H_kv, T, S, device=device, dtype=dtype)
    out = tiled_attention(q, k, v, block_q=4, block_k=8, is_causal=is_causal)
    mask = causal_mask(T, S, device) if is_causal else None
    assert out.dtype == dtype and out.shape == (2, H, T, 12)
    assert torch.allclose(out.double(), sdpa(q, k, v, mask), atol=tol(dtype), rtol=0)


def test_tiled_causal_is_bottom_right_as_pytorchs_lower_right_bias():
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = qkv(4, 4, 5, 12)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(5, 12))
    assert torch.allclose(tiled_attention(q, k, v, block_q=2, block_k=3, is_causal=True), ref, atol=1e-5)
    # Top-left alignment (PyTorch's is_causal=True with T < S) is a different answer.
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(top_left, ref, atol=1e-3)


def test_tiled_full_prefill_equals_pytorchs_is_causal(device):
    q, k, v = qkv(8, 8, 70, 70, device=device)
    out = tiled_attention(q, k, v, block_q=16, block_k=16, is_causal=True)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)


@pytest.mark.parametrize("block_q, block_k", [(1, 1), (3, 5), (64, 64), (100, 7)])
def test_tiled_any_block_sizes(block_q, block_k):
    q, k, v = qkv(6, 3, 13, 29, dtype=torch.float64)
    out, lse = tiled_attention(q, k, v, block_q=block_q, block_k=block_k, is_causal=True, return_lse=True)
    mask = causal_mask(13, 29)
    assert torch.allclose(out, sdpa(q, k, v, mask), atol=1e-12, rtol=0)
    assert torch.allclose(lse, scores_lse(q, k, mask), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["bool", "additive", "bool+causal", "additive+causal"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (6, 1)])
def test_tiled_masks(device, kind, heads):
    H, H_kv = heads
    T, S = 9, 14
    q, k, v = qkv(H, H_kv, T, S, device=device, dtype=torch.float64)
    keep = torch.rand(2, 1, T, S, device=device) > 0.3         # broadcast over heads
    keep[..., -1] = True                                        # every query keeps its own (last) key
    if kind.startswith("bool"):
        mask = keep
    else:
        mask = torch.randn(2, H, T, S, device=device, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    causal = kind.endswith("causal")
    out = tiled_attention(q, k, v, block_q=4, block_k=4, mask=mask, is_causal=causal)
    full = mask
    if causal:
        c = causal_mask(T, S, device)
        full = mask & c if mask.dtype == torch.bool else mask.masked_fill(~c, float("-inf"))
    assert torch.allclose(out, sdpa(q, k, v, full), atol=1e-12, rtol=0)


def test_tiled_row_that_sees_no_key_gives_zeros_as_pytorch():
    q, k, v = qkv(2, 2, 3, 10)
    keep = torch.ones(3, 10, dtype=torch.bool)
    keep[1] = False
    out, lse = tiled_attention(q, k, v, block_k=4, mask=keep, return_lse=True)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=keep), atol=1e-6)
    assert (lse[:, :, 1] == float("-inf")).all() and torch.isfinite(lse[:, :, [0, 2]]).all()


def test_tiled_masked_block_before_visible_keys_is_not_nan():
    # A row whose first key block is fully masked: its running max is -inf for a block.
    q, k, v = qkv(1, 1, 1, 8, dtype=torch.float64)
    keep = torch.tensor([[False] * 4 + [True] * 4])              # (T, S) = (1, 8)
    out = tiled_attention(q, k, v, block_k=4, mask=keep)
    assert torch.allclose(out, sdpa(q, k, v, keep), atol=1e-12)


def test_tiled_causal_skips_the_tiles_above_the_diagonal(monkeypatch):
    folded = []
    step = flash.online_softmax_step
    monkeypatch.setattr(flash, "online_softmax_step", lambda *a: folded.append(a[3].shape) or step(*a))
    q, k, v = qkv(2, 2, 256, 256, B=1)
    tiled_attention(q, k, v, block_q=64, block_k=64, is_causal=True)
    # 4 x 4 tiles; query block i needs key blocks 0..i: 1 + 2 + 3 + 4 of them.
    assert len(folded) == 10
    folded.clear()
    tiled_attention(q, k, v, block_q=64, block_k=64)
    assert len(folded) == 16
    # A chunk of 64 new queries after 192 cached tokens sees every key block.
    folded.clear()
    tiled_attention(q[:, :, :64], k, v, block_q=64, block_k=64, is_causal=True)
    assert len(folded) == 4


def test_tiled_gqa_never_copies_kv_per_query_head():
    # MQA with 8 query heads: a copy of K or V for each query head (repeat_kv) would take 8 MiB.
    q, k, v = qkv(8, 1, 1, 4096, D=64, D_v=64, B=1)
    peak = peak_memory(lambda: tiled_attention(q, k, v, block_q=64, block_k=256))
    assert peak < k.numel() * k.element_size() / 4            # not even a quarter of one K


# --- split-KV decoding and the log-sum-exp merge ---------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("splits", [1, 2, 5, 33])
def test_split_kv_decode_equals_pytorch(device, dtype, heads, splits):
    H, H_kv = heads
    q, k, v = qkv(H, H_kv, 1, 33, device=device, dtype=dtype)
    out = split_kv_decode(q, k, v, splits, block_size=4)
    assert out.dtype == dtype and out.shape == (2, H, 1, 12)
    assert torch.allclose(out.double(), sdpa(q, k, v), atol=tol(dtype), rtol=0)


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_kv_decode_equals_kqvs_cpu_decode_path(splits):
    # kqv's CPU path: MQA decode with the group's query heads as rows, B = 1.
    q = torch.randn(1, 1, 8, 64)                                # (B, H_kv, q_per_kv * T, D)
    k, v = torch.randn(1, 1, 2048, 64), torch.randn(1, 1, 2048, 64)
    ours = split_kv_decode(q, k, v, splits)
    assert torch.allclose(ours, _split_kv(q, k, v, 1 / 8, splits), atol=1e-5)
    # What kqv runs for one decode step of an MQA layer (split on a CPU with 2+ threads).
    q_heads = torch.randn(1, 8, 1, 64)
    fused = kqv.scaled_dot_product_attention(q_heads, k, v, is_causal=True, fused=True)
    assert torch.allclose(split_kv_decode(q_heads, k, v, splits), fused, atol=1e-5)


def test_decode_splits_reports_what_kqvs_cpu_decode_does(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    q = torch.randn(1, 8, 1, 64)                                # MQA decode: one KV head
    k, v = torch.randn(1, 1, 4096, 64), torch.randn(1, 1, 4096, 64)
    assert decode_splits(q, k, v) == 4                          # one slice per thread
    assert decode_splits(q, k[..., :1024, :], v[..., :1024, :]) == 2   # at least 512 keys a slice
    assert decode_splits(q, k[..., :511, :], v[..., :511, :]) == 1
    # MHA decode with as many heads as threads already keeps them busy: batch 2 x 4 heads, no split.
    q4, k4, v4 = torch.randn(2, 4, 1, 64), torch.randn(2, 4, 4096, 64), torch.randn(2, 4, 4096, 64)
    assert decode_splits(q4, k4, v4) == 1
    # And the split is the path the fused call takes: spy on the slices' kernel.
    import kqv.attention as attention

    calls = []
    flash_for_cpu = attention._cpu_flash
    monkeypatch.setattr(attention, "_cpu_flash", lambda *a, **kw: calls.append(a[1].shape) or flash_for_cpu(*a, **kw))
    out = kqv.scaled_dot_product_attention(q, k, v, fused=True)
    assert [shape[1] for shape in calls] == [4]                 # (B * H_kv, slices, length, D)
    assert torch.allclose(out, split_kv_decode(q, k, v, 4), atol=1e-5)


def test_decode_splits_is_one_off_the_cpu_and_checks_shapes():
    q, k, v = qkv(4, 1, 1, 2048, D=16, D_v=16, B=1)
    if torch.cuda.is_available():
        assert decode_splits(q.cuda(), k.cuda(), v.cuda()) == 1
    with pytest.raises(ValueError, match=r"must be \(B, H, T, D\) and \(B, H_kv, S, D\)"):
        decode_splits(q[0], k[0], v[0])


def test_split_kv_decode_lse_is_the_full_lse():
    q, k, v = qkv(6, 2, 1, 40, dtype=torch.float64)
    _, lse = split_kv_decode(q, k, v, 3, return_lse=True)
    assert torch.allclose(lse, scores_lse(q, k), atol=1e-12)


def test_merge_partials_of_two_halves_is_the_whole():
    q, k, v = qkv(4, 2, 3, 20, dtype=torch.float64)
    a = online_softmax_attention(q, k[..., :7, :], v[..., :7, :], return_lse=True)
    b = online_softmax_attention(q, k[..., 7:, :], v[..., 7:, :], return_lse=True)
    out, lse = merge_partials([a[0], b[0]], [a[1], b[1]])
    assert torch.allclose(out, sdpa(q, k, v), atol=1e-12)
    assert torch.allclose(lse, scores_lse(q, k), atol=1e-12)
    # Order does not matter, and each half alone is not the answer.
    assert torch.allclose(merge_partials([b[0], a[0]], [b[1], a[1]])[0], out, atol=1e-12)
    assert not torch.allclose(a[0], out, atol=1e-3)


def test_merge_partials_ignores_a_fully_masked_slice_and_keeps_empty_rows_zero():
    o = torch.randn(2, 5)
    lse = torch.tensor([0.3, -1.0])
    empty_o, empty_lse = torch.zeros(2, 5), torch.full((2,), float("-inf"))
    out, L = merge_partials([o, empty_o], [lse, empty_lse])
    assert torch.allclose(out, o) and torch.allclose(L, lse)
    out, L = merge_partials([empty_o, empty_o], [empty_lse, empty_lse])
    assert torch.equal(out, torch.zeros(2, 5)) and (L == float("-inf")).all()


def test_merge_partials_in_half_precision_merges_in_float32():
    q, k, v = qkv(4, 4, 1, 64, dtype=torch.bfloat16)
    halves = (slice(0, 30), slice(30, 64))
    parts = [online_softmax_attention(q, k[..., s, :], v[..., s, :], return_lse=True) for s in halves]
    out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.allclose(out.double(), sdpa(q, k, v), atol=tol(torch.bfloat16))


# --- errors that name the values -----------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_block_sizes_must_be_positive_integers(bad):
    q, k, v = qkv(2, 2, 3, 5)
    with pytest.raises(ValueError, match=rf"block_q must be a positive integer, got {bad!r}"):
        tiled_attention(q, k, v, block_q=bad)
    with pytest.raises(ValueError, match=rf"block_k must be a positive integer, got {bad!r}"):
        tiled_attention(q, k, v, block_k=bad)
    with pytest.raises(ValueError, match=rf"block_size must be a positive integer, got {bad!r}"):
        online_softmax_attention(q, k, v, block_size=bad)


def test_shape_errors_name_the_shapes():
    q, k, v = qkv(6, 4, 3, 5)
    with pytest.raises(ValueError, match=r"query heads H \(6\) must be divisible by the number of KV heads H_kv \(4\)"):
        tiled_attention(q, k, v)
    q, k, v = qkv(4, 2, 3, 5)
    with pytest.raises(ValueError, match=r"queries have width D=16 but keys have width 8"):
        tiled_attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match=r"keys hold S=5 tokens but values hold 4"):
        online_softmax_attention(q, k, v[..., :4, :])
    with pytest.raises(ValueError, match=r"T=3, S=2"):
        tiled_attention(q, k[..., :2, :], v[..., :2, :], is_causal=True)
    with pytest.raises(ValueError, match=r"mask of shape \(3, 4\) does not broadcast to .* = \(2, 4, 3, 5\)"):
        tiled_attention(q, k, v, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be boolean .* got dtype torch.int64"):
        tiled_attention(q, k, v, mask=torch.ones(3, 5, dtype=torch.long))


@pytest.mark.parametrize("splits", [0, 6, 2.0])
def test_splits_must_be_from_one_to_S(splits):
    q, k, v = qkv(2, 2, 1, 5)
    with pytest.raises(ValueError, match=rf"from 1 to the number of keys S \(5\), got {splits!r}"):
        split_kv_decode(q, k, v, splits)


def test_merge_partials_errors():
    with pytest.raises(ValueError, match=r"got 2 and 1"):
        merge_partials([torch.zeros(3, 4)] * 2, [torch.zeros(3)])
    with pytest.raises(ValueError, match=r"partial 1: output \(3, 4\) and log-sum-exp \(2,\)"):
        merge_partials([torch.zeros(3, 4)] * 2, [torch.zeros(3), torch.zeros(2)])


# --- peak memory ------------------------------------------------------------------------


def test_peak_memory_counts_new_storage_not_views_and_frees():
    x = torch.randn(1000)

    def views():
        return x.view(10, 100).transpose(0, 1)[2:]

    def two_in_turn():
        a = torch.ones(1000)                                    # 4000 bytes
        del a
        return torch.ones(500, dtype=torch.float64)             # 4000 bytes, after a was freed

    def two_at_once():
        a = torch.ones(1000)
        return a, torch.ones(1000)

    assert peak_memory(views) == 0
    assert peak_memory(two_in_turn) == 4000
    assert peak_memory(two_at_once) == 8000


def test_peak_memory_agrees_with_the_profiler():
    from torch.profiler import ProfilerActivity, profile

    def profiled_peak(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            del_me = fn()
            del del_me
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += e.nbytes()
            peak = max(peak, live)
        return peak

    q, k, v = qkv(4, 2, 200, 200, B=1)
    for fn in (lambda: kqv.scaled_dot_product_attention(q, k, v, is_causal=True),
               lambda: tiled_attention(q, k, v, is_causal=True)):
        with torch.no_grad():
            assert peak_memory(fn) == profiled_peak(fn)


def test_eager_memory_grows_as_T_squared_and_tiled_as_T(device):
    rows = attention_memory((256, 512, 1024), num_heads=4, head_dim=32, device=device)
    for small, big in zip(rows, rows[1:]):
        assert big["eager_bytes"] / small["eager_bytes"] > 3.5   # quadrupled, less the linear terms
        assert big["tiled_bytes"] / small["tiled_bytes"] < 2.1   # at most doubled
    for r in rows:
        assert r["eager_bytes"] > r["scores_bytes"]              # at least the scores
        assert r["tiled_bytes"] >= r["output_bytes"]             # at least its output
        assert r["max_abs_diff"] < 1e-5
    assert rows[-1]["tiled_bytes"] < rows[-1]["scores_bytes"] / 4


def test_attention_memory_errors():
    with pytest.raises(ValueError, match=r"lengths must be positive, got \[8, 0\]"):
        attention_memory([8, 0])


# --- arithmetic intensity ---------------------------------------------------------------------


def test_intensity_counts_the_flops_of_the_pairs_attended():
    config = kqv.configs.get("article/GQA")
    T, S = 5, 12
    pairs = int(causal_mask(T, S).sum())
    r = attention_intensity(config, T, S, dtype=torch.float32)
    assert r["flops"] == 2 * 32 * pairs * (128 + 128)
    assert r["bytes"] == (32 * T * 256 + S * 2 * 8 * 128) * 4
    assert attention_intensity(config, T, S, is_causal=False)["flops"] == 2 * 32 * T * S * 256


@pytest.mark.parametrize("name", ["article/MHA", "article/GQA", "article/MQA", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_decode_intensity_is_about_q_per_kv_in_bfloat16_and_prefill_grows(name):
    config = kqv.configs.get(name)
    rows = prefill_decode_intensity(config, [256, 1024, 4096, 16384])
    for r in rows:
        assert 0.8 * config.q_per_kv < r["decode"] <= config.q_per_kv
    prefill = [r["prefill"] for r in rows]
    assert all(b > 3.5 * a for a, b in zip(prefill, prefill[1:]))   # 4 times the tokens, about 4 times the intensity
    # In float32 every byte is twice as dear: decode does half as many FLOPs per byte.
    r32 = attention_intensity(config, 1, 4096, dtype=torch.float32)["flops_per_byte"]
    assert r32 == pytest.approx(rows[2]["decode"] / 2)


def test_absorbed_mla_decode_intensity_follows_flashmlas_analysis():
    # FlashMLA's deep dive (docs/20250422-new-kernel-deep-dive.md): FLOPs / bytes = h_q s_q (d_k + d_v) / d_k.
    config = kqv.configs.get("deepseek-ai/DeepSeek-V3")
    r = attention_intensity(config, 1, 65536)
    assert r["flops_per_byte"] == pytest.approx(128 * (576 + 512) / 576, rel=0.01)


def test_intensity_errors():
    config = kqv.configs.get("article/GQA")
    with pytest.raises(ValueError, match=r"T=0, S=4"):
        attention_intensity(config, 0, 4)
    with pytest.raises(ValueError, match=r"T=8, S=4"):
        attention_intensity(config, 8, 4)


# --- time to first token, time per output token -----------------------------------------------


def tiny_decoder():
    config = kqv.configs.get("HuggingFaceTB/SmolLM2-135M-Instruct").replace(
        name="tiny", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=100,
    )
    return Decoder(config).eval()


def test_generation_times_generates_what_generate_does():
    model = tiny_decoder()
    prompt = torch.randint(0, 100, (2, 7))
    r = generation_times(model, prompt, max_new_tokens=5, repeats=3, warmup=1)
    assert torch.equal(r["tokens"], model.generate(prompt, 5))
    assert len(r["ttft_times"]) == 3 and len(r["tpot_times"]) == 3 * 4
    assert r["prompt_tokens"] == 7 and r["new_tokens"] == 5
    assert r["ttft_seconds"] > 0 and r["tpot_seconds"] > 0
    assert min(r["ttft_times"]) <= r["ttft_seconds"] <= max(r["ttft_times"])


def test_generation_times_errors():
    model = tiny_decoder()
    with pytest.raises(ValueError, match=r"at least 2 .* got 1"):
        generation_times(model, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match=r"repeats=0, warmup=1"):
        generation_times(model, torch.zeros(1, 3, dtype=torch.long), repeats=0)
    with pytest.raises(ValueError, match=r"\(B, T\), got \(3,\)"):
        generation_times(model, torch.zeros(3, dtype=torch.long))
