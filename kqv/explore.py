"""Explorers that run in the page: no kernel, offline, nothing loaded from a CDN.

An explorer is one HTML output: a small JavaScript component (``kqv/web/*.js``,
inlined) and its data. The same output works on the book's site, in Colab, in
JupyterLab and in VS Code, because it needs nothing but a browser. Where a front
end does not run the script (an untrusted notebook in JupyterLab), the output
still shows its first picture, and re-running the cell brings it to life.

:func:`frames` is the general one: Python draws a picture for every combination
of a few controls' options in advance, and the page switches between them. Other
components compute in the browser, from data that Python packs once:

- :func:`cache_calculator`: the KV-cache calculator of :mod:`kqv.configs`, typed
  into (chapter 4);
- :func:`attention_viewer`: a real model's attention maps, any prompt, layer and
  head, with the kinds of head of :mod:`kqv.heads` marked (chapter 3);
- :func:`temperature`: the softmax of a shelf's scores at any temperature, and the
  blended answer (chapter 2).

Pictures are SVG, drawn by :mod:`kqv.plots`: sharp at any size, with real text.
Each comes in two renditions, one for the column of a desktop page and one for a
phone, and the component shows the one that fits. On the site the pictures
follow the page's light or dark mode; in a notebook they keep a white paper.

Book: every chapter's "Explore" sections.
"""

from __future__ import annotations

import base64
import decimal
import hashlib
import html
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from . import configs
from . import heads

if TYPE_CHECKING:
    from IPython.display import HTML
    from matplotlib.figure import Figure

__all__ = [
    "Slider",
    "Choice",
    "Toggle",
    "frames",
    "component",
    "MAX_FRAMES",
    "cache_calculator",
    "attention_viewer",
    "temperature",
    "format_count",
    "format_bytes",
    "CACHE_DTYPES",
    "HEAD_KINDS",
    "unpack_maps",
]

#: The most pictures one :func:`frames` explorer may hold (each is stored in the page).
MAX_FRAMES = 96


@dataclass
class Slider:
    """A slider over ``options``; the value it is at is shown beside it.

    Args:
        label: what the slider sets.
        options: the values, in order (numbers or strings).
        value: the starting value (default: the first option).
        format: how to show a value, e.g. ``"{:.2f}"`` or ``"d = {}"``.
    """

    label: str
    options: Sequence[Any]
    value: Any = None
    format: str = "{}"
    kind: str = field(default="slider", init=False)

    def labels(self) -> list[str]:
        return [self.format.format(o) for o in self.options]


@dataclass
class Choice:
    """A drop-down list over ``options`` (shown with ``labels`` if given)."""

    label: str
    options: Sequence[Any]
    value: Any = None
    names: Sequence[str] | None = None
    kind: str = field(default="choice", init=False)

    def labels(self) -> list[str]:
        return [str(n) for n in (self.names or self.options)]


@dataclass
class Toggle:
    """A checkbox: the value is False or True."""

    label: str
    value: bool = False
    kind: str = field(default="toggle", init=False)

    @property
    def options(self) -> list[bool]:
        return [False, True]

    def labels(self) -> list[str]:
        return ["off", "on"]


Control = Slider | Choice | Toggle  # any of the three


def _start(control: Slider | Choice | Toggle) -> int:
    options = list(control.options)
    if not options:
        raise ValueError(f"control {control.label!r} has no options")
    if control.value is None:
        return 0
    if control.value not in options:
        raise ValueError(f"control {control.label!r}: value {control.value!r} is not one of its options {options}")
    return options.index(control.value)


def _asset(name: str) -> str:
    return resources.files("kqv").joinpath("web", name).read_text(encoding="utf-8")


def _json_for_script(data: Any) -> str:
    """JSON that can sit inside a <script> element: no "</" that would end it."""
    return json.dumps(data, separators=(",", ":"), sort_keys=True).replace("</", "<\\/")


def component(kind: str, data: dict, *, static: str, scripts: Sequence[str] = ()) -> HTML:
    """One explorer as an HTML output: ``kind`` names the JavaScript component.

    Args:
        kind: the component's name in ``kqvExplore.components`` (``"frames"``, ...).
        data: what the component needs, as JSON.
        static: HTML shown where scripts do not run (and replaced where they do).
        scripts: further files of ``kqv/web`` that define the component.

    The element's id is derived from its content, so regenerating a notebook
    rewrites the same bytes.
    """
    from IPython.display import HTML

    payload = _json_for_script(data)
    ident = "kqvx-" + hashlib.sha1((kind + payload).encode()).hexdigest()[:16]
    code = "\n".join([_asset("explore.js"), *(_asset(s) for s in scripts)])
    page = (
        f'<div class="kqv-explorer" id="{ident}" data-kqv="{kind}">'
        f"<style>{_asset('explore.css')}</style>"
        f"{static}"
        f'<script type="application/json" class="kqv-data">{payload}</script>'
        f"<script>{code}\nkqvExplore.mount(document.getElementById({json.dumps(ident)}));</script>"
        f"</div>"
    )
    return HTML(page)


def _data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def frames(
    draw: Callable[..., Figure],
    *,
    alt: str | Callable[..., str],
    controls: dict[str, Slider | Choice | Toggle],
    note: str | None = None,
    play: str | None = None,
    interval: int = 900,
    narrow: bool = True,
) -> HTML:
    """Controls over pictures drawn in advance: works on a page with no kernel.

    ``draw(**values)`` draws one picture for one value of each control and
    returns the matplotlib figure (closed here), or a :class:`kqv.plots.Rendition`. It is called once for every
    combination of the controls' options, at most :data:`MAX_FRAMES` times.

    Args:
        draw: the drawing function, one keyword per control.
        alt: the pictures' alt text, or a function of the same keywords giving
            each picture its own.
        controls: name -> :class:`Slider`, :class:`Choice` or :class:`Toggle`.
        note: a line under the picture (for example where the live version runs).
        play: the name of a slider that a play button steps through (an animation).
        interval: milliseconds between steps when playing.
        narrow: also draw each picture for a phone's column (see :func:`kqv.plots.to_svg`).

    Returns:
        HTML to display as the last line of a cell.
    """
    from . import plots

    if not controls:
        raise ValueError("an explorer needs at least one control")
    if play is not None and play not in controls:
        raise ValueError(f"play={play!r} is not one of the controls {sorted(controls)}")
    names = list(controls)
    sizes = [len(list(c.options)) for c in controls.values()]
    count = 1
    for n in sizes:
        count *= n
    if count > MAX_FRAMES:
        raise ValueError(
            f"{count} pictures ({' x '.join(map(str, sizes))} options) is more than MAX_FRAMES={MAX_FRAMES}; "
            "offer fewer options"
        )
    wide, small, alts = [], [], []
    width = None
    for combo in itertools.product(*(list(c.options) for c in controls.values())):
        values = dict(zip(names, combo))
        drawn = draw(**values)
        rendition = drawn if isinstance(drawn, plots.Rendition) else plots.renditions(drawn, narrow=narrow)
        width = width or rendition.width_px
        wide.append(rendition.wide)
        if rendition.narrow is not None:
            small.append(rendition.narrow)
        alts.append(alt(**values) if callable(alt) else alt)
    initial = [_start(c) for c in controls.values()]
    first = 0
    for i, n in zip(initial, sizes):
        first = first * n + i
    data = {
        "controls": [{"label": c.label, "kind": c.kind, "labels": c.labels()} for c in controls.values()],
        "frames": wide,
        "narrow": small if len(small) == len(wide) else None,
        "alt": alts if len(set(alts)) > 1 else alts[0],
        "initial": initial,
        "play": names.index(play) if play is not None else None,
        "interval": interval,
        "width": width,
    }
    static = (
        f'<div class="kqv-figure"><img src="{_data_uri(wide[first])}" '
        f'alt="{html.escape(alts[first], quote=True)}" style="max-width:100%"></div>'
        '<p class="kqv-note kqv-static-only">The controls appear where JavaScript runs: on the book\'s '
        "site, in Colab, or after re-running this cell.</p>"
    )
    if note:
        static += f'<p class="kqv-note">{html.escape(note)}</p>'
    return component("frames", data, static=static)


# --- Numbers as a reader reads them ------------------------------------------------------------------
#
# kqv/web/numbers.js writes the same strings in the page: thousands separators, binary units named
# (1 KiB = 1,024 bytes), ties rounded up as JavaScript's toFixed rounds them.

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_GIB = 2**30


def _fixed(x: float, digits: int) -> str:
    """``x`` with ``digits`` decimals and thousands separators; a tie rounds up, as in JavaScript."""
    exact = decimal.Decimal(x)  # the float's exact value, as toFixed sees it
    return f"{exact.quantize(decimal.Decimal(1).scaleb(-digits), rounding=decimal.ROUND_HALF_UP):,}"


def format_count(n: int) -> str:
    """A whole number with thousands separators: ``1048576`` -> ``"1,048,576"``."""
    return f"{int(n):,}"


def format_bytes(n: int) -> str:
    """A size in the largest binary unit that keeps it at least 1: ``"512 bytes"``, ``"128 KiB"``,
    ``"1.50 MiB"``, ``"12.5 GiB"`` (about three significant digits from 1 KiB on)."""
    n = int(n)
    if n < 0:
        raise ValueError(f"a size in bytes cannot be negative, got {n}")
    if n < 1024:
        return f"{n:,} byte" + ("" if n == 1 else "s")
    value, k = n / 1024, 0
    while value >= 1024 and k < len(_UNITS) - 1:
        value, k = value / 1024, k + 1
    digits = 2 if value < 9.995 else 1 if value < 99.95 else 0  # what rounds to 10.0 gets one decimal
    return f"{_fixed(value, digits)} {_UNITS[k]}"


def _static_note(what: str) -> str:
    return (
        f'<p class="kqv-note kqv-static-only">{what} appear where JavaScript runs: on the book\'s site, '
        "in Colab, or after re-running this cell.</p>"
    )


# --- The KV-cache calculator (chapter 4) -------------------------------------------------------------

#: The cache dtypes the calculator offers, by torch name, with what the reader sees.
CACHE_DTYPES: dict[str, str] = {
    "float32": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "float8_e4m3fn": "fp8 (float8_e4m3fn)",
    "int8": "int8",
}


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in CACHE_DTYPES:
        raise ValueError(f"cache dtype {name!r} is not one of {list(CACHE_DTYPES)}")
    return name


def _counted(config: configs.ModelConfig) -> str:
    """What the cache keeps per token and layer, in words (the page writes the same)."""
    n = configs.kv_elements_per_token(config, per_layer=True)
    if config.is_mla:
        # The decoupled RoPE key k_R is cached beside the latent, one for all heads (DeepSeek-V2,
        # arXiv 2405.04434, section 2.1; its Table 1 counts (d_c + d_h^R) l elements per token).
        # Counting the latent alone leaves it out.
        return (
            f"per token and layer: latent {format_count(config.kv_lora_rank)} + RoPE key "
            f"{format_count(config.qk_rope_head_dim)} = {format_count(n)} numbers "
            "(MLA caches no per-head keys or values)"
        )
    noun = "KV head" if config.num_kv_heads == 1 else "KV heads"
    return (
        f"per token and layer: K and V of {format_count(config.num_kv_heads)} {noun} of width "
        f"{format_count(config.head_dim)}: 2 × {format_count(config.num_kv_heads)} × "
        f"{format_count(config.head_dim)} = {format_count(n)} numbers"
    )


def _cache_numbers(
    config: configs.ModelConfig, context_len: int, batch_size: int, dtype: str, budget_bytes: int
) -> dict[str, int]:
    """Everything the calculator shows, computed by :mod:`kqv.configs`."""
    per_token = configs.kv_bytes_per_token(config, dtype)
    return {
        "elements_per_layer": configs.kv_elements_per_token(config, per_layer=True),
        "elements_per_token": configs.kv_elements_per_token(config),
        "bytes_per_token": per_token,
        "cache_bytes": configs.kv_cache_bytes(config, context_len, batch_size, dtype),
        # How many sequences of context_len tokens fit the budget, and the longest one sequence that does.
        "sequences": budget_bytes // configs.kv_cache_bytes(config, context_len, 1, dtype),
        "max_context": budget_bytes // per_token,
    }


def _preset(config: configs.ModelConfig) -> dict[str, Any]:
    return {
        "name": config.name,
        "attention": config.attention,
        "layers": config.num_layers,
        "hidden": config.hidden_size,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "d_c": config.kv_lora_rank,
        "d_r": config.qk_rope_head_dim,
        "source": config.source,
    }


def cache_calculator(
    preset: str | configs.ModelConfig = "meta-llama/Llama-2-7b-hf",
    *,
    context_len: int = 4096,
    batch_size: int = 1,
    dtype: torch.dtype | str = "bfloat16",
    budget_gib: float = 80.0,
) -> HTML:
    """A KV-cache calculator that the reader types into: the arithmetic of :mod:`kqv.configs`, in the page.

    The reader picks a preset (every registered model, :func:`kqv.configs.names`, read now) or types
    layers, query heads, KV heads and head width (MHA, GQA, MQA), or MLA's latent and RoPE widths;
    then the context length, the batch, the cache dtype and a memory budget. The page shows the
    bytes per token, the whole cache and how many sequences fit the budget, and says what it
    counts (for MLA: the latent *and* the RoPE key, per layer). Its numbers equal
    :func:`kqv.configs.kv_bytes_per_token` and :func:`kqv.configs.kv_cache_bytes` exactly.

    Args:
        preset: the registry name (or a config) shown first.
        context_len: tokens per sequence.
        batch_size: sequences.
        dtype: of the cache: one of :data:`CACHE_DTYPES` (fp8 and int8 count one byte per number;
            the scales a quantized cache also keeps are not counted).
        budget_gib: the memory budget, in GiB (2**30 bytes).

    Book: chapter 4 (the calculator), chapters 6 to 9 (the comparisons).
    """
    config = configs.get(preset) if isinstance(preset, str) else preset
    for name, value in (("context_len", context_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(budget_gib, (int, float)) and math.isfinite(budget_gib) and budget_gib > 0):
        raise ValueError(f"budget_gib must be a positive number, got {budget_gib!r}")
    dtype = _dtype_name(dtype)
    budget_bytes = int(budget_gib * _GIB)
    if configs.kv_bytes_per_token(config, dtype) == 0:
        raise ValueError(f"{config.name}: its cache keeps nothing per token")
    presets = [_preset(configs.get(n)) for n in configs.names()]  # the registry as it is now
    if config.name not in configs.REGISTRY or configs.REGISTRY[config.name] != config:
        presets.insert(0, _preset(config))
    data = {
        "presets": presets,
        "dtypes": [{"name": n, "label": label, "bytes": configs.dtype_bytes(n)} for n, label in CACHE_DTYPES.items()],
        "initial": {
            "preset": config.name,
            "context": context_len,
            "batch": batch_size,
            "dtype": dtype,
            "budget": budget_gib,
        },
    }
    numbers = _cache_numbers(config, context_len, batch_size, dtype, budget_bytes)
    rows = [
        ("counted", _counted(config)),
        ("per token", f"{format_count(numbers['bytes_per_token'])} bytes ({format_bytes(numbers['bytes_per_token'])})"
                      f", {format_count(numbers['elements_per_token'])} numbers over "
                      f"{format_count(config.num_layers)} layers"),
        ("the cache", f"{format_count(numbers['cache_bytes'])} bytes ({format_bytes(numbers['cache_bytes'])}) for "
                      f"{format_count(batch_size)} × {format_count(context_len)} tokens"),
        ("in the budget", f"{format_count(numbers['sequences'])} sequences of {format_count(context_len)} tokens "
                          f"fit in {_fixed(budget_gib, 2 if budget_gib % 1 else 0)} GiB"),
    ]
    static = (
        '<div class="kqv-static-only">'
        f"<p><strong>{html.escape(config.name)}</strong> ({config.attention}), {CACHE_DTYPES[dtype]}:</p>"
        '<table class="kqv-table">'
        + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        + "</table></div>"
        + _static_note("The calculator's inputs")
    )
    return component("cache_calculator", data, static=static, scripts=["numbers.js", "cache_calculator.js"])


# --- The attention viewer (chapter 3) ----------------------------------------------------------------

#: The kinds of head of :mod:`kqv.heads`, by the keys of :func:`kqv.heads.head_scores`, as the page names them.
HEAD_KINDS: dict[str, str] = {
    "previous_token": "previous token",
    "first_token": "first token (sink)",
    "punctuation": "punctuation",
    "duplicate_token": "duplicate token",
    "induction": "induction",
}


def _pack_maps(maps: torch.Tensor) -> str:
    """(L, H, T, T) causal maps -> base64 of their lower triangles as bytes, weight w stored as round(255 w).

    Row-major: head (l, h) first, then query t, then key s <= t, so entry (l, h, t, s) sits at
    ``(l * H + h) * T(T+1)/2 + t(t+1)/2 + s``. A weight is off by at most 1/510.
    """
    T = maps.shape[-1]
    rows, cols = torch.tril_indices(T, T)                                    # (T(T+1)/2,) each
    tri = maps.detach().float().cpu()[..., rows, cols]                       # (L, H, T(T+1)/2)
    quantized = (tri * 255).round().clamp(0, 255).to(torch.uint8)
    return base64.b64encode(quantized.numpy().tobytes()).decode("ascii")


def unpack_maps(packed: str, layers: int, heads: int, tokens: int) -> torch.Tensor:
    """The inverse of the viewer's packing: (L, H, T, T) float32 maps, zero above the diagonal."""
    raw = torch.frombuffer(bytearray(base64.b64decode(packed)), dtype=torch.uint8)
    tri = tokens * (tokens + 1) // 2
    if raw.numel() != layers * heads * tri:
        raise ValueError(f"{raw.numel()} bytes, expected {layers} x {heads} x {tri}")
    maps = torch.zeros(layers, heads, tokens, tokens)
    rows, cols = torch.tril_indices(tokens, tokens)
    maps[..., rows, cols] = raw.view(layers, heads, tri).float() / 255
    return maps


def _prompt_scores(maps: torch.Tensor, ids: torch.Tensor, tokenizer) -> dict[str, torch.Tensor | None]:
    """Each kind's score (L, H) on this prompt, or None where the prompt cannot show that kind."""
    flat = ids.reshape(-1)
    copies = (flat[:, None] == flat[None, :]).tril(-1)                      # (T, T): s < t, same token
    punct = heads.punctuation_mask(tokenizer, flat)
    counted = flat.numel() > heads.FIRST_QUERY  # the first queries cannot tell these two kinds apart
    return {
        "previous_token": heads.previous_token_score(maps) if counted else None,
        "first_token": heads.first_token_score(maps) if counted else None,
        "punctuation": heads.punctuation_score(maps, punct) if bool(punct.any()) else None,
        "duplicate_token": heads.duplicate_token_score(maps, flat) if bool(copies.any()) else None,
        # induction wants the token after an earlier copy, and that token must be in the past: s <= t - 2
        "induction": heads.induction_score(maps, flat) if bool(copies.tril(-2).any()) else None,
    }


def _rounded(scores: torch.Tensor) -> list[float]:
    return [round(float(x), 3) for x in scores.flatten().tolist()]


@torch.no_grad()
def attention_viewer(
    model: torch.nn.Module,
    tokenizer,
    prompts: Mapping[str, str | torch.Tensor | Sequence[int]] | Sequence[str],
    *,
    random_tokens: int = 16,
    seed: int = 0,
    scores: Mapping[str, torch.Tensor] | None = None,
    scored_on: str | None = None,
    top: int = 5,
    threshold: float = 0.5,
    layer: int | None = None,
    head: int | None = None,
) -> HTML:
    """A real model's attention maps in the page: the reader picks a prompt, a layer and a head.

    Every head's map on every prompt is computed here by :func:`kqv.heads.attention_maps` and
    stored in the page (lower triangles, one byte per weight: off by at most 1/510). Heads are
    marked with the kinds of :mod:`kqv.heads`: a badge where a head's score is above
    ``threshold``, and the ``top`` heads of each kind, a click away.

    Args:
        model: a :class:`kqv.model.Decoder` (SmolLM2 from :func:`kqv.smollm2.load_smollm2`).
        tokenizer: its tokenizer (``encode(text).ids``, ``decode(ids)``).
        prompts: name -> text or token ids; or a list of texts (each its own name).
        random_tokens: if positive, one more prompt: that many random tokens, then the same again
            (:func:`kqv.heads.repeated_random_tokens`), where induction heads show.
        seed: of those random tokens.
        scores: kind -> (L, H) scores that mark the heads, e.g. from :func:`kqv.heads.head_scores`
            on a longer text; default: :func:`kqv.heads.head_scores` on the first text prompt.
        scored_on: what ``scores`` were measured on, in words (shown in the page).
        top: how many heads of each kind to list.
        threshold: a head gets a kind's badge when its score is above this.
        layer, head: shown first (default: the best previous-token head).

    Book: chapter 3 ("Real heads of a real model").
    """
    L, H = len(model.layers), model.config.num_heads
    device = model.embed_tokens.weight.device
    items = list(prompts.items()) if isinstance(prompts, Mapping) else [(str(p), p) for p in prompts]
    if random_tokens:
        low = 1 + max(tokenizer.get_added_tokens_decoder(), default=-1)  # above the special tokens
        ids = heads.repeated_random_tokens(random_tokens, model.embed_tokens.num_embeddings, seed=seed, low=low)
        items.append((f"{random_tokens} random tokens, then the same again", ids))
    if not items:
        raise ValueError("the viewer needs at least one prompt")
    token_ids = []
    for name, prompt in items:
        if isinstance(prompt, str):
            ids = torch.tensor([tokenizer.encode(prompt).ids])              # (1, T)
        else:
            ids = torch.as_tensor(prompt).reshape(1, -1)                     # (1, T)
        if ids.shape[1] < 2:
            raise ValueError(f"prompt {name!r} has {ids.shape[1]} token; the viewer needs at least 2")
        token_ids.append(ids.cpu())
    texts = [p for _, p in items if isinstance(p, str)]
    if scores is None:
        if not texts:
            raise ValueError("pass scores=..., or at least one text prompt to score the heads on")
        scores = heads.head_scores(model, tokenizer, texts[0], seed=seed)
        scored_on = scored_on or f"the text {texts[0]!r} and 64 random tokens (32, repeated)"
    for kind, s in scores.items():
        if tuple(s.shape) != (L, H):
            raise ValueError(f"scores[{kind!r}] has shape {tuple(s.shape)}, the model has (L, H) = ({L}, {H})")
    packed = []
    for (name, _), ids in zip(items, token_ids):
        maps = heads.attention_maps(model, ids.to(device)).cpu()             # (L, H, T, T)
        on_prompt = _prompt_scores(maps, ids, tokenizer)
        packed.append({
            "name": str(name),
            "tokens": heads.token_strings(tokenizer, ids),
            "maps": _pack_maps(maps),
            "scores": {k: None if v is None else _rounded(v) for k, v in on_prompt.items()},
        })
    kinds = [
        {
            "key": kind,
            "label": HEAD_KINDS.get(kind, kind.replace("_", " ")),
            "scores": _rounded(s),
            "top": [{**r, "score": round(r["score"], 3)} for r in heads.rank_heads(s.float().cpu(), top=top)],
        }
        for kind, s in scores.items()
    ]
    if layer is None or head is None:  # start at the best previous-token head, chapter 3's find
        best = {"layer": 0, "head": 0}
        if "previous_token" in scores:
            best = heads.rank_heads(scores["previous_token"].float().cpu(), top=1)[0]
        layer = best["layer"] if layer is None else layer
        head = best["head"] if head is None else head
    if not (0 <= layer < L and 0 <= head < H):
        raise ValueError(f"layer {layer}, head {head} is not a head of this model ({L} layers x {H} heads)")
    data = {
        "layers": L,
        "heads": H,
        "kinds": kinds,
        "threshold": threshold,
        "scored_on": scored_on or "the scores given",
        "prompts": packed,
        "initial": {"prompt": 0, "layer": layer, "head": head},
    }
    lists = "".join(
        f"<tr><th>{html.escape(k['label'])}</th><td>"
        + ", ".join(f"layer {r['layer']} head {r['head']} ({r['score']:.2f})" for r in k["top"])
        + "</td></tr>"
        for k in kinds
    )
    static = (
        '<div class="kqv-static-only">'
        f"<p>The top heads of each kind, scored on {html.escape(data['scored_on'])}:</p>"
        f'<table class="kqv-table">{lists}</table></div>'
        + _static_note("The attention maps of every head")
    )
    return component("attention_viewer", data, static=static, scripts=["numbers.js", "attention_viewer.js"])


# --- The temperature explorer (chapter 2) ------------------------------------------------------------


def _vector(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu().to(torch.float64)  # on the CPU first: MPS has no float64
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite numbers, got {t.tolist()}")
    return t


def temperature(
    scores: Any,
    labels: Sequence[str],
    values: Any = None,
    value_labels: Sequence[str] | None = None,
    *,
    tau: float = 1.0,
    tau_range: tuple[float, float] = (0.05, 20.0),
    highlight: int | Sequence[int] | None = None,
    answer_range: tuple[float, float] | None = None,
) -> HTML:
    """The softmax of ``scores`` at a temperature the reader sets, and the blended answer.

    The page computes ``softmax(scores / tau)`` (as ``torch.softmax``, in float64) for the
    temperature on the slider or typed in, draws the weights as bars, and the blended answer
    ``weights @ values`` beside them.

    Args:
        scores: (N,) the librarian's scores, one per book.
        labels: N names, one per book.
        values: (N, M) what each book says (its pages), or None for no answer.
        value_labels: M names, one per column of ``values``.
        tau: the temperature shown first.
        tau_range: the slider's ends (a typed temperature may lie outside).
        highlight: book(s) drawn in the highlight colour.
        answer_range: the answer bars' scale (default: from 0, or the smallest value, to the largest).

    Book: chapter 2 ("Temperature: how decisive is the librarian?").
    """
    s = _vector(scores, "scores")
    if s.dim() != 1 or s.numel() < 2:
        raise ValueError(f"scores must be a vector of at least 2 numbers, got shape {tuple(s.shape)}")
    if len(labels) != s.numel():
        raise ValueError(f"{s.numel()} scores but {len(labels)} labels")
    low, high = tau_range
    if not 0 < low < high:
        raise ValueError(f"tau_range must satisfy 0 < low < high, got {tau_range}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive number, got {tau!r}")
    v = None
    if values is not None:
        v = _vector(values, "values")
        if v.dim() != 2 or v.shape[0] != s.numel():
            raise ValueError(f"values must be ({s.numel()}, M), one row per score, got shape {tuple(v.shape)}")
        if value_labels is None or len(value_labels) != v.shape[1]:
            raise ValueError(f"values has {v.shape[1]} columns, so value_labels needs {v.shape[1]} names")
    marked = [] if highlight is None else [highlight] if isinstance(highlight, int) else list(highlight)
    weights = torch.softmax(s / tau, dim=-1)                                # (N,)
    lo, hi = answer_range or ((min(0.0, float(v.min())), float(v.max())) if v is not None else (0.0, 1.0))
    data = {
        "scores": s.tolist(),
        "labels": [str(x) for x in labels],
        "values": None if v is None else v.tolist(),
        "value_labels": None if v is None else [str(x) for x in value_labels],
        "tau": tau,
        "range": [low, high],
        "highlight": marked,
        "answer_range": [lo, hi],
    }
    rows = "".join(
        f"<tr><th>{html.escape(str(label))}</th><td>{_fixed(100 * w, 1)}%</td></tr>"
        for label, w in zip(labels, weights.tolist())
    )
    if v is not None:
        answer = weights @ v                                                 # (N,) @ (N, M) -> (M,)
        rows += "".join(
            f"<tr><th>answer: {html.escape(str(label))}</th><td>{_fixed(a, 3)}</td></tr>"
            for label, a in zip(value_labels, answer.tolist())
        )
    static = (
        '<div class="kqv-static-only">'
        f"<p>Relevance at temperature {_fixed(tau, 2)}:</p>"
        f'<table class="kqv-table">{rows}</table></div>'
        + _static_note("The temperature slider and its bars")
    )
    return component("temperature", data, static=static, scripts=["numbers.js", "temperature.js"])
