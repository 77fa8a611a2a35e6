"""The explorers that compute in the page, in a real browser: typed into, and checked against kqv.

A page is written here with the three components of kqv.explore (the cache calculator, the
attention viewer of a tiny random kqv Decoder, and the temperature explorer on chapter 2's shelf),
dressed as the site dresses a chapter (the theme's stylesheet and book/_static/book.css, an output
inside ``div.cell_output``), and served on 127.0.0.1. Like tests/test_browser.py: Debian's chromium
driven by Playwright (never ``playwright install``), no request may leave 127.0.0.1, no console
errors. Each test types into an explorer and compares what it shows with kqv's own numbers:

- the calculator, on every preset of kqv.configs with every cache dtype, and on 20 random configs
  (MHA, GQA, MQA and MLA with each dtype), against kv_bytes_per_token and kv_cache_bytes;
- the viewer, on every prompt, layer and head, against kqv.heads.attention_maps;
- the temperature explorer, at several temperatures, against torch.softmax(scores / tau).

Then each explorer in light and dark mode (``<html data-theme="dark">``, as the site), at 390 and
1400 px: nothing wider than the screen, text no smaller than the site's small print and readable on
its background, no light box in dark mode. Set BOOK_SCREENSHOTS=some/folder to save screenshots.
"""

from __future__ import annotations

import functools
import html
import http.server
import os
import random
import re
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from kqv import configs, explore, heads
from test_browser import CHROMIUM, TIMEOUT_MS, _QuietHandler, browser  # noqa: F401 (the same chromium, one fixture)
from test_explore import PROMPTS, tiny_model_and_tokenizer

pytestmark = pytest.mark.book

ROOT = Path(__file__).resolve().parent.parent
DTYPES = list(explore.CACHE_DTYPES)

# Chapter 2's shelf: eight books whose scores give the article's 70 / 25 / 5 at temperature 1.
BOOKS = ["Volcanoes", "A cookbook", "Earth's interior", "Poems", "Railways", "Knitting", "Plate tectonics", "Opera"]
WANTED = torch.tensor([0.03, 0.004, 0.70, 0.004, 0.004, 0.004, 0.25, 0.004], dtype=torch.float64)
SCORES = torch.log(WANTED / WANTED.min())                                    # (N,)
TOPICS = ["geology", "deep Earth", "food", "arts", "travel"]
PAGES = torch.tensor([
    [0.8, 0.4, 0.0, 0.0, 0.2], [0.0, 0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.6, 0.0], [1.0, 0.4, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.3],
], dtype=torch.float64)                                                      # (N, 5)

# A registered model whose head width is not hidden / heads: the calculator must count head_dim.
WIDE_HEADS = configs.ModelConfig("test/wide-heads", num_layers=28, hidden_size=3072, num_heads=16,
                                 num_kv_heads=16, head_dim=256)


def _theme_css() -> str:
    """The site theme's stylesheet (it loads nothing itself), or a stand-in with its dark colours."""
    try:
        import pydata_sphinx_theme

        path = Path(pydata_sphinx_theme.__file__).parent / "theme/pydata_sphinx_theme/static/styles/pydata-sphinx-theme.css"
        return path.read_text(encoding="utf-8")
    except (ImportError, OSError):
        return ("html[data-theme=dark]{color-scheme:dark;--pst-color-text-base:#ced6dd;--pst-color-background:#14181e}"
                "html[data-theme=light]{--pst-color-text-base:#222832;--pst-color-background:#fff}"
                "body{background:var(--pst-color-background);color:var(--pst-color-text-base)}")


def _page(mode: str, outputs: dict[str, str]) -> str:
    cells = "".join(
        f'<section id="{name}"><h2>{html.escape(name)}</h2><div class="cell docutils container">'
        f'<div class="cell_output docutils container"><div class="output text_html">{output}</div></div></div></section>'
        for name, output in outputs.items()
    )
    return (
        f'<!doctype html><html lang="en" data-theme="{mode}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
        f"<style>{_theme_css()}</style><style>{(ROOT / 'book/_static/book.css').read_text(encoding='utf-8')}</style>"
        '</head><body><div class="bd-container"><div class="bd-container__inner bd-page-width"><main class="bd-main">'
        '<div class="bd-content"><div class="bd-article-container"><article class="bd-article">'
        f"<h1>Explorers</h1><p>Text, and <small>small print</small>.</p>{cells}</article></div></div></main></div></div>"
        "</body></html>"
    )


def _notebook_page(mode: str, outputs: dict[str, str]) -> str:
    """The outputs in a notebook as JupyterLab draws it (nbconvert's lab template, light or dark).

    The template's own two scripts from a CDN (require.js, MathJax) are dropped: they are not the
    explorers', and offline they could not load anyway."""
    import nbformat
    from nbconvert import HTMLExporter

    notebook = nbformat.v4.new_notebook()
    for name, output in outputs.items():
        cell = nbformat.v4.new_code_cell(f"explore.{name}(...)")
        cell.outputs = [nbformat.v4.new_output("display_data", data={"text/html": output, "text/plain": name})]
        notebook.cells.append(cell)
    body, _ = HTMLExporter(template_name="lab", theme=mode).from_notebook_node(notebook)
    body, dropped = re.subn(r'<script[^>]*\ssrc="https://[^"]*"[^>]*>\s*</script>', "", body)
    assert dropped == 2, f"nbconvert's template changed: {dropped} scripts from a CDN"
    return body.replace("</head>", '<link rel="icon" href="data:,"></head>', 1)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer()


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, tiny):
    model, tokenizer = tiny
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(configs.REGISTRY, WIDE_HEADS.name, WIDE_HEADS)
        calculator = explore.cache_calculator("meta-llama/Llama-2-7b-hf", context_len=4096, budget_gib=80)
    outputs = {
        "temperature": explore.temperature(SCORES, [f"{i} {b}" for i, b in enumerate(BOOKS, 1)], PAGES, TOPICS,
                                           highlight=2).data,
        "calculator": calculator.data,
        "viewer": explore.attention_viewer(model, tokenizer, PROMPTS, random_tokens=6, top=3).data,
    }
    folder = tmp_path_factory.mktemp("explorers")
    for mode in ("light", "dark"):
        (folder / f"{mode}.html").write_text(_page(mode, outputs), encoding="utf-8")
        (folder / f"notebook-{mode}.html").write_text(_notebook_page(mode, outputs), encoding="utf-8")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def open_page(browser, base_url):
    """open_page(mode, width) -> page; after the test, no request left 127.0.0.1 and nothing failed."""
    opened = []

    def open_(mode: str = "light", width: int = 1400, page_name: str | None = None):
        context = browser.new_context(viewport={"width": width, "height": 900})
        problems: list[str] = []

        def route(route):
            parts = urlsplit(route.request.url)
            if parts.scheme in ("data", "blob") or parts.hostname == "127.0.0.1":
                route.continue_()
            else:
                problems.append(f"request left 127.0.0.1: {route.request.url}")
                route.abort()

        context.route("**/*", route)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
        page.goto(f"{base_url}/{page_name or mode}.html", wait_until="load")
        page.wait_for_function("() => document.querySelectorAll('.kqv-explorer[data-kqv-mounted=\"1\"]').length === 3")
        opened.append((context, problems))
        return page

    yield open_
    for context, problems in opened:
        context.close()
        assert not problems, problems


def dataset(locator) -> dict[str, str]:
    return locator.evaluate("e => Object.assign({}, e.dataset)")


# --- The cache calculator ----------------------------------------------------------------------------


def expected_numbers(config: configs.ModelConfig, context: int, batch: int, dtype: str, budget_gib: float) -> dict[str, str]:
    """What the page must show, from kqv.configs (the page's data-* attributes, as strings)."""
    per_sequence = configs.kv_cache_bytes(config, context, 1, dtype)
    budget = int(budget_gib * 2**30)
    return {
        "elementsPerLayer": str(configs.kv_elements_per_token(config, per_layer=True)),
        "elementsPerToken": str(configs.kv_elements_per_token(config)),
        "bytesPerToken": str(configs.kv_bytes_per_token(config, dtype)),
        "cacheBytes": str(configs.kv_cache_bytes(config, context, batch, dtype)),
        "sequences": str(budget // per_sequence),
        "maxContext": str(budget // configs.kv_bytes_per_token(config, dtype)),
        "design": config.attention,
        "error": "",
    }


def check_calculator(root, config, context, batch, dtype, budget_gib, budget_text):
    shown = dataset(root)
    expected = expected_numbers(config, context, batch, dtype, budget_gib)
    assert {k: shown.get(k) for k in expected} == expected, f"{config.name}, {dtype}"
    per_token, cache = int(expected["bytesPerToken"]), int(expected["cacheBytes"])
    text = {k: root.locator(f".kqv-out-{k}").inner_text() for k in ("counted", "per-token", "cache", "budget")}
    assert text["counted"] == explore._counted(config)
    assert text["per-token"].startswith(f"{explore.format_count(per_token)} bytes ({explore.format_bytes(per_token)})")
    assert text["cache"].startswith(f"{explore.format_count(cache)} bytes ({explore.format_bytes(cache)})")
    sequences = int(expected["sequences"])
    assert text["budget"].startswith(f"{explore.format_count(sequences)} sequence")
    assert f"fit in {budget_text} GiB" in text["budget"]


def test_calculator_equals_kqv_configs_on_every_preset(open_page):
    page = open_page()
    root = page.locator("#calculator .kqv-explorer")
    names = [WIDE_HEADS.name, *configs.names()]
    shown = root.locator("select.kqv-preset option").all_inner_texts()
    assert sorted(shown[1:]) == sorted(names), "every registered model is a preset"
    rng = random.Random(0)
    for name in names:
        config = WIDE_HEADS if name == WIDE_HEADS.name else configs.get(name)
        root.locator("select.kqv-preset").select_option(label=name)
        for dtype in DTYPES:
            context, batch, budget = rng.choice([1, 4096, 32768, 131072]), rng.randint(1, 64), rng.choice(["80", "24", "0.5"])
            root.locator("select.kqv-dtype").select_option(dtype)
            root.locator("input[data-field=context]").fill(str(context))
            root.locator("input[data-field=batch]").fill(str(batch))
            root.locator("input[data-field=budget]").fill(budget)
            check_calculator(root, config, context, batch, dtype, float(budget), budget)
        note = root.locator(".kqv-preset-note").inner_text()
        differs = not config.is_mla and config.num_heads * config.head_dim != config.hidden_size
        assert ("is not hidden / heads" in note) == differs, f"{name}: {note!r}"
        assert root.locator("select.kqv-preset").input_value() != "", "a preset still selected after typing the context"


def random_configs(n: int = 20, seed: int = 14):
    """n configs: MHA, GQA, MQA and MLA, each with every cache dtype (4 x 5 = 20)."""
    rng = random.Random(seed)
    for i in range(n):
        design, dtype = ["MHA", "GQA", "MQA", "MLA"][i % 4], DTYPES[(i // 4) % len(DTYPES)]
        layers, head_dim = rng.randint(1, 128), rng.choice([32, 64, 80, 96, 128, 256, rng.randint(1, 300)])
        if design == "MLA":
            heads_ = rng.randint(1, 128)
            config = configs.ModelConfig(f"random {i}", num_layers=layers, hidden_size=4096, num_heads=heads_,
                                         num_kv_heads=heads_, head_dim=128, kv_lora_rank=rng.randint(16, 1024),
                                         qk_nope_head_dim=128, qk_rope_head_dim=rng.choice([0, 32, 64, rng.randint(1, 128)]),
                                         v_head_dim=128)
        else:
            kv = {"MHA": rng.randint(1, 64), "GQA": rng.randint(2, 16), "MQA": 1}[design]
            heads_ = kv * ({"MHA": 1, "GQA": rng.randint(2, 8), "MQA": rng.randint(2, 64)}[design])
            config = configs.ModelConfig(f"random {i}", num_layers=layers, hidden_size=heads_ * head_dim,
                                         num_heads=heads_, num_kv_heads=kv, head_dim=head_dim)
        assert config.attention == design
        yield config, dtype, rng.randint(1, 10**6), rng.randint(1, 256), round(rng.uniform(0.5, 200), 2)


def test_calculator_equals_kqv_configs_on_random_configs(open_page):
    page = open_page()
    root = page.locator("#calculator .kqv-explorer")
    field = lambda key: root.locator(f"input[data-field={key}]")  # noqa: E731
    for i, (config, dtype, context, batch, budget) in enumerate(random_configs()):
        root.locator("select.kqv-layout").select_option("mla" if config.is_mla else "kv")
        typed = {"layers": config.num_layers, "context": context, "batch": batch, "budget": budget}
        if config.is_mla:
            typed |= {"d_c": config.kv_lora_rank, "d_r": config.qk_rope_head_dim}
        else:
            typed |= {"heads": config.num_heads, "kv_heads": config.num_kv_heads, "head_dim": config.head_dim}
        for key, value in typed.items():
            if i % 5 == 0:  # a reader types key by key, with thousands separators
                field(key).fill("")
                field(key).press_sequentially(f"{value:,}")
            else:
                field(key).fill(str(value))
        root.locator("select.kqv-dtype").select_option(dtype)
        check_calculator(root, config, context, batch, dtype, budget, f"{budget:,}" if i % 5 == 0 else str(budget))
        assert root.locator("select.kqv-preset").input_value() == "", "typed numbers are the reader's own"


def test_calculator_errors_name_the_values(open_page):
    page = open_page()
    root = page.locator("#calculator .kqv-explorer")
    field = lambda key: root.locator(f"input[data-field={key}]")  # noqa: E731
    error = root.locator(".kqv-error")
    root.locator("select.kqv-preset").select_option(label="meta-llama/Meta-Llama-3-8B")
    cases = [
        ("kv_heads", "6", "query heads H (32) must be divisible by KV heads H_kv (6)"),
        ("kv_heads", "40", "query heads H (32) must be divisible by KV heads H_kv (40)"),
        ("layers", "-3", "layers must be a whole number from 1 to 10,000, got \u201C-3\u201D"),
        ("head_dim", "0", "head width D must be from 1 to 100,000, got 0"),
        ("context", "0", "context (tokens) must be from 1 to 1,000,000,000,000, got 0"),
        ("batch", "two", "batch (sequences) must be a whole number from 1 to 1,000,000,000, got \u201Ctwo\u201D"),
        ("budget", "-5", "memory budget (GiB) must be a positive number up to 1,000,000,000, got \u201C-5\u201D"),
    ]
    for key, bad, message in cases:
        good = field(key).input_value()
        field(key).fill(bad)
        assert message in error.inner_text()
        assert dataset(root).get("bytesPerToken") is None, "no numbers while the input is wrong"
        assert field(key).get_attribute("aria-invalid") == "true"
        field(key).fill(good)
        assert error.inner_text() == "" and dataset(root)["error"] == ""
    check_calculator(root, configs.get("meta-llama/Meta-Llama-3-8B"), 4096, 1, "bfloat16", 80, "80")


# --- The attention viewer ----------------------------------------------------------------------------


def choose(root, prompt: int, layer: int, head: int) -> None:
    root.locator("select[data-control=prompt]").select_option(str(prompt))
    root.locator("input[data-control=layer]").fill(str(layer))
    root.locator("select[data-control=head]").select_option(str(head))


def test_viewer_shows_the_maps_of_kqv_heads(open_page, tiny):
    model, tokenizer = tiny
    page = open_page()
    root = page.locator("#viewer .kqv-explorer")
    ids = [torch.tensor([tokenizer.encode(text).ids]) for text in PROMPTS.values()]
    ids.append(heads.repeated_random_tokens(6, model.embed_tokens.num_embeddings))
    L, H = model.config.num_layers, model.config.num_heads
    for p, prompt_ids in enumerate(ids):
        maps = heads.attention_maps(model, prompt_ids)                       # (L, H, T, T)
        T = prompt_ids.shape[1]
        for layer in range(L):
            for head in range(H):
                choose(root, p, layer, head)
                assert {k: dataset(root)[k] for k in ("prompt", "layer", "head")} == \
                    {"prompt": str(p), "layer": str(layer), "head": str(head)}
                cells = root.locator(".kqv-map rect[data-q]").evaluate_all(
                    "rs => rs.map(r => [+r.dataset.q, +r.dataset.k, +r.dataset.w])")
                assert len(cells) == T * (T + 1) // 2, "one cell per query and visible key, none above the diagonal"
                shown = torch.zeros(T, T)
                for t, s, w in cells:
                    shown[t, s] = w
                assert (shown - maps[layer, head]).abs().max() <= 0.5 / 255 + 1e-6, f"prompt {p}, layer {layer}, head {head}"
        labels = root.locator(".kqv-map svg > text").all_text_contents()
        assert len(labels) == 2 * T and labels[-2].strip() == heads.token_strings(tokenizer, prompt_ids)[-1].strip()


def test_viewer_marks_the_kinds_of_head_and_answers_clicks(open_page, tiny):
    model, tokenizer = tiny
    page = open_page()
    root = page.locator("#viewer .kqv-explorer")
    scores = heads.head_scores(model, tokenizer, PROMPTS["running sentence"])
    buttons = root.locator(".kqv-head-button")
    assert buttons.count() == 3 * len(scores)
    for i in range(buttons.count()):
        button = buttons.nth(i)
        button.click()
        layer, head = int(button.get_attribute("data-layer")), int(button.get_attribute("data-head"))
        assert (dataset(root)["layer"], dataset(root)["head"]) == (str(layer), str(head))
        assert button.get_attribute("aria-pressed") == "true"
        badges = set(root.locator(".kqv-badge").evaluate_all("bs => bs.map(b => b.dataset.kind)"))
        tops = {kind for kind, s in scores.items() if (layer, head) in
                [(r["layer"], r["head"]) for r in heads.rank_heads(s, top=3)]}
        above = {kind for kind, s in scores.items() if s[layer, head] > 0.5}
        assert badges == tops | above
    # A click on a cell reads its weight.
    choose(root, 1, 2, 3)
    maps = heads.attention_maps(model, torch.tensor([tokenizer.encode(PROMPTS["a sentence, twice"]).ids]))
    root.locator(".kqv-map rect[data-q='9'][data-k='4']").click()
    readout = root.locator(".kqv-readout")
    assert (readout.get_attribute("data-q"), readout.get_attribute("data-k")) == ("9", "4")
    assert abs(float(readout.get_attribute("data-w")) - maps[2, 3, 9, 4].item()) <= 0.5 / 255 + 1e-6
    assert f"weight {float(readout.get_attribute('data-w')):.3f}" in readout.inner_text()


# --- The temperature explorer ------------------------------------------------------------------------


def shown_weights(root) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    w = root.locator(".kqv-weights .kqv-bar-row").evaluate_all("rs => rs.map(r => +r.dataset.w)")
    a = root.locator(".kqv-answer .kqv-bar-row").evaluate_all("rs => rs.map(r => +r.dataset.a)")
    text = root.locator(".kqv-weights .kqv-bar-value").all_inner_texts()
    return torch.tensor(w, dtype=torch.float64), torch.tensor(a, dtype=torch.float64), text


def test_temperature_is_torch_softmax_of_the_scores(open_page):
    page = open_page()
    root = page.locator("#temperature .kqv-explorer")
    typed = root.locator("input.kqv-tau")
    for text in ["1", "0.25", "0.1", "3.7", "50", "1e-3", "0.6180"]:
        typed.fill(text)
        tau = float(text)
        assert float(dataset(root)["tau"]) == tau
        w, a, labels = shown_weights(root)
        assert torch.allclose(w, torch.softmax(SCORES / tau, dim=-1), rtol=0, atol=1e-12)
        assert torch.allclose(w.float(), torch.softmax(SCORES.float() / tau, dim=-1), rtol=0, atol=1e-6)
        assert torch.allclose(a, w @ PAGES, rtol=0, atol=1e-12)               # the blended answer
        assert labels == [f"{explore._fixed(100 * x, 1)}%" for x in w.tolist()]
    typed.fill("1")
    assert shown_weights(root)[2][2] == "70.0%" and shown_weights(root)[2][6] == "25.0%"  # the article's shelf
    root.locator("input[type=range]").fill("-1")                             # the slider: 10^-1
    assert typed.input_value() == "0.1" and float(dataset(root)["tau"]) == 0.1
    assert torch.allclose(shown_weights(root)[0], torch.softmax(SCORES / 0.1, dim=-1), rtol=0, atol=1e-12)
    typed.fill("-2")
    assert "the temperature must be a positive number, got \u201C-2\u201D" in root.locator(".kqv-error").inner_text()
    typed.fill("2")
    assert root.locator(".kqv-error").inner_text() == ""


# --- Any screen, either theme ------------------------------------------------------------------------

LOOKS = """root => {
  // Colours: "rgb(r, g, b)" or "rgba(r, g, b, a)" -> [r, g, b, a]; WCAG's relative luminance.
  const rgba = s => {
    const m = (s.match(/[\\d.]+/g) || []).map(Number);
    return m.length === 3 ? m.concat(1) : m.length ? m : [0, 0, 0, 0];
  };
  const lin = c => { c /= 255; return c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4); };
  const lum = c => 0.2126 * lin(c[0]) + 0.7152 * lin(c[1]) + 0.0722 * lin(c[2]);
  // What a text is drawn on: the first ancestor with a background that is not (nearly) transparent.
  const background = e => {
    for (let n = e; n; n = n.parentElement) {
      const c = rgba(getComputedStyle(n).backgroundColor);
      if (c[3] > 0.5) return c;
    }
    return [255, 255, 255, 1];
  };
  const opacity = e => {
    let o = 1;
    for (let n = e; n && n !== document.body; n = n.parentElement) o *= +getComputedStyle(n).opacity;
    return o;
  };
  const name = e => e.tagName.toLowerCase() + '.' + (e.getAttribute('class') || '').split(' ').join('.') +
    ' "' + (e.textContent || e.value || '').trim().slice(0, 30) + '"';
  const shown = e => {
    const r = e.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && getComputedStyle(e).visibility !== 'hidden';
  };
  const hasText = e => e.tagName === 'text' ||
    (['INPUT', 'SELECT', 'BUTTON'].includes(e.tagName) && !['range', 'checkbox', 'radio'].includes(e.type)) ||
    Array.from(e.childNodes).some(n => n.nodeType === 3 && n.textContent.trim());
  const all = Array.from(root.querySelectorAll('*')).filter(shown);
  const out = {texts: [], wide: [], light: []};
  for (const e of all.filter(hasText)) {
    const style = getComputedStyle(e), bg = background(e), o = opacity(e);
    const fg = rgba(e.tagName === 'text' ? style.fill : style.color).slice(0, 3).map((c, i) => o * c + (1 - o) * bg[i]);
    const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
    out.texts.push({name: name(e), px: parseFloat(style.fontSize), contrast: (a + 0.05) / (b + 0.05)});
  }
  for (const e of all) {  // a figure may scroll sideways in its own box; nothing else may overflow
    const r = e.getBoundingClientRect();
    if (!e.closest('.kqv-figure') && (r.right > window.innerWidth + 0.5 || r.left < -0.5)) out.wide.push(name(e));
  }
  // Light boxes: the explorer, its ancestors and its parts, graphics (bars, swatches, the map) aside.
  const graphics = '.kqv-bar-fill, .kqv-meter-fill, .kqv-chip, .kqv-gradient, svg, svg *';
  const boxes = all.filter(e => !e.matches(graphics));
  for (let n = root; n; n = n.parentElement) boxes.push(n);
  out.light = boxes.filter(e => { const c = rgba(getComputedStyle(e).backgroundColor); return c[3] > 0.5 && lum(c) > 0.4; })
    .map(name);
  return out;
}"""


def _small_print_px(page) -> float:
    return page.evaluate(
        """() => { const s = document.createElement('small'); s.textContent = 'x';
                   document.querySelector('article').appendChild(s);
                   const px = parseFloat(getComputedStyle(s).fontSize); s.remove(); return px; }"""
    )


@pytest.mark.parametrize("width", [390, 1400])
@pytest.mark.parametrize("mode", ["light", "dark"])
def test_explorers_fit_the_screen_and_read_well_in_both_themes(open_page, mode, width):
    page = open_page(mode, width)
    assert page.evaluate("() => document.documentElement.dataset.theme") == mode
    small = _small_print_px(page)
    wide = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert wide <= 1, f"{mode}, {width} px: the page is {wide} px wider than the screen"
    folder = os.environ.get("BOOK_SCREENSHOTS")
    for name in ("temperature", "calculator", "viewer"):
        root = page.locator(f"#{name} .kqv-explorer")
        looks = root.evaluate(LOOKS)
        assert looks["texts"], f"{name}: no text found"
        assert not looks["wide"], f"{name} at {width} px, {mode}: wider than the screen: {looks['wide'][:5]}"
        tiny_text = [t for t in looks["texts"] if t["px"] < small - 0.05]
        assert not tiny_text, f"{name}: text smaller than the small print ({small} px): {tiny_text[:5]}"
        faint = [t for t in looks["texts"] if t["contrast"] < 4.5]
        assert not faint, f"{name}, {mode}: text below a 4.5:1 contrast with its background: {faint[:5]}"
        if mode == "dark":
            assert not looks["light"], f"{name}: light boxes in dark mode: {looks['light'][:5]}"
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            root.screenshot(path=str(Path(folder) / f"explorer-{name}__{width}__{mode}.png"))


@pytest.mark.parametrize("mode", ["light", "dark"])
def test_explorers_work_in_a_notebook_page(open_page, mode):
    """Outside the site (JupyterLab's look, no data-theme): each explorer mounts, answers and reads well."""
    page = open_page(mode, 1000, page_name=f"notebook-{mode}")
    assert page.evaluate("() => document.documentElement.hasAttribute('data-theme')") is False
    roots = page.locator(".kqv-explorer")
    temperature, calculator, viewer = (roots.nth(i) for i in range(3))
    assert [r.get_attribute("data-kqv") for r in (temperature, calculator, viewer)] == \
        ["temperature", "cache_calculator", "attention_viewer"]
    temperature.locator("input.kqv-tau").fill("2")
    w = torch.tensor(temperature.locator(".kqv-weights .kqv-bar-row").evaluate_all("rs => rs.map(r => +r.dataset.w)"),
                     dtype=torch.float64)
    assert torch.allclose(w, torch.softmax(SCORES / 2, dim=-1), rtol=0, atol=1e-12)
    calculator.locator("select.kqv-preset").select_option(label="deepseek-ai/DeepSeek-V3")
    check_calculator(calculator, configs.get("deepseek-ai/DeepSeek-V3"), 4096, 1, "bfloat16", 80, "80")
    viewer.locator("select[data-control=head]").select_option("2")
    assert dataset(viewer)["head"] == "2" and viewer.locator(".kqv-map rect[data-q]").count() > 0
    for root in (temperature, calculator, viewer):
        looks = root.evaluate(LOOKS)
        faint = [t for t in looks["texts"] if t["contrast"] < 4.5]
        assert not faint, f"{mode} notebook: text below a 4.5:1 contrast with its background: {faint[:5]}"
        assert not looks["wide"], f"{mode} notebook: wider than the screen: {looks['wide'][:5]}"
    if os.environ.get("BOOK_SCREENSHOTS"):
        Path(os.environ["BOOK_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(os.environ["BOOK_SCREENSHOTS"]) / f"explorers-notebook__{mode}.png"), full_page=True)
