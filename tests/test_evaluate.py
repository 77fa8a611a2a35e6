"""Perplexity and cache size: the two measurements every conversion is judged by."""

import math

import pytest
import torch
import torch.nn.functional as F

from kqv import evaluate
from kqv.configs import ModelConfig, kv_bytes_per_token
from kqv.model import Decoder


def test_shipped_texts_are_package_data():
    text, calibration = evaluate.eval_text(), evaluate.calibration_text()
    assert 1400 <= len(text.split()) <= 2000
    assert 400 <= len(calibration.split())
    assert "attention" in text and "library" in text
    assert not set(text.split("\n\n")) & set(calibration.split("\n\n"))       # kept apart


def tiny_decoder(num_kv_heads=2):
    config = ModelConfig("tiny", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=num_kv_heads,
                         head_dim=8, vocab_size=50, intermediate_size=64)
    return Decoder(config).eval()


def test_perplexity_is_exp_of_the_mean_cross_entropy():
    model = tiny_decoder()
    ids = torch.randint(0, 50, (1, 21))
    with torch.no_grad():
        logits = model(ids)
    expected = math.exp(F.cross_entropy(logits[0, :-1], ids[0, 1:]).item())
    assert evaluate.perplexity(model, ids) == pytest.approx(expected, rel=1e-5)
    assert evaluate.perplexity(model, ids[0]) == pytest.approx(expected, rel=1e-5)


def test_windowed_perplexity_scores_each_window_alone():
    model = tiny_decoder()
    ids = torch.randint(0, 50, (1, 20))
    nll = 0.0
    with torch.no_grad():
        for chunk in ids.split(8, dim=1):
            logits = model(chunk)
            nll += F.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum").item()
    expected = math.exp(nll / (7 + 7 + 3))
    assert evaluate.perplexity(model, ids, window=8) == pytest.approx(expected, rel=1e-5)


def test_perplexity_rejects_too_short_inputs():
    with pytest.raises(ValueError, match=r"T >= 2, got \(1, 1\)"):
        evaluate.perplexity(tiny_decoder(), torch.zeros(1, 1, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_per_token_agrees_with_the_calculator(dtype):
    model = tiny_decoder(num_kv_heads=2)
    assert evaluate.cache_bytes_per_token(model, dtype) == kv_bytes_per_token(model.config, dtype)
    assert evaluate.cache_bytes_per_token(model) == kv_bytes_per_token(model.config, torch.float32)


def test_compare_tabulates_perplexity_and_cache():
    gqa, mqa = tiny_decoder(num_kv_heads=2), tiny_decoder(num_kv_heads=1)
    ids = torch.randint(0, 50, (1, 12))
    rows = evaluate.compare({"GQA": gqa, "MQA": mqa}, ids, dtype=torch.bfloat16)
    assert [r["name"] for r in rows] == ["GQA", "MQA"]
    assert rows[0]["perplexity"] == pytest.approx(evaluate.perplexity(gqa, ids))
    assert rows[1]["bytes_per_token"] == kv_bytes_per_token(mqa.config, torch.bfloat16)
    assert [r["cache_fraction"] for r in rows] == [1.0, 0.5]
