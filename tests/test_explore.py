"""The data that kqv.explore packs for the explorers that compute in the page.

The page's arithmetic is tested in a real browser (tests/test_explorers_browser.py); here, what
Python puts in the page: the registry as it is now, maps that decode to kqv.heads' own, numbers
formatted as the page formats them, and errors that name the offending values.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from kqv import configs, explore, heads, smollm2
from kqv.model import Decoder

pytest_plugins = ["conftest_smollm2"]

WORDS = ["<unk>", "Three", "parts", "of", "Earth", "are", "Crust", ",", "Mantle", "and",
         "the", "cat", "sat", "on", "mat", "."] + [f"w{i}" for i in range(48)]
PROMPTS_PARAGRAPH = (  # chapter 3's paragraph, on which it scores the heads
    "The Earth is made of layers. The crust is the thin outer shell, where we live. Below it lies the "
    "mantle, a thick layer of hot rock that flows very slowly. At the centre is the core, a ball of iron "
    "and nickel. The outer core is liquid; the inner core is solid, because the pressure there is so high."
)
PROMPTS = {
    "running sentence": "Three parts of Earth are Crust , Mantle and",
    "a sentence, twice": "the cat sat on the mat . the cat sat on the mat .",
}


def tiny_model_and_tokenizer(num_layers: int = 3, num_heads: int = 4, num_kv_heads: int = 2, seed: int = 0):
    """A random kqv Decoder and a word-level tokenizer (one id per word): fast stand-ins for SmolLM2."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    config = configs.ModelConfig(
        "tiny", num_layers=num_layers, hidden_size=8 * num_heads, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=8, vocab_size=len(WORDS), intermediate_size=64,
    )
    torch.manual_seed(seed)
    return Decoder(config).eval(), tokenizer


def page_data(output) -> dict:
    """The JSON an explorer's HTML carries for its component."""
    found = re.search(r'<script type="application/json" class="kqv-data">(.*?)</script>', output.data, re.S)
    assert found, "no data block in the explorer's HTML"
    return json.loads(found.group(1))


def test_every_explorer_is_self_contained_and_deterministic():
    model, tokenizer = tiny_model_and_tokenizer()
    outputs = [
        explore.cache_calculator(),
        explore.attention_viewer(model, tokenizer, PROMPTS, random_tokens=4),
        explore.temperature([1.0, 2.0], ["a", "b"]),
    ]
    for output in outputs:
        page = output.data
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "loads something from the network"
        assert "<link" not in page and "@import" not in page and "require(" not in page
    again = explore.attention_viewer(model, tokenizer, PROMPTS, random_tokens=4)
    assert again.data == outputs[1].data, "the same call must write the same bytes (nbval compares them)"


# --- Numbers as a reader reads them ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 bytes"), (1, "1 byte"), (1023, "1,023 bytes"), (1024, "1.00 KiB"), (131_072, "128 KiB"),
        (1_572_864, "1.50 MiB"), (1_179_648, "1.13 MiB"),  # 1.125 MiB: a tie rounds up, as toFixed does
        (10 * 2**30 - 1, "10.0 GiB"), (1023 * 2**20, "1,023 MiB"), (160 * 2**30, "160 GiB"), (1536 * 2**40, "1.50 PiB"),
        (5000 * 2**60, "5,000 EiB"),
    ],
)
def test_format_bytes(n, text):
    assert explore.format_bytes(n) == text


def test_format_count_and_negative_sizes():
    assert explore.format_count(65_536) == "65,536"
    with pytest.raises(ValueError, match=r"negative, got -1"):
        explore.format_bytes(-1)


# --- The cache calculator ----------------------------------------------------------------------------


def test_calculator_offers_every_registered_model_read_at_call_time(monkeypatch):
    data = page_data(explore.cache_calculator())
    assert [p["name"] for p in data["presets"]] == configs.names()
    added = configs.ModelConfig("test/Wide-heads", num_layers=2, hidden_size=96, num_heads=4, num_kv_heads=2, head_dim=64)
    monkeypatch.setitem(configs.REGISTRY, added.name, added)  # another helper's model, registered later
    presets = {p["name"]: p for p in page_data(explore.cache_calculator())["presets"]}
    assert presets[added.name]["head_dim"] == 64 and presets[added.name]["hidden"] == 96  # not hidden / heads
    mla = presets["deepseek-ai/DeepSeek-V2"]
    assert (mla["attention"], mla["d_c"], mla["d_r"]) == ("MLA", 512, 64)


def test_calculator_dtypes_are_kqv_configs_sizes():
    data = page_data(explore.cache_calculator())
    assert {d["name"]: d["bytes"] for d in data["dtypes"]} == {n: configs.dtype_bytes(n) for n in explore.CACHE_DTYPES}
    assert {"float32", "bfloat16", "float16", "int8"} <= set(explore.CACHE_DTYPES)
    assert any("8" in n and n.startswith("float8") for n in explore.CACHE_DTYPES)


@pytest.mark.parametrize("name", ["meta-llama/Llama-2-70b-hf", "deepseek-ai/DeepSeek-V3", "article/MQA"])
def test_calculator_static_numbers_are_kqv_configs(name):
    config = configs.get(name)
    page = explore.cache_calculator(name, context_len=8192, batch_size=3, dtype=torch.float16, budget_gib=40).data
    per_token = configs.kv_bytes_per_token(config, "float16")
    cache = configs.kv_cache_bytes(config, 8192, 3, "float16")
    fits = (40 * 2**30) // configs.kv_cache_bytes(config, 8192, 1, "float16")
    assert f"{explore.format_count(per_token)} bytes ({explore.format_bytes(per_token)})" in page
    assert f"{explore.format_count(cache)} bytes ({explore.format_bytes(cache)})" in page
    assert f"{explore.format_count(fits)} sequences of 8,192 tokens" in page
    assert page_data(explore.cache_calculator(name))["initial"]["preset"] == name


def test_calculator_says_what_mla_counts():
    """The RoPE key is cached beside the latent: estimators that count the latent alone undercount."""
    assert "latent 512 + RoPE key 64 = 576 numbers" in explore._counted(configs.get("deepseek-ai/DeepSeek-V2"))
    assert "latent 512 + RoPE key 0 = 512 numbers" in explore._counted(configs.get("article/MLA"))
    assert "2 × 8 × 128 = 2,048 numbers" in explore._counted(configs.get("meta-llama/Meta-Llama-3-8B"))
    assert "of 1 KV head of width" in explore._counted(configs.get("article/MQA"))


def test_calculator_takes_a_config_outside_the_registry():
    own = configs.get("article/GQA").replace(name="my model", num_kv_heads=4)
    data = page_data(explore.cache_calculator(own))
    assert data["presets"][0]["name"] == "my model" and data["presets"][0]["kv_heads"] == 4
    assert data["initial"]["preset"] == "my model"
    assert [p["name"] for p in data["presets"][1:]] == configs.names()


def test_calculator_errors_name_the_values():
    with pytest.raises(KeyError, match="unknown config 'llama'"):
        explore.cache_calculator("llama")
    with pytest.raises(ValueError, match=r"context_len must be a positive integer, got 0"):
        explore.cache_calculator(context_len=0)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 2.5"):
        explore.cache_calculator(batch_size=2.5)
    with pytest.raises(ValueError, match=r"budget_gib must be a positive number, got -1"):
        explore.cache_calculator(budget_gib=-1)
    with pytest.raises(ValueError, match=r"cache dtype 'float64' is not one of \['float32'"):
        explore.cache_calculator(dtype=torch.float64)


# --- The attention viewer ----------------------------------------------------------------------------


def test_packed_maps_decode_to_the_maps_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    T = 7
    scores = torch.randn(2, 3, T, T, generator=g).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    maps = scores.softmax(-1)                                                # (L, H, T, T), causal
    back = explore.unpack_maps(explore._pack_maps(maps), 2, 3, T)
    assert (back - maps).abs().max() <= 0.5 / 255 + 1e-7
    assert bool((back.triu(1) == 0).all())
    with pytest.raises(ValueError, match="expected 2 x 3 x 36"):
        explore.unpack_maps(explore._pack_maps(maps), 2, 3, T + 1)


def test_viewer_stores_kqv_heads_maps_and_scores():
    model, tokenizer = tiny_model_and_tokenizer()
    L, H = model.config.num_layers, model.config.num_heads
    data = page_data(explore.attention_viewer(model, tokenizer, PROMPTS, random_tokens=5, seed=1, top=3))
    assert (data["layers"], data["heads"]) == (L, H)
    assert [p["name"] for p in data["prompts"]] == [*PROMPTS, "5 random tokens, then the same again"]
    rep = heads.repeated_random_tokens(5, len(WORDS), seed=1)
    for prompt, ids in zip(data["prompts"], [torch.tensor([tokenizer.encode(t).ids]) for t in PROMPTS.values()] + [rep]):
        maps = heads.attention_maps(model, ids)                              # (L, H, T, T)
        T = ids.shape[1]
        assert prompt["tokens"] == heads.token_strings(tokenizer, ids)
        assert (explore.unpack_maps(prompt["maps"], L, H, T) - maps).abs().max() <= 0.5 / 255 + 1e-6
        previous = heads.previous_token_score(maps).flatten()
        assert prompt["scores"]["previous_token"] == pytest.approx(previous.tolist(), abs=5e-4)
    running, twice, random = (p["scores"] for p in data["prompts"])
    assert running["duplicate_token"] is None and running["induction"] is None  # no token repeats
    assert twice["induction"] is not None and twice["punctuation"] is not None
    assert random["punctuation"] is None
    short = page_data(explore.attention_viewer(model, tokenizer, {"short": "the cat sat"}, random_tokens=0,
                                               scores={}))["prompts"][0]["scores"]
    assert short["previous_token"] is None and short["first_token"] is None  # too few queries to tell
    expected = heads.head_scores(model, tokenizer, PROMPTS["running sentence"], seed=1)
    for kind in data["kinds"]:
        ranked = heads.rank_heads(expected[kind["key"]], top=3)
        assert [(r["layer"], r["head"]) for r in kind["top"]] == [(r["layer"], r["head"]) for r in ranked]
        assert kind["label"] == explore.HEAD_KINDS[kind["key"]]
    best = heads.rank_heads(expected["previous_token"], top=1)[0]
    assert data["initial"] == {"prompt": 0, "layer": best["layer"], "head": best["head"]}


def test_viewer_uses_the_scores_it_is_given():
    model, tokenizer = tiny_model_and_tokenizer()
    scores = {"induction": torch.zeros(3, 4).index_put_((torch.tensor([2]), torch.tensor([1])), torch.tensor(0.9))}
    data = page_data(explore.attention_viewer(model, tokenizer, PROMPTS, random_tokens=0, scores=scores,
                                              scored_on="a made-up test", layer=1, head=3))
    assert [k["key"] for k in data["kinds"]] == ["induction"]
    assert data["kinds"][0]["top"][0] == {"layer": 2, "head": 1, "score": 0.9}
    assert data["scored_on"] == "a made-up test" and data["initial"] == {"prompt": 0, "layer": 1, "head": 3}
    assert len(data["prompts"]) == 2


def test_viewer_of_smollm2_size_stays_small():
    """30 layers x 9 heads and four prompts of SmolLM2's size (the weights do not change the size)."""
    model, tokenizer = tiny_model_and_tokenizer(num_layers=30, num_heads=9, num_kv_heads=3)
    lengths = {"11 tokens": 11, "28 tokens": 28, "12 tokens": 12}
    prompts = {name: torch.randint(16, len(WORDS), (n,)) for name, n in lengths.items()}
    zeros = {kind: torch.zeros(30, 9) for kind in explore.HEAD_KINDS}
    page = explore.attention_viewer(model, tokenizer, prompts, random_tokens=16, scores=zeros).data
    stored = sum(30 * 9 * T * (T + 1) // 2 for T in [*lengths.values(), 32])
    assert len(page) < 1.5e6, f"{len(page):,} bytes"
    assert len(page) < 4 / 3 * stored + 150_000  # the maps in base64, plus scores, tokens and code


def test_viewer_of_the_real_model_as_the_book_calls_it(smol_model, smol_tokenizer):
    """SmolLM2 on chapter 3's prompts: under 1.5 MB, and its best induction head shows on the repeat."""
    prompts = {
        "the running sentence": "Three parts of Earth are Crust, Mantle and",
        "a sentence, twice": "The cat sat on the mat, and the dog ate the bone. "
                             "The cat sat on the mat, and the dog ate the bone.",
        "the crust": "The crust is the thin outer shell, where we live.",
    }
    scores = heads.head_scores(smol_model, smol_tokenizer, PROMPTS_PARAGRAPH)
    output = explore.attention_viewer(smol_model, smol_tokenizer, prompts, scores=scores,
                                      scored_on="a paragraph about the Earth's layers")
    data = page_data(output)
    assert len(output.data) < 1.5e6, f"{len(output.data):,} bytes"
    assert (data["layers"], data["heads"], len(data["prompts"])) == (30, 9, 4)
    assert data["prompts"][0]["tokens"] == heads.token_strings(smol_tokenizer, smollm2.encode(smol_tokenizer, prompts["the running sentence"]))
    best = heads.rank_heads(scores["induction"], top=1)[0]
    on_repeat = data["prompts"][3]["scores"]["induction"][best["layer"] * 9 + best["head"]]
    assert on_repeat > 0.5, f"layer {best['layer']} head {best['head']}: induction {on_repeat} on the repeated tokens"


def test_viewer_errors_name_the_values():
    model, tokenizer = tiny_model_and_tokenizer()
    with pytest.raises(ValueError, match=r"prompt 'one' has 1 token"):
        explore.attention_viewer(model, tokenizer, {"one": "cat"}, random_tokens=0)
    with pytest.raises(ValueError, match=r"scores\['induction'\] has shape \(2, 4\), the model has \(L, H\) = \(3, 4\)"):
        explore.attention_viewer(model, tokenizer, PROMPTS, scores={"induction": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match=r"layer 3, head 0 is not a head of this model \(3 layers x 4 heads\)"):
        explore.attention_viewer(model, tokenizer, PROMPTS, random_tokens=0, layer=3, head=0)
    with pytest.raises(ValueError, match="pass scores="):
        explore.attention_viewer(model, tokenizer, {"ids": [1, 2, 3]}, random_tokens=0)


# --- The temperature explorer ------------------------------------------------------------------------


def test_temperature_packs_the_shelf_and_shows_torch_softmax():
    wanted = torch.tensor([0.03, 0.004, 0.70, 0.004, 0.004, 0.004, 0.25, 0.004])  # chapter 2's shelf
    scores = torch.log(wanted / wanted.min())
    values = torch.rand(8, 5, generator=torch.Generator().manual_seed(0))
    output = explore.temperature(scores, [f"book {i}" for i in range(1, 9)], values, list("abcde"),
                                 tau=0.5, highlight=2)
    data = page_data(output)
    assert torch.allclose(torch.tensor(data["scores"]), scores)
    assert torch.allclose(torch.tensor(data["values"]), values)
    assert data["tau"] == 0.5 and data["highlight"] == [2] and data["range"] == [0.05, 20.0]
    at_half = torch.softmax(scores / 0.5, dim=-1)
    assert f"<th>book 3</th><td>{explore._fixed(100 * at_half[2].item(), 1)}%</td>" in output.data
    at_one = explore.temperature(scores, [f"book {i}" for i in range(1, 9)]).data
    assert "<th>book 3</th><td>70.0%</td>" in at_one and "<th>book 7</th><td>25.0%</td>" in at_one


def test_temperature_errors_name_the_values():
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        explore.temperature([1, 2, 3], ["a", "b"])
    with pytest.raises(ValueError, match=r"values must be \(3, M\), one row per score, got shape \(2, 2\)"):
        explore.temperature([1, 2, 3], list("abc"), [[1, 2], [3, 4]], ["x", "y"])
    with pytest.raises(ValueError, match="values has 2 columns, so value_labels needs 2 names"):
        explore.temperature([1, 2, 3], list("abc"), torch.ones(3, 2), ["x"])
    with pytest.raises(ValueError, match=r"scores must be finite numbers, got \[1.0, inf\]"):
        explore.temperature([1, float("inf")], list("ab"))
    with pytest.raises(ValueError, match=r"tau must be a positive number, got 0"):
        explore.temperature([1, 2], list("ab"), tau=0)
    with pytest.raises(ValueError, match=r"tau_range must satisfy 0 < low < high, got \(2, 1\)"):
        explore.temperature([1, 2], list("ab"), tau_range=(2, 1))
