"""kqv.cache: sizes that equal what the tensors occupy; overflow and misuse raise clearly."""

import pytest
import torch

from kqv.cache import KVCache, LatentCache, ModelCache


def occupied(cache):
    return sum(t.element_size() * t.numel() for t in cache.buffers.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kv_cache_bytes_exact(device, dtype):
    c = KVCache(3, 2, 10, 16, dtype=dtype, device=device)
    assert c.nbytes == occupied(c)
    assert c.bytes_per_token == 2 * 2 * 16 * torch.tensor([], dtype=dtype).element_size()
    assert c.nbytes == 3 * 10 * c.bytes_per_token
    assert c.buffers["k"].shape == (3, 2, 10, 16) and c.buffers["k"].device.type == device.type


def test_latent_cache_bytes_exact(device):
    c = LatentCache(2, 32, 8, 7, dtype=torch.bfloat16, device=device)
    assert c.nbytes == occupied(c)
    assert c.bytes_per_token == (32 + 8) * 2
    assert c.buffers["latent"].shape == (2, 7, 40)


def test_update_appends_and_returns_everything(device):
    c = KVCache(1, 2, 6, 4, device=device)
    k1, v1 = torch.randn(1, 2, 4, 4, device=device), torch.randn(1, 2, 4, 4, device=device)
    k2, v2 = torch.randn(1, 2, 1, 4, device=device), torch.randn(1, 2, 1, 4, device=device)
    c.update(k1, v1)
    k, v = c.update(k2, v2)
    assert len(c) == 5
    assert torch.equal(k, torch.cat([k1, k2], 2)) and torch.equal(v, torch.cat([v1, v2], 2))


def test_latent_update_keeps_both_parts(device):
    c = LatentCache(2, 6, 4, 5, device=device)
    a, r = torch.randn(2, 3, 6, device=device), torch.randn(2, 3, 4, device=device)
    latent = c.update(a, r)
    assert torch.equal(latent[..., :6], a) and torch.equal(latent[..., 6:], r)


def test_overflow_names_the_numbers():
    c = KVCache(1, 1, 4, 2)
    c.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    with pytest.raises(RuntimeError, match=r"holds 3 of max_len=4 tokens and cannot take 2 more"):
        c.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert len(c) == 3  # a failed update changes nothing


def test_wrong_shape_and_dtype():
    c = KVCache(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"\(1, 3, 1, 8\).*\(1, 2, 1, 8\)"):
        c.update(torch.zeros(1, 3, 1, 8), torch.zeros(1, 3, 1, 8))
    with pytest.raises(TypeError, match="float16.*float32"):
        c.update(torch.zeros(1, 2, 1, 8, dtype=torch.float16), torch.zeros(1, 2, 1, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="d_c=4"):
        LatentCache(1, 4, 2, 3).update(torch.zeros(1, 1, 5), torch.zeros(1, 1, 2))
    with pytest.raises(TypeError, match="int64"):
        KVCache(1, 1, 2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="max_len must be at least 1, got 0"):
        KVCache(1, 1, 0, 2)


def test_model_cache_totals():
    layers = [KVCache(2, 3, 5, 4), KVCache(2, 3, 5, 4)]
    m = ModelCache(layers)
    assert m.nbytes == sum(occupied(c) for c in layers)
    assert m.bytes_per_token == 2 * layers[0].bytes_per_token
    m.reset()
    assert m.length == 0
