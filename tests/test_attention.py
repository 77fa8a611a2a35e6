"""kqv.attention: eager equals fused equals PyTorch; the Attention module; errors that name values."""

import math

import pytest
import torch
import torch.nn.functional as F

import kqv
from kqv import attention
from kqv.attention import causal_mask, repeat_kv, scaled_dot_product_attention

from conftest import TOL

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference_attention(q, k, v, mask=None, scale=None):
    """From scratch: repeat K/V to every query head, then softmax(q k^T * scale + mask) v in float64."""
    q, k, v = q.double(), k.double(), v.double()
    if q.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        k, v = repeat_kv(k, q.shape[-3] // k.shape[-3]), repeat_kv(v, q.shape[-3] // k.shape[-3])
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, -1) @ v


# --- the causal mask --------------------------------------------------------

def test_causal_mask_prefill_is_lower_triangle():
    assert torch.equal(causal_mask(5, 5), torch.ones(5, 5, dtype=torch.bool).tril())


def test_causal_mask_one_decode_query_sees_everything():
    assert causal_mask(1, 7).all()


def test_causal_mask_chunk_is_bottom_right():
    m = causal_mask(3, 8)
    # The 3 new queries sit at positions 5, 6, 7 and see keys up to their own position.
    assert [int(r.sum()) for r in m] == [6, 7, 8]
    # PyTorch's own is_causal=True aligns top-left: a different (wrong for a cache) mask.
    assert not torch.equal(m, torch.ones(3, 8, dtype=torch.bool).tril())


def test_is_causal_decode_matches_unmasked(device):
    q, k, v = (torch.randn(2, 4, n, 16, device=device) for n in (1, 9, 9))
    for fused in (False, True):
        out = scaled_dot_product_attention(q, k, v, is_causal=True, fused=fused)
        assert torch.allclose(out, scaled_dot_product_attention(q, k, v), atol=1e-5)


# --- eager equals fused equals a from-scratch reference ----------------------

@pytest.mark.parametrize("dtype", [torch.float64, *DTYPES])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1), (6, 3)])
@pytest.mark.parametrize("shape", [(5, 5), (1, 9), (3, 11)])
def test_eager_equals_fused_equals_reference(device, dtype, heads, shape):
    (H, H_kv), (T, S) = heads, shape
    q = torch.randn(2, H, T, 16, device=device, dtype=dtype)
    k = torch.randn(2, H_kv, S, 16, device=device, dtype=dtype)
    v = torch.randn(2, H_kv, S, 12, device=device, dtype=dtype)
    ref = reference_attention(q, k, v, mask=causal_mask(T, S, device))
    eager = scaled_dot_product_attention(q, k, v, is_causal=True)
    fused = scaled_dot_product_attention(q, k, v, is_causal=True, fused=True)
    assert eager.dtype == fused.dtype == dtype
    assert eager.shape == fused.shape == (2, H, T, 12)
    tol = dict(atol=TOL[dtype] * 4, rtol=min(TOL[dtype], 1e-5))  # float64: 4e-12 and 1e-12, nothing rounded to float32
    assert torch.allclose(eager.double(), ref, **tol)
    assert torch.allclose(fused.double(), ref, **tol)


# Masks broadcastable to (B, H, T, S) = (2, 6, 4, 6): shared by every head or not, by every batch row or not.
MASK_SHAPES = {
    "keys (S,)": (6,),
    "shared (T, S)": (4, 6),
    "per batch row (B, 1, T, S)": (2, 1, 4, 6),
    "per head (H, T, S)": (6, 4, 6),
    "per head (1, H, T, S)": (1, 6, 4, 6),
    "per batch row and head (B, H, T, S)": (2, 6, 4, 6),
}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", ["bool", "float", "bool+causal"])
@pytest.mark.parametrize("shape", list(MASK_SHAPES.values()), ids=list(MASK_SHAPES))
def test_masks(device, fused, kind, shape):
    H, H_kv, T, S = 6, 2, 4, 6
    q = torch.randn(2, H, T, 8, device=device)
    k, v = torch.randn(2, H_kv, S, 8, device=device), torch.randn(2, H_kv, S, 8, device=device)
    keep = torch.rand(shape, device=device) > 0.3
    keep[..., -1] = True  # every query keeps at least its own (last) key
    if kind == "float":
        mask = torch.randn(shape, device=device)
        expected = reference_attention(q, k, v, mask=mask)
        out = scaled_dot_product_attention(q, k, v, mask=mask, fused=fused)
    elif kind == "bool":
        expected = reference_attention(q, k, v, mask=keep)
        out = scaled_dot_product_attention(q, k, v, mask=keep, fused=fused)
    else:
        expected = reference_attention(q, k, v, mask=keep & causal_mask(T, S, device))
        out = scaled_dot_product_attention(q, k, v, mask=keep, is_causal=True, fused=fused)
    assert torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.parametrize(
    "shape, folded",
    [
        ((4, 6), (3 * 4, 6)),                  # shared by all: its rows tiled once per query head of a group
        ((2, 1, 4, 6), (2, 1, 3 * 4, 6)),      # per batch row: still not expanded over heads
        ((1, 6, 4, 6), (1, 2, 3 * 4, 6)),      # per head: folded like the queries, not expanded over batch
        ((6,), (3 * 4, 6)),                    # per key: one row, expanded to T rows then tiled
    ],
)
def test_fold_mask_never_expands_over_batch_or_heads(shape, folded):
    """H = 6 query heads, H_kv = 2, q_per_kv = 3, T = 4, S = 6: the mask the fused kernel gets."""
    mask = torch.rand(shape) > 0.5
    out = attention._fold_mask(mask, 3, 4, 6)
    assert tuple(out.shape) == folded
    # Row j * T + t of KV head g is query head g * q_per_kv + j, row t.
    full = mask.expand(2, 6, 4, 6)
    got = out.expand(2, 2, 12, 6).unflatten(-2, (3, 4)).flatten(1, 2)   # (B, H, T, S)
    assert torch.equal(got, full)


# --- no copies of K/V, in memory ------------------------------------------------

def peak_memory(fn, device):
    """Bytes allocated at the peak of fn(), above what was allocated before it."""
    if device.type == "cuda":
        fn()  # once first: cuBLAS allocates its workspace through PyTorch's allocator on first use
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # On a CPU, PyTorch's profiler records every allocation and free with its size.
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size))  # negative for a free
        stack.extend(e.children)
    now = peak = 0
    for _, size in sorted(events):
        now += size
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("H_kv", [2, 1])
def test_grouped_attention_never_copies_kv(device, H_kv, T, fused):
    """Decoding (T = 1) or a chunk (T = 4) against a long cache needs a few score-sized tensors, no more.

    A path that copied K once per query head of a group would need q_per_kv
    times K (64 MiB for H_kv = 2 here, 8 per KV head); the bound is well
    under half of that.
    """
    B, H, S, D = 1, 8, 16384, 128
    q = torch.randn(B, H, T, D, device=device)
    k, v = torch.randn(B, H_kv, S, D, device=device), torch.randn(B, H_kv, S, D, device=device)
    scores = B * H * T * S * 4                                  # one float32 (B, H, T, S)
    bound = 4 * scores + T * S + 2**16                          # a few of them, a (T, S) mask, small change
    assert bound < (H // H_kv) * k.nbytes / 2
    peak = peak_memory(lambda: scaled_dot_product_attention(q, k, v, is_causal=True, fused=fused), device)
    assert peak <= bound, f"peak {peak / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB, K is {k.nbytes / 2**20:.0f} MiB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("T, S", [(16, 16), (5, 16)], ids=["prefill", "chunk"])
def test_cuda_causal_prefill_and_chunks_run_on_flash(dtype, heads, T, S):
    """No mask tensor on a GPU: a full prefill and a chunk of one (bottom-right causal) both use flash."""
    from torch.profiler import ProfilerActivity, profile

    (H, H_kv), device = heads, torch.device("cuda")
    q = torch.randn(2, H, T, 64, device=device, dtype=dtype)
    k, v = torch.randn(2, H_kv, S, 64, device=device, dtype=dtype), torch.randn(2, H_kv, S, 64, device=device, dtype=dtype)
    if not attention._flash_takes(q, k, v, H // H_kv):
        pytest.skip("PyTorch has no flash kernel for these inputs on this GPU")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = scaled_dot_product_attention(q, k, v, is_causal=True, fused=True)
    names = {e.name for e in prof.events()}
    assert any("flash_attention" in n for n in names), sorted(names)
    expected = reference_attention(q, k, v, mask=causal_mask(T, S, device))
    assert torch.allclose(out.double(), expected, atol=TOL[dtype] * 4)


def test_eager_returns_weights_that_sum_to_one(device):
    q, k, v = torch.randn(1, 8, 5, 16, device=device), torch.randn(1, 2, 5, 16, device=device), torch.randn(1, 2, 5, 16, device=device)
    out, w = scaled_dot_product_attention(q, k, v, is_causal=True, return_weights=True)
    assert w.shape == (1, 8, 5, 5)
    assert torch.allclose(w.sum(-1), torch.ones(1, 8, 5, device=device))
    assert (w.triu(1) == 0).all()  # nothing from the future
    assert torch.allclose(out, (w.unflatten(1, (2, 4)) @ v.unsqueeze(2)).flatten(1, 2), atol=1e-6)


def test_single_head_two_dimensional_inputs():
    q, k, v = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 2)
    out = scaled_dot_product_attention(q, k, v, scale=0.5)
    assert torch.allclose(out.double(), reference_attention(q, k, v, scale=0.5), atol=1e-6)


def test_matches_pytorch_sdpa(device):
    q, k, v = (torch.randn(2, 4, 7, 8, device=device) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(scaled_dot_product_attention(q, k, v, is_causal=True), expected, atol=1e-6)


def test_repeat_kv_is_interleaved():
    k = torch.arange(2.0).view(1, 2, 1, 1)  # KV heads 0 and 1
    assert repeat_kv(k, 2).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]


# --- errors that name the offending values -----------------------------------

def test_error_heads_not_divisible():
    q, k = torch.randn(1, 6, 2, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"H \(6\).*H_kv \(4\)"):
        scaled_dot_product_attention(q, k, k)


def test_error_width_mismatch():
    with pytest.raises(ValueError, match=r"D=8.*width 4"):
        scaled_dot_product_attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))


def test_error_dtype_mismatch():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(TypeError, match="float32.*float16"):
        scaled_dot_product_attention(q, q.half(), q.half())


def test_error_integer_inputs():
    with pytest.raises(TypeError, match="int64"):
        scaled_dot_product_attention(torch.ones(2, 3, dtype=torch.long), torch.randn(2, 3), torch.randn(2, 3))


def test_error_more_queries_than_keys_when_causal():
    with pytest.raises(ValueError, match="T=4, S=3"):
        scaled_dot_product_attention(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8), is_causal=True)


def test_error_weights_from_fused():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="fused"):
        scaled_dot_product_attention(q, q, q, fused=True, return_weights=True)


# --- the Attention module ----------------------------------------------------

def test_mha_equals_torch_multihead_attention(device):
    """Attention with H_kv = H against torch.nn.MultiheadAttention given the same weights."""
    E, H, T = 32, 4, 6
    ours = kqv.Attention(E, H, bias=True).to(device)
    theirs = torch.nn.MultiheadAttention(E, H, bias=True, batch_first=True).to(device)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        theirs.out_proj.weight.copy_(ours.o_proj.weight)
        theirs.out_proj.bias.copy_(ours.o_proj.bias)
    x = torch.randn(3, T, E, device=device)
    mask = ~torch.ones(T, T, dtype=torch.bool, device=device).tril()  # True = hidden, PyTorch's convention here
    expected, _ = theirs(x, x, x, attn_mask=mask, need_weights=False)
    for fused in (False, True):
        ours.fused = fused
        assert torch.allclose(ours(x), expected, atol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 3, 6])
@pytest.mark.parametrize("rope", [None, 10000.0])
def test_every_divisor_equals_repeat_reference(device, num_kv_heads, rope):
    """GQA for every divisor of H equals a from-scratch version that repeats K/V."""
    E, H, D, T = 48, 6, 8, 7
    attn = kqv.Attention(E, H, num_kv_heads, D, rope_theta=rope).to(device)
    x = torch.randn(2, T, E, device=device)
    q = attn.q_proj(x).view(2, T, H, D).transpose(1, 2)
    k = attn.k_proj(x).view(2, T, num_kv_heads, D).transpose(1, 2)
    v = attn.v_proj(x).view(2, T, num_kv_heads, D).transpose(1, 2)
    if rope is not None:  # rotate-half RoPE, written out
        inv = 1.0 / rope ** (torch.arange(0, D, 2, device=device).float() / D)
        ang = torch.arange(T, device=device)[:, None].float() * inv
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        rot = lambda t: torch.cat([-t[..., D // 2:], t[..., : D // 2]], -1)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    out = reference_attention(q, k, v, mask=causal_mask(T, T, device)).float()
    expected = attn.o_proj(out.transpose(1, 2).reshape(2, T, H * D))
    for fused in (False, True):
        attn.fused = fused
        assert torch.allclose(attn(x), expected, atol=1e-5)


def test_parameter_shapes_are_llamas():
    attn = kqv.Attention(576, 9, 3, 64)
    shapes = {n: tuple(p.shape) for n, p in attn.named_parameters()}
    assert shapes == {
        "q_proj.weight": (576, 576), "k_proj.weight": (192, 576),
        "v_proj.weight": (192, 576), "o_proj.weight": (576, 576),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_dtypes(device, dtype):
    attn = kqv.Attention(32, 4, 2, rope_theta=10000.0).to(device=device, dtype=dtype)
    x = torch.randn(2, 5, 32, device=device, dtype=dtype)
    out = attn(x)
    assert out.dtype == dtype and out.device.type == device.type and torch.isfinite(out).all()
    ref = kqv.Attention(32, 4, 2, rope_theta=10000.0).to(device)
    ref.load_state_dict({k: v.float() for k, v in attn.state_dict().items()})
    assert torch.allclose(out.float(), ref(x.float()), atol=TOL[dtype] * 5)


def test_attention_weights_causal_and_normalized():
    attn = kqv.Attention(32, 4, 2, rope_theta=10000.0)
    w = attn.attention_weights(torch.randn(1, 6, 32))
    assert w.shape == (1, 4, 6, 6)
    assert torch.allclose(w.sum(-1), torch.ones(1, 4, 6))
    assert (w.triu(1) == 0).all()


def test_module_errors_name_values():
    with pytest.raises(ValueError, match=r"num_heads \(32\) must be divisible by num_kv_heads \(6\)"):
        kqv.Attention(4096, 32, 6)
    with pytest.raises(ValueError, match=r"hidden_size \(100\).*num_heads \(3\)"):
        kqv.Attention(100, 3)
    attn = kqv.Attention(32, 4)
    with pytest.raises(ValueError, match=r"\(B, T, 32\).*\(2, 5, 16\)"):
        attn(torch.randn(2, 5, 16))


def test_default_device_is_usable():
    dev = kqv.default_device()
    assert isinstance(dev, torch.device)
    assert torch.zeros(1, device=dev).device.type == dev.type
