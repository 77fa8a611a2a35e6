"""The command that measures what each design costs, and the results it committed."""

import copy
import json
from pathlib import Path

import pytest
import torch

from kqv import evaluate, experiments, train
from kqv.configs import kv_elements_per_token

RESULTS = Path(__file__).resolve().parent.parent / "kqv" / "data" / "results"


@pytest.mark.parametrize("name", experiments.SUBCOMMANDS)
def test_committed_results_match_the_schema(name):
    doc = experiments.load_results(name)                     # validates
    assert doc["subcommand"] == name and not doc["quick"]
    assert doc["command"].startswith(f"python -m kqv.experiments {name}")


def test_committed_quality_uses_the_full_standard_measurement():
    doc = json.loads((RESULTS / "quality.json").read_text())
    keys = [row["key"] for row in doc["results"]]
    assert keys == [c.key for c in experiments.CONVERSIONS]
    for row in doc["results"]:
        ppl = row["perplexity"]
        assert ppl["windows"] * ppl["window"] == evaluate.FULL_TOKENS and ppl["window"] == evaluate.WINDOW
        assert ppl["low"] <= ppl["perplexity"] <= ppl["high"]


def test_committed_repairs_keep_their_cache_bytes():
    doc = json.loads((RESULTS / "uptrain.json").read_text())
    assert all(row["bytes_per_token_after"] == row["bytes_per_token"] for row in doc["results"])


def test_validate_names_every_problem():
    doc = json.loads((RESULTS / "scratch.json").read_text())
    broken = copy.deepcopy(doc)
    del broken["date"]
    broken["results"][0]["parameters"] = "many"
    with pytest.raises(ValueError, match=r"(?s)2 problem\(s\).*missing 'date'.*results\[0\]\.parameters: expected an integer"):
        experiments.validate(broken)
    with pytest.raises(ValueError, match=r"subcommand must be one of"):
        experiments.validate({"subcommand": "other"})


def test_scratch_designs_have_equal_parameters_and_shrinking_caches():
    size = experiments.plan("cpu").scratch
    configs = experiments.scratch_designs(size)
    assert list(configs) == ["MHA", "GQA-4", "GQA-2", "MQA", "MLA"]
    per_layer = {name: kv_elements_per_token(c, per_layer=True) for name, c in configs.items()}
    assert per_layer == {"MHA": 256, "GQA-4": 128, "GQA-2": 64, "MQA": 32, "MLA": 64}
    from kqv.model import Decoder
    with torch.device("meta"):
        counts = [train.count_parameters(Decoder(c)) for c in configs.values()]
    unit = 3 * size.hidden_size * size.num_layers                       # one more MLP column in every layer
    assert all(abs(n - counts[0]) <= unit / 2 for n in counts), counts


def test_the_quick_command_runs_and_resumes(tmp_path, capsys):
    args = ["scratch", "--quick", "--device", "cpu", "--seeds", "0", "--no-progress"]
    assert experiments.main([*args, "--out", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "scratch.json").read_text())
    experiments.validate(first)
    assert first["quick"] and first["seeds"] == [0] and first["command"].endswith("--no-progress --out " + str(tmp_path / "a"))
    # Run again: every unit is found done, nothing is trained again.
    units = sorted((tmp_path / "a" / ".work").rglob("*.json"))
    mtimes = [u.stat().st_mtime_ns for u in units]
    experiments.main([*args, "--out", str(tmp_path / "a")])
    assert [u.stat().st_mtime_ns for u in units] == mtimes
    again = json.loads((tmp_path / "a" / "scratch.json").read_text())
    assert [r["validation_loss"] for r in first["results"]] == [r["validation_loss"] for r in again["results"]]
    assert "scratch: wrote" in capsys.readouterr().err


def test_unknown_conversion_is_named():
    with pytest.raises(KeyError, match=r"unknown conversion 'gqa-2'; known: \['original', 'mqa-mean'"):
        experiments.build_conversion("gqa-2", None, None)


def test_load_results_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"quality.json.*python -m kqv.experiments quality --out"):
        experiments.load_results("quality", tmp_path)
