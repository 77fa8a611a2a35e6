"""kqv.serving_results: the measurements' rows, the committed file, and what checking it catches."""

import copy
import json
import math

import pytest
import torch

from kqv import configs, evaluate, serving_results
from kqv.model import Decoder

TINY = configs.get("HuggingFaceTB/SmolLM2-135M-Instruct").replace(
    name="tiny", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
    vocab_size=61, intermediate_size=48,
)


@pytest.fixture(scope="module")
def measured():
    torch.manual_seed(0)
    model = Decoder(TINY).eval()
    return serving_results.measure(model, IDS, window=20, windows=(8, 16), sinks=(0, 2), chunk=4)


IDS = torch.randint(0, 61, (1, 45), generator=torch.Generator().manual_seed(1))  # two windows of 20, a tail


def with_meta(measured):
    meta = {"command": "test", "date": "today", "device": "cpu", "versions": {}, "text": "random",
            "tokens": 40, "chunk": 4}
    return {"meta": meta, **copy.deepcopy(measured)}


def test_measure_gives_one_row_per_format_and_per_setting(measured):
    assert [row["format"] for row in measured["quality"]] == list(serving_results.FORMATS)
    settings = [(row["window"], row["sinks"]) for row in measured["window"]]
    assert settings == [(8, 0), (8, 2), (16, 0), (16, 2), (None, 0)]
    bytes_fp32 = 2 * TINY.num_layers * TINY.num_kv_heads * TINY.head_dim * 4
    assert measured["quality"][0]["bytes_per_token"] == bytes_fp32
    assert measured["quality"][0]["agreement_float32"] == 1.0
    assert set(measured["seconds"]) == {"quality", "window"}


def test_measure_is_the_standard_measurement_window_by_window(measured):
    """Each setting is scored on the same whole windows as kqv.evaluate.perplexity_ci, and merged the same way."""
    torch.manual_seed(0)
    standard = evaluate.perplexity_ci(Decoder(TINY).eval(), IDS, window=20)
    full = measured["window"][-1]
    assert full["window"] is None and full["windows"] == standard.windows == 2
    assert full["perplexity"] == pytest.approx(standard.perplexity, rel=1e-5)
    assert full["window_nll"] == pytest.approx(list(standard.window_nll), rel=1e-5)
    assert full["ratio_full"] == pytest.approx([1.0, 1.0, 1.0])
    for row in measured["quality"] + measured["window"]:
        assert row["low"] <= row["perplexity"] <= row["high"]
        assert row["perplexity"] == pytest.approx(
            torch.tensor(row["window_nll"], dtype=torch.float64).mean().div(19).exp().item(), rel=1e-9)
    fp32 = measured["quality"][0]
    assert fp32["format"] == "float32" and fp32["ratio_float32"] == pytest.approx([1.0, 1.0, 1.0])
    assert fp32["perplexity"] == pytest.approx(standard.perplexity, rel=1e-4)  # through the cache, same numbers


def test_merge_windows_refuses_rows_in_another_order():
    a = [{"format": "float32", "perplexity": 2.0}, {"format": "int8", "perplexity": 3.0}]
    with pytest.raises(ValueError, match=r"row 0 is not the same setting in every window"):
        serving_results.merge_windows([a, a[::-1]], window=8)


def test_measure_refuses_a_sliding_window_as_long_as_a_scored_window():
    model = Decoder(TINY).eval()
    with pytest.raises(ValueError, match=r"shorter than the 12 tokens of a scored window, got \[8, 12\]"):
        serving_results.measure(model, torch.zeros(1, 24, dtype=torch.long), window=12, windows=(12, 8))
    with pytest.raises(ValueError, match=r"need at least one whole window of 12 tokens, got 11"):
        serving_results.measure(model, torch.zeros(1, 11, dtype=torch.long), window=12, windows=(8,))


def test_check_accepts_what_measure_gives_and_names_what_is_missing(measured):
    serving_results.check(with_meta(measured))
    broken = with_meta(measured)
    del broken["meta"]["chunk"]
    with pytest.raises(ValueError, match=r"meta lacks \['chunk'\]"):
        serving_results.check(broken)
    broken = with_meta(measured)
    del broken["quality"][2]["high"]
    with pytest.raises(ValueError, match=r"a quality row lacks \['high'\]"):
        serving_results.check(broken)
    broken = with_meta(measured)
    broken["quality"] = [row for row in broken["quality"] if row["format"] != "bfloat16"]
    with pytest.raises(ValueError, match="need the float32 and bfloat16 references"):
        serving_results.check(broken)
    broken = with_meta(measured)
    del broken["window"][1]["perplexity"]
    with pytest.raises(ValueError, match=r"a window row lacks \['perplexity'\]"):
        serving_results.check(broken)
    broken = with_meta(measured)
    broken["window"] = broken["window"][:-1]
    with pytest.raises(ValueError, match="exactly one full-context row"):
        serving_results.check(broken)


def test_load_reads_a_file_it_checks(tmp_path, measured):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(with_meta(measured)))
    assert serving_results.load(path)["meta"]["tokens"] == 40
    path.write_text(json.dumps({"meta": {}}))
    with pytest.raises(ValueError, match=r"the results lack \['quality', 'window'\]"):
        serving_results.load(path)


def test_the_committed_results_are_smollm2s_standard_measurement():
    results = serving_results.load()
    meta = results["meta"]
    assert meta["text"] == serving_results.TEXT and not meta["quick"]
    assert (meta["tokens"], meta["window"]) == (evaluate.FULL_TOKENS, evaluate.WINDOW)
    assert {row["windows"] for row in results["quality"] + results["window"]} == {evaluate.FULL_TOKENS // evaluate.WINDOW}
    assert meta["command"].startswith("python -m kqv.serving_results")
    smol = configs.get("HuggingFaceTB/SmolLM2-135M-Instruct")
    bytes_per_token = {row["format"]: row["bytes_per_token"] for row in results["quality"]}
    assert bytes_per_token["float32"] == configs.kv_bytes_per_token(smol, torch.float32)
    assert bytes_per_token["bfloat16"] == configs.kv_bytes_per_token(smol, torch.bfloat16)
    # 8-bit values plus one float32 scale per token and KV head, for K and V, in every layer.
    assert bytes_per_token["int8"] == bytes_per_token["fp8"] == 2 * 30 * 3 * (64 + 4)
    settings = {(row["window"], row["sinks"]) for row in results["window"]}
    assert settings == {(w, s) for w in serving_results.WINDOWS for s in serving_results.SINKS} | {(None, 0)}
    assert max(serving_results.WINDOWS) < meta["window"]


def test_the_committed_full_cache_scores_what_the_quality_results_do():
    """Same model in float32, same windows: the serving results' full cache is results/quality.json's original."""
    from kqv import experiments

    original = next(r for r in experiments.load_results("quality")["results"] if r["key"] == "original")
    full = next(row for row in serving_results.load()["window"] if row["window"] is None)
    assert full["perplexity"] == pytest.approx(original["perplexity"]["perplexity"], rel=1e-3)


def test_the_committed_text_is_what_evaluation_ids_reads():
    from kqv import smollm2

    tokenizer = smollm2.build_tokenizer()
    assert serving_results.evaluation_ids(tokenizer).shape == (1, serving_results.load()["meta"]["tokens"])


def test_a_missing_results_file_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(serving_results.resources, "files", lambda package: tmp_path)
    with pytest.raises(FileNotFoundError, match=r"package data must include data/\*\.json.*python -m kqv.serving_results"):
        serving_results.load()


# --- the committed results still follow from the code -------------------------------------------

pytest_plugins = ["conftest_smollm2"]


@pytest.mark.parametrize("what", [("quality", "int8"), ("window", (32, 4)), ("window", (32, 0))])
def test_the_committed_first_window_follows_from_the_code(smol_model, smol_tokenizer, what):
    """Window 0 of the committed run, scored again through the same cache, gives the stored number.

    If a change to kqv moves it, the file is stale: run ``python -m kqv.serving_results`` again.
    """
    from kqv.quant import cache_quality
    from kqv.window import window_perplexity

    results = serving_results.load()
    window = results["meta"]["window"]
    ids = serving_results.evaluation_ids(smol_tokenizer)[:, :window]                    # window 0
    kind, setting = what
    if kind == "quality":
        row = next(r for r in results["quality"] if r["format"] == setting)
        ppl = cache_quality(smol_model, ids, [setting])[0]["perplexity"]
    else:
        row = next(r for r in results["window"] if (r["window"], r["sinks"]) == setting)
        ppl = window_perplexity(smol_model, ids, setting[0], sinks=setting[1], chunk=results["meta"]["chunk"])
    assert math.log(ppl) * (window - 1) == pytest.approx(row["window_nll"][0], rel=1e-5)
