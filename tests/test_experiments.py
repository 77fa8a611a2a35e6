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


# --- the committed results still follow from the code -----------------------------------------
# The full runs take minutes; their first pieces take seconds. If a change to kqv
# changes what a run computes, these fail, and the results must be made again.

pytest_plugins = ["conftest_smollm2"]


def test_uptrain_and_quality_measured_the_same_unrepaired_models():
    quality = {row["key"]: row["perplexity"] for row in experiments.load_results("quality")["results"]}
    uptrain = experiments.load_results("uptrain")
    assert uptrain["original"]["perplexity"] == quality["original"]
    for row in uptrain["results"]:
        assert row["before"] == quality[row["key"]], row["key"]


@pytest.mark.parametrize("key", ["original", "mqa-mean"])
def test_committed_quality_follows_from_the_code(smol_model, smol_tokenizer, key):
    """The first window of the standard measurement, scored again, gives the stored number."""
    row = next(r for r in experiments.load_results("quality")["results"] if r["key"] == key)
    ids = evaluate.eval_tokens(smol_tokenizer)[:, : evaluate.WINDOW]                   # window 0
    model = experiments.build_conversion(key, smol_model, calibration=None)
    with torch.no_grad():
        nll = float(evaluate.window_nll(model, ids)[0])
    assert nll == pytest.approx(row["perplexity"]["window_nll"][0], rel=1e-5)


class _Stop(Exception):
    pass


def test_committed_scratch_follows_from_the_code():
    """The first logged loss of MHA's seed-0 run, trained again, is the stored one (on a machine like the run's)."""
    doc = experiments.load_results("scratch")
    the_plan = experiments.plan("cpu", seeds=tuple(doc["seeds"]))
    here = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
            "precision": str(train.autocast_dtype("cpu", the_plan.scratch.train.precision) or "torch.float32")}
    there = {"device": doc["device"], "threads": doc["threads"], "torch": doc["versions"]["torch"],
             "precision": doc["precision"]}
    if here != there:
        pytest.skip(f"this machine trains differently from the committed run: {here} against {there}")
    assert doc["settings"]["scratch"] == json.loads(json.dumps(the_plan.as_dict()["scratch"]))
    from kqv import corpus
    from kqv.model import Decoder

    tokenizer = train.train_bpe(corpus.documents("train"), the_plan.scratch.vocab_size)
    assert experiments._sha(tokenizer.to_str()) == doc["tokenizer"]["sha256"]
    train_ids = torch.tensor(tokenizer.encode(corpus.text("train")).ids)
    ts = the_plan.scratch.train
    config = experiments.scratch_designs(the_plan.scratch)["MHA"]
    torch.manual_seed(0)
    model = Decoder(config)
    train.init_weights(model)
    losses = []

    def record(step, loss):
        losses.append(loss)
        if len(losses) == ts.log_every:
            raise _Stop

    with pytest.raises(_Stop):
        train.train_lm(model, train_ids, ts, seed=0, progress=record)
    stored = next(r for r in next(d for d in doc["results"] if d["design"] == "MHA")["runs"] if r["seed"] == 0)
    assert stored["losses"][0][0] == ts.log_every
    assert sum(losses) / len(losses) == pytest.approx(stored["losses"][0][1], rel=1e-6)
