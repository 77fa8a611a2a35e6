"""kqv.bench: the benchmark runs and its results are well-formed (nothing about speed).

``python -m kqv.bench --quick --json PATH`` runs once for the whole module;
the tests then check its JSON: every key, positive finite numbers, ratios and
roofline fractions that follow from the timings they report, and outputs that
agree where two paths compute the same thing. The goals (a roofline fraction of
0.5, ratios of 1 and 5) are what the benchmark reports against, never asserted:
a busy CI machine must not fail a test for being slow.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kqv import bench

ROOT = Path(__file__).resolve().parents[1]
RATIOS = [
    "decode_roofline_fraction", "gqa_fused_vs_repeat", "mla_absorbed_vs_naive", "smollm2_kqv_vs_transformers",
    "paged_vs_dense_decode",
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The JSON and printed table of one ``--quick`` run."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "kqv.bench", "--quick", "--markdown", "--json", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(path.read_text()), proc.stdout


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def close(a, b, rel=1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel)


def test_every_ratio_is_reported_with_its_goal(quick_run):
    result, table = quick_run
    assert set(RATIOS) <= set(result)
    assert result["goals"] == bench.GOALS
    for key in RATIOS:
        value = result[key]
        if value is None:  # only with a stated reason
            assert result["skipped"][key]
        else:
            assert positive(value), (key, value)
        assert key in table
        assert f"| `{key}` |" in table  # the Markdown summary for the README


def test_meta_and_machine(quick_run):
    result, _ = quick_run
    meta, machine = result["meta"], result["machine"]
    assert meta["quick"] is True
    assert isinstance(meta["threads"], int) and meta["threads"] >= 1
    assert meta["device"] and meta["dtype"] and meta["date"]
    assert positive(meta["wall_seconds"])
    for key in ("copy_bytes_per_second", "matmul_flops_per_second", "ridge_flops_per_byte"):
        assert positive(machine[key]), key
    assert close(machine["ridge_flops_per_byte"], machine["matmul_flops_per_second"] / machine["copy_bytes_per_second"])
    # The roof is the higher of the rates measured before and after the decode steps,
    # each the fastest of its repeats (so never below their median).
    for key in ("copy_bytes_per_second", "matmul_flops_per_second"):
        assert machine[key] == max(machine["before"][key], machine["after"][key]), key
        for when in ("before", "after"):
            assert machine[when][key] >= machine[when][f"{key}_median"], (when, key)


def test_roofline_rows_follow_from_their_timings(quick_run):
    result, _ = quick_run
    roof, machine = result["decode_roofline"], result["machine"]
    rows = roof["rows"]
    contexts = sorted({r["context"] for r in rows})
    assert contexts == sorted(result["meta"]["sizes"]["contexts"])
    assert {(r["variant"], r["context"]) for r in rows} == {(v, s) for v in bench.VARIANTS for s in contexts}
    for r in rows:
        for key in ("seconds", "cache_bytes", "bytes", "flops", "floor_seconds", "roofline_fraction"):
            assert positive(r[key]), (r["variant"], r["context"], key)
        assert r["bytes"] >= r["cache_bytes"]
        memory = r["bytes"] / machine["copy_bytes_per_second"]
        compute = r["flops"] / machine["matmul_flops_per_second"]
        assert close(r["floor_seconds"], max(memory, compute))
        assert r["bound"] == ("memory" if memory >= compute else "compute")
        assert close(r["roofline_fraction"], r["floor_seconds"] / r["seconds"])
        assert close(r["flops_per_byte"], r["flops"] / r["bytes"])
    at_largest = [r for r in rows if r["context"] == contexts[-1]]
    worst = min(at_largest, key=lambda r: r["roofline_fraction"])
    assert roof["context"] == contexts[-1] and roof["worst_variant"] == worst["variant"]
    assert close(result["decode_roofline_fraction"], worst["roofline_fraction"])


def test_cache_sizes_shrink_along_the_family(quick_run):
    result, _ = quick_run
    e = torch.empty((), dtype=getattr(torch, result["meta"]["dtype"])).element_size()
    per_token = {r["variant"]: r["cache_bytes_per_token"] for r in result["decode_roofline"]["rows"]}
    assert per_token == {"MHA": 2 * 32 * 128 * e, "GQA": 2 * 8 * 128 * e, "MQA": 2 * 128 * e, "MLA": 576 * e}


def test_gqa_and_mla_ratios_and_agreement(quick_run):
    result, _ = quick_run
    gqa, mla = result["gqa"], result["mla"]
    assert positive(gqa["kqv_seconds"]) and positive(gqa["repeat_seconds"])
    assert close(result["gqa_fused_vs_repeat"], gqa["repeat_seconds"] / gqa["kqv_seconds"])
    tol = 1e-4 if result["meta"]["dtype"] == "float32" else 5e-2
    assert gqa["relative_diff"] < tol  # the two compute the same attention
    assert positive(mla["absorbed_seconds"]) and positive(mla["naive_seconds"])
    assert close(result["mla_absorbed_vs_naive"], mla["naive_seconds"] / mla["absorbed_seconds"])
    assert mla["config"] == "deepseek-ai/DeepSeek-V2-Lite"
    assert mla["relative_diff"] < tol


def test_a_skip_reason_stays_on_its_row_of_the_markdown(quick_run):
    result = {**quick_run[0], "smollm2_kqv_vs_transformers": None}
    result["skipped"] = {"smollm2_kqv_vs_transformers": "ModuleNotFoundError: not installed. Install it with:\n    pip | x"}
    rows = [line for line in bench.format_markdown(result).splitlines() if "smollm2_kqv_vs_transformers" in line]
    assert rows == [
        "| SmolLM2-135M tokens/s: kqv vs transformers | `smollm2_kqv_vs_transformers` | skipped: "
        "ModuleNotFoundError: not installed. Install it with: pip / x | ≥ 1 |"
    ]


def test_smollm2_generates_the_same_tokens_in_both(quick_run):
    result, _ = quick_run
    if result["smollm2_kqv_vs_transformers"] is None:
        pytest.skip(result["skipped"]["smollm2_kqv_vs_transformers"])
    s = result["smollm2"]
    if result["meta"]["dtype"] == "float32":  # in half precision the two may round apart
        assert s["same_tokens"] is True
    for key in ("kqv_tokens_per_second", "transformers_tokens_per_second", "kqv_seconds", "transformers_seconds"):
        assert positive(s[key]), key
    assert close(s["kqv_tokens_per_second"], s["new_tokens"] / s["kqv_seconds"])
    assert close(result["smollm2_kqv_vs_transformers"], s["kqv_tokens_per_second"] / s["transformers_tokens_per_second"])


def test_paged_decode_holds_less_and_agrees_with_dense(quick_run):
    result, table = quick_run
    p = result["paged"]
    assert p["batch_size"] == 32 and len(p["lengths"]) == 32 and len(set(p["lengths"])) > 1  # mixed lengths
    assert positive(p["dense_seconds"]) and positive(p["paged_seconds"])
    assert close(result["paged_vs_dense_decode"], p["dense_seconds"] / p["paged_seconds"])
    assert p["used_bytes"] <= p["paged_bytes"] < p["dense_bytes"]  # strictly less memory held
    # paging wastes less than one block per sequence
    per_token = p["used_bytes"] // (sum(p["lengths"]) + 32 * p["decode_steps"])
    assert p["paged_bytes"] - p["used_bytes"] < 32 * p["block_size"] * per_token
    tol = 1e-4 if result["meta"]["dtype"] == "float32" else 5e-2
    assert p["relative_diff"] < tol
    eq = p["equal_lengths"]
    assert close(eq["ratio"], eq["dense_seconds"] / eq["paged_seconds"]) and eq["relative_diff"] < tol
    assert "Paged decode" in table


def test_paged_decode_is_notebook_sized():
    r = bench.paged_vs_dense_decode(batch_size=4, low=5, high=40, block_size=4, repeats=2, warmup=1, device="cpu")
    assert len(r["lengths"]) == 4 and len(r["dense_times"]) == 2
    assert r["relative_diff"] < 1e-5 and r["paged_bytes"] < r["dense_bytes"]


@pytest.mark.parametrize("cold", [False, True])
def test_decode_step_times_is_notebook_sized(cold):
    rows = bench.decode_step_times(["MHA", "MQA", "MLA"], [16, 64], repeats=2, warmup=1, cold=cold, device="cpu")
    assert [(r["variant"], r["context"]) for r in rows] == [
        (v, s) for s in (16, 64) for v in ("MHA", "MQA", "MLA")
    ]
    for r in rows:
        assert all(positive(t) for t in r["times"]) and len(r["times"]) == 2
        assert close(r["seconds"], sorted(r["times"])[0] / 2 + sorted(r["times"])[1] / 2)
        assert r["cache_bytes"] == r["cache_bytes_per_token"] * r["context"]


def fake_cache(monkeypatch, nbytes):
    """Make kqv.bench believe that the last-level cache holds ``nbytes``."""
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda device: nbytes)


def test_cold_ring_reads_twice_the_cache_between_two_reads_of_a_number(monkeypatch):
    fake_cache(monkeypatch, 4096)  # bytes: 1024 float32 numbers
    ring = bench.ColdRing(300, torch.device("cpu"), torch.float32)
    assert ring.numbers.numel() == 2 * 1024 + 300
    base = ring.numbers.data_ptr()
    last_read, now = {}, 0  # number index -> when it was last read, counting numbers read
    for need in [100, 300, 7, 250, 300, 2, 299, 300, 120] * 20:
        a, b = ring.take((need // 2,), (need - need // 2,))
        assert a.numel() + b.numel() == need
        first = (a.data_ptr() - base) // 4
        assert b.data_ptr() == a.data_ptr() + 4 * a.numel()  # the next numbers, in order
        assert first + need <= ring.numbers.numel()
        for i in range(first, first + need):
            if i in last_read:
                assert now - last_read[i] - 1 >= 2 * 1024, (i, now - last_read[i] - 1)
            last_read[i] = now
            now += 1
    assert len(last_read) > 2 * 1024  # the ring went round
    with pytest.raises(ValueError, match="301 numbers, more than the ring's largest take, 300"):
        ring.take((301,))


def test_cold_decode_steps_read_a_new_cache_every_call(monkeypatch):
    """Each call of a cold step attends to other keys (and, for MLA, other up-projections)."""
    fake_cache(monkeypatch, 2**26)  # room for three MLA up-projections of 16 MiB
    seen = {"kv": [], "up": []}
    real_sdpa = bench.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen["kv"].append((k.data_ptr(), v.data_ptr()))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(bench, "scaled_dot_product_attention", spy)
    ring = bench.ColdRing(5 * 10**6, torch.device("cpu"), torch.float32)  # MLA: 8192 x 512 up-projections
    step, *_ = bench._decode_case(bench.VARIANTS["MQA"], 8, 1, "cpu", torch.float32, {}, ring, 3)
    for _ in range(3):
        step()
    assert len(set(seen["kv"])) == 3
    step, *_ = bench._decode_case(bench.VARIANTS["MLA"], 8, 1, "cpu", torch.float32, layers := {}, ring, 3)
    for _ in range(3):
        step()
        seen["up"].append(layers["article/MLA+RoPE"].kv_b_proj.weight.data_ptr())
    assert len(set(seen["up"])) == 3


def test_decode_step_times_rejects_unknown_variants():
    with pytest.raises(ValueError, match="unknown variants"):
        bench.decode_step_times(["MLA", "XYZ"], [8])


# --- the CPU decode path the benchmark relies on (kqv.attention._split_kv) -------------

@pytest.mark.parametrize("B, H, H_kv, S", [(1, 32, 1, 2100), (1, 8, 2, 1537), (3, 16, 1, 1100)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cpu_split_kv_decode_equals_eager(B, H, H_kv, S, dtype):
    """Slices of the keys attended apart and merged by log-sum-exp give the eager result."""
    from conftest import TOL
    from kqv.attention import _split_kv, scaled_dot_product_attention

    q = torch.randn(B, H, 1, 64, dtype=dtype)
    k, v = torch.randn(B, H_kv, S, 64, dtype=dtype), torch.randn(B, H_kv, S, 64, dtype=dtype)
    eager = scaled_dot_product_attention(q, k, v, is_causal=True).double()
    tol = dict(atol=TOL[dtype], rtol=min(TOL[dtype], 1e-5))  # float64: merged in float64 too
    q_f = q.reshape(B, H_kv, H // H_kv, 64)
    for splits in (2, 3, 7):  # 1537 and 2100 keys leave a remainder
        out = _split_kv(q_f, k, v, 0.125, splits).reshape(B, H, 1, 64)
        assert torch.allclose(out.double(), eager, **tol), splits
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # so that the fused path takes the split
        fused = scaled_dot_product_attention(q, k, v, is_causal=True, fused=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(fused.double(), eager, **tol)
