"""Perplexity and cache size: the two measurements every conversion is judged by."""

import copy
import math
import re

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


# --- The standard measurement ------------------------------------------------------


class CharTokenizer:
    """Stands in for SmolLM2's tokenizer: one id per character (mod 50)."""

    class _Encoding:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text):
        return self._Encoding([ord(c) % 50 for c in text])


def test_eval_tokens_are_the_start_of_the_eval_split():
    full = evaluate.eval_tokens(CharTokenizer())
    live = evaluate.eval_tokens(CharTokenizer(), evaluate.LIVE_TOKENS)
    assert full.shape == (1, evaluate.FULL_TOKENS) and live.shape == (1, evaluate.LIVE_TOKENS)
    assert torch.equal(full[:, : evaluate.LIVE_TOKENS], live)
    assert evaluate.FULL_TOKENS % evaluate.WINDOW == 0 and evaluate.LIVE_TOKENS % evaluate.WINDOW == 0
    with pytest.raises(ValueError, match=r"n_tokens must be between 2 and \d+ \(the eval split's length\), got 10000000"):
        evaluate.eval_tokens(CharTokenizer(), 10_000_000)


def test_perplexity_ci_scores_whole_windows_alone():
    model = tiny_decoder()
    ids = torch.randint(0, 50, (1, 70))                        # 4 windows of 16, and 6 tokens left over
    result = evaluate.perplexity_ci(model, ids, window=16, batch_size=3)
    assert (result.windows, result.window, result.tokens) == (4, 16, 4 * 15)
    assert result.perplexity == pytest.approx(evaluate.perplexity(model, ids[:, :64], window=16), rel=1e-6)
    alone = evaluate.window_nll(model, ids[:, 16:32], window=16)
    assert result.window_nll[1] == pytest.approx(float(alone[0]), rel=1e-6)


def test_bootstrap_interval_contains_the_estimate_and_is_reproducible():
    model = tiny_decoder()
    ids = torch.randint(0, 50, (1, 20 * 16))
    a = evaluate.perplexity_ci(model, ids, window=16, n_boot=500, seed=3)
    b = evaluate.perplexity_ci(model, ids, window=16, n_boot=500, seed=3)
    c = evaluate.perplexity_ci(model, ids, window=16, n_boot=500, seed=4)
    assert a.low < a.perplexity < a.high
    assert a == b                                              # same seed, same numbers
    assert (c.low, c.high) != (a.low, a.high) and c.perplexity == a.perplexity
    wider = evaluate.perplexity_ci(model, ids, window=16, n_boot=500, seed=3, level=0.99)
    assert wider.low <= a.low and wider.high >= a.high
    assert "CI" in str(a) and a.as_dict()["window_nll"] == list(a.window_nll)


def test_live_windows_are_a_prefix_of_the_full_set():
    model = tiny_decoder()
    ids = torch.randint(0, 50, (1, 8 * 16))
    full = evaluate.perplexity_ci(model, ids, window=16, batch_size=2)
    live = evaluate.perplexity_ci(model, ids[:, : 2 * 16], window=16, batch_size=2)
    assert live.window_nll == full.window_nll[:2]


def test_paired_ratio_of_a_model_with_itself_is_one_and_a_worse_model_is_above_one():
    model, ids = tiny_decoder(), torch.randint(0, 50, (1, 12 * 16))
    a = evaluate.perplexity_ci(model, ids, window=16)
    assert evaluate.perplexity_ratio(a, a) == (1.0, 1.0, 1.0)
    with torch.no_grad():
        worse = copy.deepcopy(model)
        worse.lm_head.weight.add_(torch.randn_like(worse.lm_head.weight))
    b = evaluate.perplexity_ci(worse, ids, window=16)
    ratio, low, high = evaluate.perplexity_ratio(b, a)
    assert ratio == pytest.approx(b.perplexity / a.perplexity)
    assert low <= ratio <= high


def test_paired_ratio_needs_the_same_windows():
    model = tiny_decoder()
    a = evaluate.perplexity_ci(model, torch.randint(0, 50, (1, 64)), window=16)
    b = evaluate.perplexity_ci(model, torch.randint(0, 50, (1, 64)), window=32)
    with pytest.raises(ValueError, match=r"a has 4 of 16 tokens, b 2 of 32"):
        evaluate.perplexity_ratio(a, b)


def test_window_nll_needs_a_whole_window():
    with pytest.raises(ValueError, match=r"at least one whole window of 16 tokens, got 10"):
        evaluate.window_nll(tiny_decoder(), torch.zeros(1, 10, dtype=torch.long), window=16)


def test_one_text_shapes_and_names_a_bad_shape():
    model = torch.nn.Linear(2, 2)  # only its device is read
    assert evaluate.one_text(model, torch.tensor([1, 2, 3])).shape == (1, 3)
    for bad in (torch.zeros(2, 5, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)):
        with pytest.raises(ValueError, match=re.escape(f"need token ids of shape (1, T) with T >= 2, got {tuple(bad.shape)}")):
            evaluate.one_text(model, bad)
