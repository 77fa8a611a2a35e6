"""kqv.diagrams: each picture is drawn from the shapes of what it depicts, legibly, the same every time."""

import itertools
import json
import re

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.text import Text  # noqa: E402

import kqv  # noqa: E402
from kqv import configs, diagrams, explore, plots  # noqa: E402

SMALL_MLA = dict(hidden_size=256, num_heads=8, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
                 qk_rope_head_dim=16, v_head_dim=32)  # chapter 7's module


@pytest.fixture(autouse=True)
def _style():
    plots.use_style()  # as every chapter's set-up cell: fixed SVG ids, the book's fonts
    yield
    plt.close("all")


def by_gid(fig, prefix):
    """The artists whose gid starts with ``prefix``, in drawing order."""
    return [a for a in fig.findobj() if (a.get_gid() or "").startswith(prefix)]


def one(fig, gid):
    found = [a for a in fig.findobj() if a.get_gid() == gid]
    assert len(found) == 1, f"{len(found)} artists with gid {gid!r}"
    return found[0]


def width(fig, gid) -> float:
    """A bar's length in inches (the diagrams draw in inches)."""
    patch = one(fig, gid)
    assert isinstance(patch, Rectangle)
    return patch.get_width()


def text(fig, gid) -> str:
    found = one(fig, gid)
    assert isinstance(found, Text)
    return found.get_text()


def overlapping_text(fig):
    """Pairs of visible texts whose boxes overlap (by more than a pixel), and texts outside the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip()]
    pairs = [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2)
             if ba.x0 < bb.x1 - 1 and bb.x0 < ba.x1 - 1 and ba.y0 < bb.y1 - 1 and bb.y0 < ba.y1 - 1]
    right = fig.get_size_inches()[0] * fig.dpi
    outside = [t for t, b in boxes if b.x0 < -1 or b.x1 > right + 1]
    return pairs, outside


# Every diagram, as a chapter would call it.
DIAGRAMS = {
    "qkv_projection": lambda w: diagrams.qkv_projection(configs.get("HuggingFaceTB/SmolLM2-135M-Instruct"),
                                                        width_in=w),
    "qkv_projection, one small head": lambda w: diagrams.qkv_projection(kqv.Attention(7, 1, head_dim=4),
                                                                        width_in=w),
    "head_split": lambda w: diagrams.head_split(kqv.Attention(512, 32), width_in=w),
    "head_split, GQA": lambda w: diagrams.head_split(configs.get("HuggingFaceTB/SmolLM2-135M-Instruct"),
                                                     highlight=4, width_in=w),
    "cache_growth": lambda w: diagrams.cache_growth(kqv.Attention(64, 4, 2).new_cache(1, 12), width_in=w),
    "cache_growth, MLA": lambda w: diagrams.cache_growth(diagrams.demo_module("MLA"), width_in=w),
    "compare_designs": lambda w: diagrams.compare_designs(width_in=w),
    "compare_designs, real": lambda w: diagrams.compare_designs(
        [configs.get("meta-llama/Llama-2-7b-hf"), configs.get("deepseek-ai/DeepSeek-V2")], width_in=w),
    "mla_path": lambda w: diagrams.mla_path(configs.get("deepseek-ai/DeepSeek-V2"), width_in=w),
    "mla_path, chapter 7": lambda w: diagrams.mla_path(kqv.MultiHeadLatentAttention(**SMALL_MLA), width_in=w),
}


# --- The visual language ------------------------------------------------------------------------


def test_each_role_has_its_own_okabe_ito_colour():
    roles = ["query", "key", "value", "latent", "rope"]
    colours = [plots.ROLES[r] for r in roles]
    assert len(set(colours)) == len(roles)
    assert set(plots.ROLES.values()) <= set(plots.OKABE_ITO.values())


# --- Legible, on the desktop and on a phone, and the same bytes every time --------------------------


@pytest.mark.parametrize("name", DIAGRAMS)
def test_diagrams_are_legible_and_get_a_phone_layout(name):
    fig = DIAGRAMS[name](plots.COLUMN_IN)
    plots.check_text_sizes(fig)
    assert {t.get_fontsize() for t in fig.findobj(Text) if t.get_text().strip()} == {diagrams.FONT_PT}
    assert overlapping_text(fig) == ([], [])
    drawn = plots.renditions(fig)
    assert drawn.narrow is not None, "no phone rendition: it would scroll sideways"
    narrow_pt = float(re.search(r'<svg[^>]*\swidth="([0-9.]+)pt"', drawn.narrow).group(1))
    assert narrow_pt <= plots.NARROW_IN * 72 + 0.5
    assert drawn.width_px <= plots.COLUMN_IN * 96 + 0.5
    phone = DIAGRAMS[name](plots.NARROW_IN)  # laid out again for the phone, not squeezed
    assert overlapping_text(phone) == ([], [])
    plots.check_text_sizes(phone)
    assert drawn.narrow == plots.to_svg(phone)


@pytest.mark.parametrize("name", ["qkv_projection", "compare_designs", "mla_path"])
def test_two_draws_give_the_same_svg(name):
    first, second = plots.renditions(DIAGRAMS[name](7.0)), plots.renditions(DIAGRAMS[name](7.0))
    assert first.wide == second.wide
    assert first.narrow == second.narrow


def test_width_must_fit_the_column():
    with pytest.raises(ValueError, match=r"width_in must be in \[1.5, 7.6\].*got 9"):
        diagrams.qkv_projection(kqv.Attention(64, 4), width_in=9)


# --- Drawn from the module's shapes ---------------------------------------------------------------


def test_qkv_projection_prints_and_scales_the_modules_widths():
    fig = diagrams.qkv_projection(kqv.Attention(576, 9, 3, 64))
    assert text(fig, "width-x") == "576 numbers"
    assert text(fig, "width-q") == "576 = 9 heads × 64"
    assert text(fig, "width-k") == "192 = 3 heads × 64"
    assert width(fig, "vector-k") / width(fig, "vector-q") == pytest.approx(3 / 9)
    assert width(fig, "vector-x") == pytest.approx(width(fig, "vector-q"))
    mqa = diagrams.qkv_projection(kqv.Attention(576, 9, 1, 64))
    assert text(mqa, "width-k") == "64 numbers"
    assert width(mqa, "vector-v") / width(mqa, "vector-q") == pytest.approx(1 / 9)


def test_a_config_and_a_module_of_the_same_shape_draw_the_same():
    config = configs.get("HuggingFaceTB/SmolLM2-135M-Instruct")
    module = kqv.Attention(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim)
    assert plots.to_svg(diagrams.qkv_projection(config)) == plots.to_svg(diagrams.qkv_projection(module))


def test_diagrams_of_attention_refuse_mla_and_name_it():
    with pytest.raises(ValueError, match=r"qkv_projection draws MHA, GQA or MQA; for deepseek-ai/DeepSeek-V2 "
                                         r"\(MLA\) use mla_path"):
        diagrams.qkv_projection(configs.get("deepseek-ai/DeepSeek-V2"))
    with pytest.raises(TypeError, match="got Linear"):
        diagrams.head_split(torch.nn.Linear(4, 4))


def test_head_split_cuts_the_width_into_heads_and_outlines_one():
    H, H_kv, D = 8, 2, 16
    fig = diagrams.head_split(kqv.Attention(H * D, H, H_kv), highlight=5)
    step = width(fig, "vector-q") / H
    q, k, o = one(fig, "vector-q"), one(fig, "vector-k"), one(fig, "vector-o")
    assert width(fig, "vector-k") == pytest.approx(H_kv * step)
    assert width(fig, "vector-o") == pytest.approx(H * step)
    assert o.get_x() == pytest.approx(q.get_x())  # each head's output under its query
    assert one(fig, "highlight-q").get_x() == pytest.approx(q.get_x() + 5 * step)
    assert one(fig, "highlight-o").get_x() == pytest.approx(o.get_x() + 5 * step)
    assert one(fig, "highlight-k").get_x() == pytest.approx(k.get_x() + (5 // (H // H_kv)) * step)  # its group
    assert len(by_gid(fig, "head-label-")) == H  # room to number every head
    with pytest.raises(ValueError, match=r"highlight must be a head in 0 \.\. 7, got 8"):
        diagrams.head_split(kqv.Attention(H * D, H, H_kv), highlight=8)


def test_cache_growth_draws_one_row_per_token_from_the_cache_itself():
    cache = kqv.Attention(64, 4, 2).new_cache(1, 12)
    fig = diagrams.cache_growth(cache, diagrams.SENTENCE, prompt_len=9)
    rows = {re.match(r"cache-entry-(\d+)-", a.get_gid()).group(1) for a in by_gid(fig, "cache-entry-")}
    assert rows == {str(i) for i in range(10)}
    assert len(by_gid(fig, "cache-slot-")) == 2  # allocated, not yet written
    assert width(fig, "cache-entry-0-K") == pytest.approx(width(fig, "cache-entry-9-V"))
    assert f"({cache.bytes_per_token:,} bytes in float32)" in text(fig, "cache-total")
    assert text(fig, "step-9") == "step 1"
    assert text(fig, "step-prefill") == "prefill"


def test_cache_growth_is_to_scale_across_designs():
    mla = diagrams.demo_module("MLA")  # d_c = 32, d_r = 8
    fig = diagrams.cache_growth(mla, scale_numbers=128)
    assert width(fig, "cache-entry-0-c_kv") / width(fig, "cache-entry-0-k_rope") == pytest.approx(32 / 8)
    mha = diagrams.cache_growth(diagrams.demo_module("MHA"), scale_numbers=128)  # 2 × 4 × 16 = 128 numbers
    assert width(mha, "cache-entry-0-K") / width(fig, "cache-entry-0-c_kv") == pytest.approx(64 / 32)
    with pytest.raises(ValueError, match=r"prompt_len must be in 0 \.\. 10 \(the number of tokens\), got 11"):
        diagrams.cache_growth(mla, prompt_len=11)


@pytest.mark.parametrize("kv_heads", [1, 2, 4, 8])
def test_compare_designs_draws_each_designs_catalogs(kv_heads):
    config = configs.get("article/MHA").replace(name=f"test/{kv_heads}", num_heads=8, num_kv_heads=kv_heads)
    fig = diagrams.compare_designs([config, configs.get("deepseek-ai/DeepSeek-V2-Lite")])
    assert len(by_gid(fig, "query-head-0-")) == 8
    assert len(by_gid(fig, "kv-head-0-")) == kv_heads
    assert len(by_gid(fig, "query-head-1-")) == 16
    assert len(by_gid(fig, "kv-head-1-")) == 0
    assert len(by_gid(fig, "catalog-1-")) == 2  # one latent and one RoPE key, for all 16 heads


def test_compare_designs_bars_are_bytes_per_token_to_scale():
    names = ["article/MHA", "article/MQA", "article/GQA", "deepseek-ai/DeepSeek-V2"]
    designs = [configs.get(n) for n in names]
    fig = diagrams.compare_designs(designs, dtype=torch.float16)
    lengths = [sum(p.get_width() for p in by_gid(fig, f"cache-bar-{i}-")) for i in range(len(designs))]
    per_token = [configs.kv_elements_per_token(c, per_layer=True) for c in designs]
    for length, n in zip(lengths, per_token):
        assert length / lengths[0] == pytest.approx(n / per_token[0], abs=0.003)
    assert text(fig, "cache-note-1") == f"256 numbers = {256 * 2} bytes"
    assert text(fig, "cache-note-3") == "576 numbers = 1,152 bytes"  # DeepSeek-V2: d_c + d_r = 512 + 64
    assert text(fig, "design-title-2").startswith("GQA: 32 query heads")


def test_mla_path_follows_the_latent_widths():
    fig = diagrams.mla_path(kqv.MultiHeadLatentAttention(**SMALL_MLA))
    assert width(fig, "vector-c_kv") / width(fig, "vector-k_rope") == pytest.approx(64 / 16)
    assert width(fig, "vector-q_lat") == pytest.approx(width(fig, "vector-c_kv"))  # W_UK folds q into d_c
    assert width(fig, "vector-k_nope") / width(fig, "vector-c_kv") == pytest.approx(32 / 64)
    wider = diagrams.mla_path(kqv.MultiHeadLatentAttention(**{**SMALL_MLA, "kv_lora_rank": 128}))
    assert width(wider, "vector-c_kv") / width(wider, "vector-k_rope") == pytest.approx(128 / 16)
    no_rope = diagrams.mla_path(configs.get("article/MLA"))  # the article ignores RoPE: d_r = 0
    assert by_gid(no_rope, "vector-k_rope") == []
    with pytest.raises(ValueError, match="mla_path draws multi-head latent attention; article/GQA is GQA"):
        diagrams.mla_path(configs.get("article/GQA"))


# --- Cached decoding, animated --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["MHA", "GQA", "MQA", "MLA"])
def test_decode_weights_equal_one_full_causal_pass(kind):
    module = diagrams.demo_module(kind)
    x = torch.randn(1, 6, module.hidden_size)
    steps = diagrams.decode_weights(module, x)
    full = module.attention_weights(x)[0]                       # (H, T, T)
    assert [tuple(w.shape) for w in steps] == [(4, t + 1) for t in range(6)]
    for t, w in enumerate(steps):
        torch.testing.assert_close(w, full[:, t, : t + 1], atol=1e-5, rtol=1e-4)


def frames_of(html):
    data = json.loads(re.search(r'<script type="application/json" class="kqv-data">(.*?)</script>',
                                html.data, re.S).group(1))
    return data


@pytest.mark.parametrize("kind, entry", [("MHA", "K"), ("GQA", "K"), ("MLA", "c_kv")])
def test_the_animation_has_one_frame_per_token_and_the_cache_grows_by_one_row(kind, entry):
    tokens = ["Three", "parts", "of", "Earth"]
    data = frames_of(diagrams.decode_animation(kind, tokens=tokens))
    assert data["play"] == 0 and data["controls"][0]["labels"] == ["1: Three", "2: parts", "3: of", "4: Earth"]
    assert len(data["frames"]) == len(data["narrow"]) == len(tokens)
    for step, (wide, narrow) in enumerate(zip(data["frames"], data["narrow"]), start=1):
        for svg in (wide, narrow):
            assert len(re.findall(rf'id="cache-entry-\d+-{entry}"', svg)) == step
            assert len(re.findall(r'id="cache-slot-\d+"', svg)) == len(tokens) - step  # preallocated
            assert svg.count('id="new-entry"') == 1
            assert min(plots.svg_font_sizes(svg)) >= plots.MIN_FONT_PT


def test_the_animation_shows_the_modules_heads_and_stays_small():
    html = diagrams.decode_animation("GQA", module=kqv.Attention(96, 6, 3, rope_theta=1e4))
    data = frames_of(html)
    assert len(data["frames"]) == len(diagrams.SENTENCE) <= explore.MAX_FRAMES
    last = data["frames"][-1]
    assert len(re.findall(r'id="query-head-\d+"', last)) == 6
    assert len(re.findall(r'id="reads-\d+"', last)) == 3  # one bracket per K/V head
    assert len(html.data.encode()) < 600_000


def test_demo_modules_are_seeded_without_touching_the_callers_random_numbers():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = diagrams.demo_module("MLA")
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(first.kv_b_proj.weight, diagrams.demo_module("MLA").kv_b_proj.weight)


def test_the_animation_checks_its_arguments():
    with pytest.raises(ValueError, match=r"kind='MHA' but the module is GQA \(4 query heads, 2 K/V heads\)"):
        diagrams.decode_animation("MHA", module=diagrams.demo_module("GQA"))
    with pytest.raises(ValueError, match=r"unknown kind 'XQA'; known: \['GQA', 'MHA', 'MLA', 'MQA'\]"):
        diagrams.decode_animation("XQA")
    with pytest.raises(ValueError, match="inputs must have shape"):
        diagrams.decode_weights(diagrams.demo_module("MHA"), torch.randn(3, 65))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["GQA", "MLA"])
def test_decode_weights_on_any_device_and_dtype(device, dtype, kind):
    module = diagrams.demo_module(kind).to(device=device, dtype=dtype)
    steps = diagrams.decode_weights(module, torch.randn(5, 64))  # inputs follow the module
    for t, w in enumerate(steps):
        assert w.device.type == "cpu" and w.dtype == torch.float32 and w.shape == (4, t + 1)
        torch.testing.assert_close(w.sum(-1), torch.ones(4), atol=2e-2, rtol=0)
