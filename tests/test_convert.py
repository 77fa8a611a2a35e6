"""Conversions of a trained GQA model to a smaller cache: pooled KV heads and latent caches."""

import warnings

import pytest
import torch

import kqv
from kqv import convert, evaluate, heads, smollm2
from kqv.configs import ModelConfig
from kqv.model import Decoder
from kqv.convert import DecoupledRopeLatentAttention, LatentKVAttention, LatentKVCache

pytest_plugins = ["conftest_smollm2"]

# These tests calibrate on fewer tokens than SmolLM2's width (576) to stay fast; the
# warning that says so is tested on its own (test_too_few_calibration_tokens_warn).
pytestmark = pytest.mark.filterwarnings("ignore:joint_low_rank.*calibration tokens:UserWarning")

PROMPT = "The Earth has three layers: crust, mantle and"
H_KV, D, HIDDEN, FP32 = 3, 64, 576, 4


@pytest.fixture(scope="module")
def ids(smol_tokenizer):
    return smollm2.encode(smol_tokenizer, PROMPT)


@pytest.fixture(scope="module")
def calibration(smol_tokenizer):
    """A slice of the shipped calibration text (not the evaluation text)."""
    return smollm2.encode(smol_tokenizer, evaluate.calibration_text())[:, :192]


@pytest.fixture(scope="module")
def eval_ids(smol_tokenizer):
    return smollm2.encode(smol_tokenizer, evaluate.eval_text())[:, :128]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(type(layer.self_attn) is kqv.Attention and layer.self_attn.num_kv_heads == 3 for layer in model.layers)


# --- Pooling KV heads -------------------------------------------------------------


def test_pooling_to_the_same_number_of_heads_changes_nothing(smol_small, ids):
    same = convert.pool_kv_heads(smol_small, 3)
    assert same is not smol_small
    assert torch.equal(same(ids), smol_small(ids))


def test_mqa_is_the_mean_of_the_kv_heads(smol_small, ids):
    before = snapshot(smol_small)
    mqa = convert.gqa_to_mqa(smol_small)
    assert_untouched(smol_small, before)
    assert mqa.config.num_kv_heads == 1 and mqa.config.attention == "MQA"
    old, new = smol_small.layers[2].self_attn, mqa.layers[2].self_attn
    assert isinstance(new, kqv.Attention) and new.num_kv_heads == 1
    for name in ("k_proj", "v_proj"):
        expected = getattr(old, name).weight.view(3, D, HIDDEN).mean(0)
        torch.testing.assert_close(getattr(new, name).weight, expected)
    assert torch.equal(new.q_proj.weight, old.q_proj.weight)
    # The cache really shrinks, by the number of KV heads.
    assert evaluate.cache_bytes_per_token(smol_small) == 3 * evaluate.cache_bytes_per_token(mqa)
    assert torch.equal(mqa.generate(ids, 5), mqa.generate(ids, 5, use_cache=False))


def test_fitted_pooling_to_the_same_number_of_heads_changes_nothing(smol_small, ids, calibration):
    same = convert.pool_kv_heads(smol_small, 3, calibration=calibration)
    torch.testing.assert_close(same(ids), smol_small(ids), atol=2e-4, rtol=0)


def test_fitted_mqa_is_exact_when_the_heads_agree(calibration):
    """Three equal KV heads: mean pooling and fitting both give them back exactly."""
    config = ModelConfig("tiny", num_layers=2, hidden_size=32, num_heads=6, num_kv_heads=3, head_dim=8,
                         vocab_size=50, intermediate_size=64)
    model = Decoder(config).eval()
    with torch.no_grad():
        for layer in model.layers:
            for w in (layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight):
                w.view(3, 8, 32)[1:] = w.view(3, 8, 32)[0]
    x, cal = torch.randint(0, 50, (2, 20)), torch.randint(0, 50, (4, 64))
    for mqa in (convert.gqa_to_mqa(model), convert.gqa_to_mqa(model, calibration=cal)):
        torch.testing.assert_close(mqa(x), model(x), atol=1e-5, rtol=0)
        assert mqa.config.num_kv_heads == 1


def test_fitted_kv_group_beats_the_mean_on_its_inputs():
    """The fitted head rebuilds the group's values and (pair by pair) keys better than their mean."""
    g, D, hidden, N = 3, 8, 32, 500
    X = torch.randn(N, hidden, dtype=torch.float64) * torch.linspace(0.1, 3, hidden, dtype=torch.float64)
    wk = torch.randn(g, D, hidden, dtype=torch.float64)
    wv = torch.randn(g, D, hidden, dtype=torch.float64)
    k_proj, v_proj, coeff, up = convert.fit_kv_group(X, wk, wv)
    values = torch.einsum("nd,gvd->gnv", X, wv)                                   # (g, N, D)
    rebuilt = torch.einsum("gvw,nw->gnv", up, X @ v_proj.T)
    mean = (X @ wv.mean(0).T).expand_as(values)
    assert (rebuilt - values).pow(2).sum() < (mean - values).pow(2).sum()
    half = D // 2
    keys = torch.complex(*(torch.einsum("nd,gid->gni", X, w) for w in (wk[:, :half], wk[:, half:])))  # (g, N, D/2)
    shared = torch.complex(X @ k_proj[:half].T, X @ k_proj[half:].T)               # (N, D/2)
    fitted = shared.unsqueeze(0) * coeff.conj().unsqueeze(1)                        # z_j = a_j z, a_j = conj(coeff_j)
    mean_keys = keys.mean(0, keepdim=True)
    assert (fitted - keys).abs().pow(2).sum() < (mean_keys - keys).abs().pow(2).sum()


def test_fitted_mqa_is_closer_to_the_original_than_mean_pooling(smol_small, calibration, eval_ids):
    fitted = convert.gqa_to_mqa(smol_small, calibration=calibration)
    mean = convert.gqa_to_mqa(smol_small)
    assert "fitted" in fitted.config.name and fitted.config.num_kv_heads == 1
    assert evaluate.cache_bytes_per_token(fitted) == evaluate.cache_bytes_per_token(mean)
    target = smol_small(eval_ids).log_softmax(-1)
    def kl(m):
        return float((target.exp() * (target - m(eval_ids).log_softmax(-1))).sum(-1).mean())
    assert kl(fitted) < kl(mean)


def test_fit_kv_group_checks_its_shapes():
    with pytest.raises(ValueError, match=r"one even shape \(g, D, hidden\), got \(3, 8, 32\) and \(3, 6, 32\)"):
        convert.fit_kv_group(torch.randn(10, 32), torch.randn(3, 8, 32), torch.randn(3, 6, 32))


def test_pooling_needs_a_divisor(smol_small):
    with pytest.raises(ValueError, match=r"num_kv_heads \(2\) must divide the current number of KV heads \(3\)"):
        convert.pool_kv_heads(smol_small, 2)


def test_conversions_keep_device_dtype_and_frozenness(smol_small, ids):
    half = convert.pool_kv_heads(smol_small, 3).to(torch.bfloat16)
    for model in (convert.gqa_to_mqa(half), convert.gqa_to_latent(half, 96),
                  convert.gqa_to_decoupled_latent(half, 96, 16)):
        params = list(model.parameters())
        assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in params)
        out = model(ids)
        assert out.dtype == torch.bfloat16 and bool(out.isfinite().all())
        assert model.new_cache(1, 4).layers[0].dtype == torch.bfloat16


# --- The joint factorization ---------------------------------------------------------


def test_weight_svd_is_the_best_rank_r_weight():
    W = torch.randn(24, 40, dtype=torch.float64)
    up, down = convert.joint_low_rank(W, 5)
    s = torch.linalg.svdvals(W)
    error = torch.linalg.matrix_norm(W - up @ down)
    torch.testing.assert_close(error, s[5:].square().sum().sqrt())


def test_activation_aware_factorization_wins_on_its_inputs():
    """Eckart-Young on the outputs: no rank-r map does better on X, the plain SVD included."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 40, generator=g, dtype=torch.float64)
    scales = torch.logspace(1, -2, 40, dtype=torch.float64)                     # anisotropic inputs
    X = torch.randn(500, 40, generator=g, dtype=torch.float64) * scales
    up_a, down_a = convert.joint_low_rank(W, 5, X)
    up_w, down_w = convert.joint_low_rank(W, 5)
    Y = X @ W.T
    err_a = torch.linalg.matrix_norm(Y - X @ (up_a @ down_a).T)
    err_w = torch.linalg.matrix_norm(Y - X @ (up_w @ down_w).T)
    s = torch.linalg.svdvals(Y)
    torch.testing.assert_close(err_a, s[5:].square().sum().sqrt())
    assert err_a < 0.75 * err_w


def test_factorization_rank_is_checked():
    with pytest.raises(ValueError, match=r"rank must be between 1 and 24 for a \(24, 40\) weight, got 25"):
        convert.joint_low_rank(torch.zeros(24, 40), 25)


def test_too_few_calibration_tokens_warn():
    """Fewer tokens than the hidden width: a rank-deficient Gram matrix, and a warning that names both numbers."""
    W = torch.randn(24, 40, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"30 calibration tokens for a hidden width of 40.*several times 40"):
        convert.joint_low_rank(W, 8, torch.randn(30, 40, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                           # no warning from here on
        convert.joint_low_rank(W, 8, torch.randn(160, 40, dtype=torch.float64))
        convert.joint_low_rank(W, 8)                                             # plain SVD: no tokens at all


# --- A latent cache under full RoPE --------------------------------------------------


def test_full_rank_latent_equals_the_original(smol_small, ids):
    full = convert.gqa_to_latent(smol_small, 2 * H_KV * D)
    assert all(isinstance(layer.self_attn, LatentKVAttention) for layer in full.layers)
    torch.testing.assert_close(full(ids), smol_small(ids), atol=1e-3, rtol=0)


def test_latent_cache_shrinks_and_decodes_like_a_full_pass(smol_small, ids, calibration):
    rank = 64
    before = snapshot(smol_small)
    model = convert.gqa_to_latent(smol_small, rank, calibration=calibration)
    assert_untouched(smol_small, before)
    cache = model.new_cache(1, 16)
    assert all(type(c) is LatentKVCache for c in cache)
    assert cache.bytes_per_token == 4 * rank * FP32                              # 4 layers, d_c floats each
    assert cache.bytes_per_token == sum(b.element_size() * b[0, 0].numel() for c in cache for b in c.buffers.values())
    assert cache.nbytes == 16 * cache.bytes_per_token
    assert torch.equal(model.generate(ids, 6), model.generate(ids, 6, use_cache=False))
    # Step by step through the cache gives the logits of one full pass.
    full = model(ids)
    cache = model.new_cache(1, ids.shape[1])
    steps = torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-3, rtol=0)


def test_latent_maps_match_the_original_at_full_rank(smol_small, ids):
    full = convert.gqa_to_latent(smol_small, 2 * H_KV * D)
    ours, original = heads.attention_maps(full, ids), heads.attention_maps(smol_small, ids)
    torch.testing.assert_close(ours, original, atol=1e-4, rtol=0)


# --- Decoupled RoPE: absorbable --------------------------------------------------


def test_decoupled_with_every_pair_rotated_equals_the_original(smol_small, ids):
    exact = convert.gqa_to_decoupled_latent(smol_small, H_KV * D, D)           # d_r = D: only V compressed, fully
    torch.testing.assert_close(exact(ids), smol_small(ids), atol=1e-3, rtol=0)


@pytest.mark.parametrize("rope_dim", [0, 16])
def test_absorbed_path_equals_naive_path(smol_small, ids, calibration, rope_dim):
    absorbed = convert.gqa_to_decoupled_latent(smol_small, 96, rope_dim, calibration=calibration)
    naive = convert.gqa_to_decoupled_latent(smol_small, 96, rope_dim, calibration=calibration, absorb=False)
    assert all(isinstance(layer.self_attn, DecoupledRopeLatentAttention) for layer in absorbed.layers)
    torch.testing.assert_close(absorbed(ids), naive(ids), atol=1e-3, rtol=0)
    torch.testing.assert_close(heads.attention_maps(absorbed, ids), heads.attention_maps(naive, ids), atol=1e-4, rtol=0)


def test_absorbed_path_never_rebuilds_keys_or_values(smol_small, ids):
    model = convert.gqa_to_decoupled_latent(smol_small, 96, 16)
    calls = []
    for layer in model.layers:
        layer.self_attn.kv_b_proj.register_forward_hook(lambda *args: calls.append(1))
    model(ids)
    assert calls == []                                                          # W_up is only read as weights
    for layer in model.layers:
        layer.self_attn.absorb = False
    model(ids)
    assert len(calls) == 4


def test_decoupled_paths_agree_in_float64():
    """Absorbed equals naive to float64 precision: neither softmax rounds through float32."""
    absorbed = DecoupledRopeLatentAttention(64, 8, 2, 16, 24, 8).double()
    naive = DecoupledRopeLatentAttention(64, 8, 2, 16, 24, 8, absorb=False).double()
    naive.load_state_dict(absorbed.state_dict())
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    torch.testing.assert_close(absorbed(x), naive(x), atol=1e-12, rtol=0)


def test_decoupled_cache_holds_latent_and_rope_keys(smol_small, ids):
    rank, rope_dim = 96, 16
    model = convert.gqa_to_decoupled_latent(smol_small, rank, rope_dim)
    cache = model.new_cache(1, 32)
    assert set(cache[0].buffers) == {"latent", "k_rope"}
    assert cache.bytes_per_token == 4 * (rank + H_KV * rope_dim) * FP32
    assert torch.equal(model.generate(ids, 6), model.generate(ids, 6, use_cache=False))


def test_rope_dim_is_checked(smol_small):
    with pytest.raises(ValueError, match="rope_dim must be even and between 0 and head_dim \\(64\\), got 15"):
        convert.gqa_to_decoupled_latent(smol_small, 96, 15)


def test_latent_cache_class():
    c = LatentKVCache(2, 8, 5, num_kv_heads=3, rope_dim=4, dtype=torch.float16)
    assert c.bytes_per_token == (8 + 3 * 4) * 2
    assert c.nbytes == sum(b.element_size() * b.numel() for b in c.buffers.values()) == 2 * 5 * c.bytes_per_token
    latent, k_rope = c.update(torch.ones(2, 3, 8, dtype=torch.float16), torch.ones(2, 3, 3, 4, dtype=torch.float16))
    assert latent.shape == (2, 3, 8) and k_rope.shape == (2, 3, 3, 4) and c.length == 3
    with pytest.raises(ValueError, match="pass k_rope"):
        c.update(torch.ones(2, 1, 8, dtype=torch.float16))
    plain = LatentKVCache(1, 8, 5)
    assert set(plain.buffers) == {"latent"} and plain.bytes_per_token == 8 * 4


# --- Quality, measured on the full model ---------------------------------------------


@pytest.fixture(scope="module")
def original_ppl(smol_model, eval_ids):
    return evaluate.perplexity(smol_model, eval_ids)


def test_fitting_to_activations_beats_the_plain_svd(smol_model, eval_ids, calibration, original_ppl):
    """The same cache size, two factorizations: fitting the layer's real inputs costs far less."""
    svd = convert.gqa_to_latent(smol_model, 192)
    fitted = convert.gqa_to_latent(smol_model, 192, calibration=calibration)
    assert evaluate.cache_bytes_per_token(svd) == evaluate.cache_bytes_per_token(fitted) == 30 * 192 * FP32
    ppl_svd, ppl_fitted = evaluate.perplexity(svd, eval_ids), evaluate.perplexity(fitted, eval_ids)
    assert original_ppl < ppl_fitted < ppl_svd


# --- Any device, any dtype ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_conversion_runs_on_the_device_of_its_model(device, dtype):
    config = ModelConfig("tiny GQA", num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=4, head_dim=16,
                         vocab_size=100, intermediate_size=96, rope_theta=10000.0)
    model = Decoder(config).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, 100, (2, 9), device=device)
    calibration = torch.randint(0, 100, (1, 32), device=device)
    converted = [
        convert.pool_kv_heads(model, 2),
        convert.gqa_to_mqa(model),
        convert.gqa_to_latent(model, 48, calibration=calibration),
        convert.gqa_to_decoupled_latent(model, 48, 8, calibration=calibration),
    ]
    for new in converted:
        assert {(p.device.type, p.dtype) for p in new.parameters()} == {(torch.device(device).type, dtype)}
        out = new(ids)
        assert out.device.type == torch.device(device).type and out.dtype == dtype
        generated = new.generate(ids, 3)
        assert generated.shape == (2, 12) and generated.device == ids.device
        if dtype == torch.float32:  # in bfloat16 two summation orders may pick different near-ties
            assert torch.equal(generated, new.generate(ids, 3, use_cache=False))
        cache = new.new_cache(2, 4)
        assert all(b.device.type == torch.device(device).type for c in cache for b in c.buffers.values())
