"""Concept diagrams, drawn from kqv's own modules, configs and caches.

The chapters explain in words what a query, a key, a value, a head, a cache
and a latent are; these pictures show them first. Each is drawn from the object
it depicts, so a picture cannot drift from the code: give
:func:`qkv_projection` a module with 9 query heads and 3 KV heads and it draws
three K/V heads; change ``kv_lora_rank`` and :func:`mla_path` draws a
different latent. ::

    from kqv import diagrams, plots

    fig = diagrams.qkv_projection(attn)            # chapters 1 and 2
    plots.glue_figure("fig-qkv", fig)              # as any figure of the book

=========================  ====================================================
:func:`qkv_projection`     one token's x through W_q, W_k, W_v to q, k, v
:func:`head_split`         the width cut into heads, attention head by head,
                           the heads put back together and mixed by W_o
:func:`cache_growth`       what the cache holds, token by token, as decoding
                           proceeds
:func:`compare_designs`    MHA, MQA, GQA and MLA side by side: which query heads
                           read which catalog, and what each caches per token
:func:`mla_path`           MLA's path: the latent, the decoupled RoPE key, the
                           per-head up-projections and the absorbed path
:func:`decode_animation`   cached decoding of the running sentence, one step
                           per token, with the new query's attention weights
=========================  ====================================================

One visual language throughout: one colour per role (:data:`kqv.plots.ROLES`:
query, key, value, latent, RoPE part, and a tint of the ink for the token's
hidden vector), and each design's own colour and marker
(:data:`kqv.plots.DESIGNS`) beside its name where designs are compared. A
vector is a bar whose length is proportional to how many numbers it holds, on
one scale per figure ("to scale"); thin lines inside a bar cut it into heads.
Where one vector would dwarf the rest (the hidden width of a large model) it is
drawn shortened, with a break, and says so.

Every function returns a matplotlib figure drawn for the page's column
(``width_in``, at most :data:`kqv.plots.COLUMN_IN`), with text at 11 pt. The
figure also knows how to lay itself out again for a phone
(``fig.kqv_relayout``): :func:`kqv.plots.renditions` uses it, so
:func:`kqv.plots.glue_figure` stores a phone rendition in which the rows
re-flow instead of shrinking. Call :func:`kqv.plots.use_style` first (the
chapters' set-up cell does), so that two draws write the same SVG bytes.

Book: chapters 1 to 9, where each concept is introduced.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from . import configs, plots
from .attention import Attention, scaled_dot_product_attention
from .cache import Cache, KVCache, LatentCache
from .mla import MultiHeadLatentAttention

if TYPE_CHECKING:
    from IPython.display import HTML
    from matplotlib.figure import Figure

__all__ = [
    "SENTENCE",
    "FONT_PT",
    "qkv_projection",
    "head_split",
    "cache_growth",
    "compare_designs",
    "mla_path",
    "decode_weights",
    "demo_module",
    "decode_animation",
]

#: The book's running sentence, one word per token, with the word the model completes.
SENTENCE: tuple[str, ...] = ("Three", "parts", "of", "Earth", "are", "Crust", ",", "Mantle", "and", "core")

#: The size of all text in the diagrams, in points (at least :data:`kqv.plots.MIN_FONT_PT`).
FONT_PT = 11.0

_LINE = FONT_PT * 1.3 / 72  # the height of a line of text, in inches
_BAR = 0.24                 # the height of a vector's bar
_GAP = 0.08                 # the space between neighbours
_HIDDEN_TINT = 0.14         # the hidden role is a tint of the ink: opacity of its fill
_WHITE = "#ffffff"


# --- What is drawn: the shapes of a module, a config or a cache -------------------------------------


@dataclass(frozen=True)
class _Shape:
    """The widths a diagram needs, read from a module, a config or a cache."""

    name: str
    kind: str            # "MHA", "GQA", "MQA" or "MLA"; "KV" for a KVCache (it does not know H)
    hidden: int | None   # None for a cache (it does not know the model width)
    H: int | None        # query heads (None for a cache)
    H_kv: int            # K/V heads (MLA: 1, the shared latent row)
    D: int               # head width of queries and keys (MHA/GQA/MQA)
    d_c: int = 0
    d_r: int = 0
    D_nope: int = 0
    D_v: int = 0
    d_q: int | None = None

    def pieces(self) -> list[tuple[str, str, int, int]]:
        """What one token leaves in the cache: (name, role, heads, width of each)."""
        if self.kind == "MLA":
            parts = [("c_kv", "latent", 1, self.d_c)]
            return parts + ([("k_rope", "rope", 1, self.d_r)] if self.d_r else [])
        return [("K", "key", self.H_kv, self.D), ("V", "value", self.H_kv, self.D)]

    @property
    def numbers_per_token(self) -> int:
        """Numbers cached per token in one layer (DeepSeek-V2, Table 1: 2 n_g d_h, or d_c + d_r)."""
        return sum(heads * width for _, _, heads, width in self.pieces())


def _kind(H: int, H_kv: int) -> str:
    if H_kv == H:
        return "MHA"
    return "MQA" if H_kv == 1 else "GQA"


def _shape(obj: Any) -> _Shape:
    """Read the widths of a kqv.Attention, a MultiHeadLatentAttention, a ModelConfig or a cache."""
    if isinstance(obj, Attention):
        return _Shape("kqv.Attention", _kind(obj.num_heads, obj.num_kv_heads), obj.hidden_size,
                      obj.num_heads, obj.num_kv_heads, obj.head_dim)
    if isinstance(obj, MultiHeadLatentAttention):
        return _Shape("kqv.MultiHeadLatentAttention", "MLA", obj.hidden_size, obj.num_heads, 1,
                      obj.qk_head_dim, obj.kv_lora_rank, obj.qk_rope_head_dim, obj.qk_nope_head_dim,
                      obj.v_head_dim, obj.q_lora_rank)
    if isinstance(obj, configs.ModelConfig):
        if obj.is_mla:
            return _Shape(obj.name, "MLA", obj.hidden_size, obj.num_heads, 1,
                          obj.qk_nope_head_dim + obj.qk_rope_head_dim, obj.kv_lora_rank,
                          obj.qk_rope_head_dim, obj.qk_nope_head_dim, obj.v_head_dim, obj.q_lora_rank)
        return _Shape(obj.name, obj.attention, obj.hidden_size, obj.num_heads, obj.num_kv_heads, obj.head_dim)
    if isinstance(obj, LatentCache):
        return _Shape("kqv.LatentCache", "MLA", None, None, 1, 0, obj.kv_lora_rank, obj.qk_rope_head_dim)
    if isinstance(obj, KVCache):
        _, H_kv, _, D = obj.buffers["k"].shape
        return _Shape("kqv.KVCache", "KV", None, None, H_kv, D)
    raise TypeError(
        "expected a kqv.Attention, kqv.MultiHeadLatentAttention, kqv.configs.ModelConfig, "
        f"KVCache or LatentCache, got {type(obj).__name__}"
    )


def _heads_text(heads: int, width: int) -> str:
    """'576 = 9 heads × 64', or '16 numbers' for one head."""
    if heads == 1:
        return f"{width:,} numbers"
    return f"{heads * width:,} = {heads} heads × {width:,}"


def _bytes_text(n: int) -> str:
    if n >= 10 * 1024:
        return f"{n / 1024:,.0f} KiB" if n % 1024 == 0 else f"{n / 1024:,.1f} KiB"
    return f"{n:,} bytes"


# --- Measuring text -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _renderer() -> Any:
    from matplotlib.backends.backend_agg import RendererAgg

    return RendererAgg(1, 1, 72)  # 72 dpi: one pixel is one point


@functools.lru_cache(maxsize=8192)
def _text_width(text: str, weight: str = "normal") -> float:
    """Width in inches of ``text`` at :data:`FONT_PT` in the figures' font."""
    from matplotlib.font_manager import FontProperties

    prop = FontProperties(size=FONT_PT, weight=weight)
    width, _, _ = _renderer().get_text_width_height_descent(text, prop, ismath=False)
    return width / 72


def _wrap(text: str, width: float, weight: str = "normal") -> list[str]:
    """Break ``text`` at spaces into lines no wider than ``width`` inches (a longer word stays whole)."""
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        trial = f"{line} {word}" if line else word
        if line and _text_width(trial, weight) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line]


def _ink_on(color: str) -> str:
    """Text colour on a fill: plots.DARK (dark in both themes) or white, whichever contrasts more."""
    from matplotlib.colors import to_rgb

    def luminance(rgb: Sequence[float]) -> float:
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    fill, dark = luminance(to_rgb(color)), luminance(to_rgb(plots.DARK))
    return plots.DARK if (fill + 0.05) / (dark + 0.05) >= 1.05 / (fill + 0.05) else _WHITE


# --- Drawing in inches --------------------------------------------------------------------------------


class _Sketch:
    """Shapes and text placed in inches from the top left; :meth:`figure` draws them.

    The height is known only once everything is placed, so drawing is deferred.
    Nothing is clipped (no clip paths, so the SVG has no random ids) and every
    element that a test or a reader may want to find carries a ``gid``, which
    becomes its ``id`` in the SVG.
    """

    def __init__(self, width: float) -> None:
        import matplotlib as mpl

        if not 1.5 <= width <= plots.COLUMN_IN + 1e-9:
            raise ValueError(f"width_in must be in [1.5, {plots.COLUMN_IN}] (the page's column), got {width}")
        # plots.to_svg crops to the drawing plus savefig's padding on each side: draw within what is left,
        # so that the SVG is width_in wide.
        self.width = width - 2 * float(mpl.rcParams["savefig.pad_inches"])
        self.bottom = 0.0
        self._ops: list[Callable[[Any], None]] = []

    def _reach(self, y: float) -> None:
        self.bottom = max(self.bottom, y)

    def rect(self, x: float, y: float, w: float, h: float, *, role: str | None = None,
             fill: str | None = None, alpha: float = 1.0, edge: str | None = plots.INK,
             lw: float = 0.8, dashed: bool = False, gid: str | None = None) -> None:
        """A box; ``role`` fills it with that role's colour (the hidden role with a tint of the ink)."""
        from matplotlib.patches import Rectangle

        if role is not None:
            fill = plots.ROLES[role]
            alpha = _HIDDEN_TINT if role == "hidden" else alpha
        self._reach(y + h)

        def draw(ax: Any) -> None:
            from matplotlib.colors import to_rgba

            face = "none" if fill is None else to_rgba(fill, alpha)  # the fill's opacity, not the outline's
            patch = Rectangle((x, y), w, h, facecolor=face, edgecolor="none" if edge is None else edge,
                              lw=lw if edge is not None else 0, linestyle=(0, (3, 2)) if dashed else "-",
                              clip_on=False)
            patch.set_gid(gid)
            ax.add_patch(patch)

        self._ops.append(draw)

    def text(self, x: float, y: float, s: str, *, ha: str = "left", va: str = "center",
             color: str = plots.INK, weight: str = "normal", gid: str | None = None) -> float:
        """Text centred on ``y`` (by default); returns its width in inches."""
        width = _text_width(s, weight)
        self._reach(y + _LINE / 2 if va == "center" else y + _LINE)

        def draw(ax: Any) -> None:
            t = ax.text(x, y, s, ha=ha, va=va, color=color, fontsize=FONT_PT, fontweight=weight,
                        clip_on=False)
            t.set_gid(gid)

        self._ops.append(draw)
        return width

    def lines(self, segments: Sequence[tuple[float, float, float, float]], *, color: str = plots.INK,
              lw: float = 0.8, alpha: float = 1.0, gid: str | None = None) -> None:
        """Straight segments (x0, y0, x1, y1), drawn as one path."""
        if not segments:
            return
        xs: list[float] = []
        ys: list[float] = []
        for x0, y0, x1, y1 in segments:
            xs += [x0, x1, math.nan]
            ys += [y0, y1, math.nan]
            self._reach(max(y0, y1))

        def draw(ax: Any) -> None:
            (line,) = ax.plot(xs, ys, color=color, lw=lw, alpha=alpha, clip_on=False,
                              solid_capstyle="butt")
            line.set_gid(gid)

        self._ops.append(draw)

    def arrow(self, x0: float, y0: float, x1: float, y1: float, *, color: str = plots.INK) -> None:
        self._reach(max(y0, y1))

        def draw(ax: Any) -> None:
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0), annotation_clip=False,
                        arrowprops=dict(arrowstyle="-|>", color=color, lw=1.0, shrinkA=0, shrinkB=0,
                                        mutation_scale=9))

        self._ops.append(draw)

    def marker(self, x: float, y: float, design: str) -> None:
        """The design's marker in its colour (plots.DESIGNS)."""
        look = plots.DESIGNS[design]

        def draw(ax: Any) -> None:
            ax.plot([x], [y], marker=look["marker"], color=look["color"], markersize=9, clip_on=False,
                    linestyle="none")

        self._ops.append(draw)

    def figure(self, relayout: Callable[[float], Figure] | None = None) -> Figure:
        import matplotlib.pyplot as plt

        height = self.bottom + 0.05
        fig = plt.figure(figsize=(self.width, height), layout="none")
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(0, self.width)
        ax.set_ylim(height, 0)  # y grows downwards, as the diagrams are read
        ax.set_axis_off()
        for draw in self._ops:
            draw(ax)
        if relayout is not None:
            fig.kqv_relayout = relayout  # plots.renditions draws the phone's version with it
        return fig


def _bar(sk: _Sketch, x: float, y: float, numbers: int, scale: float, role: str, *,
         cut: int | None = None, cells: bool = False, label: str | None = None, gid: str | None = None,
         edge: str | None = plots.INK) -> float:
    """A vector of ``numbers`` numbers as a bar ``numbers * scale`` inches long; returns its length.

    ``cut`` draws a line every ``cut`` numbers (the heads), ``cells`` a fainter
    one between every two numbers; ``label`` is written inside when it fits.
    """
    w = max(numbers * scale, 0.03)
    sk.rect(x, y, w, _BAR, role=role, gid=gid, edge=edge)
    ink = plots.INK if role == "hidden" else _ink_on(plots.ROLES[role])
    heads = cut and numbers // cut > 1 and cut * scale >= 0.025
    if cells and scale >= 0.05:
        sk.lines([(x + i * scale, y, x + i * scale, y + _BAR) for i in range(1, numbers)
                  if not (heads and i % cut == 0)], color=ink, lw=0.5, alpha=0.45)
    if heads:
        sk.lines([(x + i * cut * scale, y, x + i * cut * scale, y + _BAR) for i in range(1, numbers // cut)],
                 color=ink, lw=0.7, alpha=0.85)
    if label and _text_width(label) + 0.08 <= w:
        sk.text(x + w / 2, y + _BAR / 2, label, ha="center", color=ink)
    return w


def _legend(sk: _Sketch, y: float, entries: Sequence[tuple[str, str]], *, x0: float = 0.0) -> float:
    """A line (or lines) of coloured swatches with their names; returns the y below it."""
    x, sw = x0, 0.22
    row_y = y + _LINE / 2
    for role, name in entries:
        need = sw + 0.06 + _text_width(name) + 0.25
        if x > x0 and x + need - 0.25 > sk.width:
            x = x0
            row_y += _LINE + 0.04
        sk.rect(x, row_y - 0.08, sw, 0.16, role=role, lw=0.6)
        lines = _wrap(name, sk.width - x - sw - 0.06)  # an entry longer than a line wraps under itself
        for i, line in enumerate(lines):
            sk.text(x + sw + 0.06, row_y + i * _LINE, line)
        if len(lines) > 1:
            x, row_y = sk.width, row_y + (len(lines) - 1) * _LINE  # the next entry starts a new line
        else:
            x += need
    return row_y + _LINE / 2 + 0.04


def _title(sk: _Sketch, y: float, text: str, *, weight: str = "bold", x0: float = 0.0,
           lines: int | None = None) -> float:
    """A title wrapped to the width; ``lines`` reserves that many lines (frames of one size)."""
    wrapped = _wrap(text, sk.width - x0, weight)
    for i, line in enumerate(wrapped):
        sk.text(x0, y + _LINE * (i + 0.5), line, weight=weight)
    return y + _LINE * max(len(wrapped), lines or 0) + 0.06


def _bold_then(sk: _Sketch, x: float, y: float, bold: str, rest: str, *, gid: str | None = None) -> float:
    """A bold head, then the rest in normal weight: on the same line if it fits, else wrapped below."""
    heads = _wrap(bold, sk.width - x, "bold")
    for j, line in enumerate(heads):
        sk.text(x, y + _LINE * (j + 0.5), line, weight="bold", gid=gid if j == 0 else None)
    y += _LINE * (len(heads) - 1)
    after = x + _text_width(heads[-1], "bold")
    if after + _text_width("; " + rest) <= sk.width:
        sk.text(after, y + _LINE / 2, "; " + rest)
        return y + _LINE
    lines = _wrap(rest, sk.width - x)
    for j, line in enumerate(lines):
        sk.text(x, y + _LINE * (j + 1.5), line)
    return y + _LINE * (len(lines) + 1)


@dataclass
class _Rows:
    """Rows of [label][bar][note] with the bars on one scale, planned for a width.

    A row is a dict: ``label``, ``numbers``, ``role``, ``note``, and optionally
    ``cut`` (numbers per head), ``indent`` (of the label), ``gid`` and
    ``note_gid``. Wide: one line per row, the bars starting in one column.
    Narrow (when the bars would get less than 42% of the width): the label on
    its own line, the bar under it from the left edge, its note after it or,
    if there is no room, under it.
    """

    wide: bool
    x_bar: float
    scale: float

    @classmethod
    def plan(cls, width: float, rows: Sequence[dict], *, scale_numbers: int | None = None) -> "_Rows":
        label_w = max(_text_width(r["label"]) + r.get("indent", 0.0) for r in rows) + 0.15
        note_w = max(_text_width(r["note"]) for r in rows) + _GAP + 0.01
        biggest = max([r["numbers"] for r in rows] + [scale_numbers or 0])
        wide = width - label_w - note_w >= 0.42 * width
        indent = max(r.get("indent", 0.0) for r in rows)
        x_bar = label_w if wide else 0.0
        return cls(wide, x_bar, (width - x_bar - (note_w if wide else indent + 0.02)) / biggest)

    def draw(self, sk: _Sketch, y: float, row: dict) -> tuple[float, tuple[float, float, float]]:
        """Draw one row from ``y``; return the y below it and the bar's (x, y, length)."""
        indent = row.get("indent", 0.0)
        note = row["note"]
        if self.wide:
            sk.text(indent, y + _BAR / 2, row["label"])
        elif row.get("inline"):  # no line of its own: the label opens the note
            note = f"{row['label']}: {note}"
        else:
            sk.text(indent, y + _LINE / 2, row["label"])
            y += _LINE + 0.02
        x = self.x_bar if self.wide else indent  # narrow: indented rows keep their indent
        w = _bar(sk, x, y, row["numbers"], self.scale, row["role"], cut=row.get("cut"),
                 cells=row.get("cells", False), gid=row.get("gid"))
        note_x = x + w + _GAP
        if note_x + _text_width(note) <= sk.width:
            sk.text(note_x, y + _BAR / 2, note, gid=row.get("note_gid"))
            return y + _BAR + 0.14, (x, y, w)
        sk.text(x, y + _BAR + 0.04 + _LINE / 2, note, gid=row.get("note_gid"))
        return y + _BAR + _LINE + 0.16, (x, y, w)


# --- 1. One token's query, key and value --------------------------------------------------------------


def _attention_shape(module: Any, what: str) -> _Shape:
    shape = _shape(module)
    if shape.kind == "MLA" or shape.hidden is None:
        raise ValueError(f"{what} draws MHA, GQA or MQA; for {shape.name} ({shape.kind}) use mla_path")
    return shape


def qkv_projection(module: Attention | configs.ModelConfig, *, token: str = "Earth",
                   width_in: float = plots.COLUMN_IN) -> Figure:
    """One token's vector x, multiplied by W_q, W_k and W_v, gives its query, key and value. To scale.

    Bars are proportional to the number of numbers in each vector (the module's
    ``hidden_size``, ``num_heads * head_dim`` and ``num_kv_heads * head_dim``);
    thin lines cut q, k and v into heads. The matrices' shapes are written in
    the maths layout of the chapters, x @ W with W of shape (in, out).

    Args:
        module: a :class:`kqv.Attention` or a (non-MLA) :class:`kqv.configs.ModelConfig`.
        token: the word whose vector x is drawn.
        width_in: the figure's width in inches.

    Book: chapter 1 (a query, a key and a value per token) and chapter 2 (the library).
    """
    shape = _attention_shape(module, "qkv_projection")
    d, H, H_kv, D = shape.hidden, shape.H, shape.H_kv, shape.D
    cells = max(d, H * D) <= 16  # small enough to draw every number as a cell, as in chapters 1 and 2
    rows = [dict(label=f'x of "{token}"', numbers=d, role="hidden", note=f"{d:,} numbers", gid="vector-x",
                 note_gid="width-x", cells=cells)]
    for name, role, heads, W in (("q", "query", H, "W_q"), ("k", "key", H_kv, "W_k"), ("v", "value", H_kv, "W_v")):
        rows.append(dict(label=f"× {W} ({d:,} × {heads * D:,}) → {name}", numbers=heads * D, role=role,
                         note=_heads_text(heads, D), cut=D, cells=cells, indent=0.3, gid=f"vector-{name}",
                         note_gid=f"width-{name}"))
    sk = _Sketch(width_in)
    plan = _Rows.plan(sk.width, rows)
    y, ticks = 0.0, []
    for i, row in enumerate(rows):
        top = y
        y, (_, bar_y, _) = plan.draw(sk, y, row)
        if i == 0:  # the trunk starts under x (and under its note when that sits below the bar)
            x_bottom = bar_y + _BAR + 0.03 if y - bar_y < _BAR + 0.2 else y - 0.1
        else:  # the branch points at the row's label
            ticks.append(bar_y + _BAR / 2 if plan.wide else top + _LINE / 2)
    x_tree = 0.12  # x feeds all three products
    sk.lines([(x_tree, x_bottom, x_tree, ticks[-1])] + [(x_tree, t, x_tree + 0.14, t) for t in ticks], lw=1.0)
    return sk.figure(lambda w: qkv_projection(module, token=token, width_in=w))


# --- 2. Heads: the width cut into slices --------------------------------------------------------------


def head_split(module: Attention | configs.ModelConfig, *, highlight: int = 0,
               width_in: float = plots.COLUMN_IN) -> Figure:
    """q, k and v cut into heads, attention head by head, the outputs concatenated and mixed by W_o.

    To scale: every bar is proportional to its number of numbers, on one scale,
    and each head's slice of the output sits under its slice of the query.
    Head ``highlight`` (0-based) is outlined in every vector it owns a slice of
    (its group's slice of k and v when K/V heads are shared).

    Args:
        module: a :class:`kqv.Attention` or a (non-MLA) :class:`kqv.configs.ModelConfig`.
        highlight: the head to outline.
        width_in: the figure's width in inches.

    Book: chapter 3 (32 librarians, each with a slice of the width).
    """
    shape = _attention_shape(module, "head_split")
    d, H, H_kv, D = shape.hidden, shape.H, shape.H_kv, shape.D
    if not 0 <= highlight < H:
        raise ValueError(f"highlight must be a head in 0 .. {H - 1}, got {highlight}")
    g = H // H_kv
    top_rows = [dict(label=name, numbers=heads * D, role=role, note=_heads_text(heads, D), cut=D,
                     gid=f"vector-{name}")
                for name, role, heads in (("q", "query", H), ("k", "key", H_kv), ("v", "value", H_kv))]
    bottom_rows = [
        dict(label="o", numbers=H * D, role="value", note=f"{H} heads side by side", cut=D, gid="vector-o",
             inline=True),
        dict(label=f"× W_o ({H * D:,} × {d:,}) → out", numbers=d, role="hidden", note=f"{d:,} numbers",
             gid="vector-out"),
    ]
    sk = _Sketch(width_in)
    plan = _Rows.plan(sk.width, top_rows + bottom_rows)
    y, bars = 0.0, {}
    for row in top_rows:
        y, bars[row["label"]] = plan.draw(sk, y, row)
    x0, q_y, _ = bars["q"]
    step = D * plan.scale
    centers = [x0 + (h + 0.5) * step for h in range(H)]
    for name, index in (("q", highlight), ("k", highlight // g), ("v", highlight // g)):
        bx, by, _ = bars[name]
        sk.rect(bx + index * step, by - 0.03, step, _BAR + 0.06, edge=plots.INK, lw=2.2,
                gid=f"highlight-{name}")
    # Which head is which: a number under every head of q when they fit, else a few.
    label_y = y + _LINE / 2 - 0.04
    each = all(_text_width(str(h + 1)) + 0.04 <= step for h in range(H))
    taken: list[tuple[float, float]] = []
    for h in (range(H) if each else [highlight, 0, H - 1]):
        text = f"head {h + 1}" if h == highlight else str(h + 1)
        w = _text_width(text, "bold")
        left = min(max(centers[h] - w / 2, 0.0), sk.width - w)
        if any(left < b and left + w > a for a, b in taken):
            continue
        taken.append((left - 0.08, left + w + 0.08))
        sk.text(left + w / 2, label_y, text, ha="center", weight="bold" if h == highlight else "normal",
                gid=f"head-label-{h}")
    # From each head's number a line down into the band where it attends on its own, then out to its
    # slice of o.
    band_top = y + _LINE + 0.3
    text = f"each head attends on its own: o_h = softmax(q_h · k_h / √{D}) v_h"
    if g > 1:
        text += f"; {g} query heads share each K/V head"
    band_w = min(max(H * step, _text_width(text) + 0.18, sk.width * 0.6), sk.width - x0)
    wrapped = _wrap(text, band_w - 0.16)
    band_h = _LINE * len(wrapped) + 0.12
    sk.lines([(c, y + _LINE + 0.02, c, band_top) for c in centers], lw=0.7, alpha=0.6, gid="head-lines")
    sk.rect(x0, band_top, band_w, band_h, lw=1.0, gid="attention-band")
    for i, line in enumerate(wrapped):
        sk.text(x0 + 0.08, band_top + 0.06 + _LINE * (i + 0.5), line)
    y = band_top + band_h + 0.28
    sk.lines([(c, band_top + band_h, c, y) for c in centers], lw=0.7, alpha=0.6)
    for row in bottom_rows:
        y, bars[row["label"]] = plan.draw(sk, y, row)
    ox, oy, _ = bars["o"]
    sk.rect(ox + highlight * step, oy - 0.03, step, _BAR + 0.06, lw=2.2, gid="highlight-o")
    return sk.figure(lambda w: head_split(module, highlight=highlight, width_in=w))


# --- 3. The cache, row by row -------------------------------------------------------------------------


@dataclass(frozen=True)
class _CacheSpec:
    """What one token leaves in one layer's cache, and its size."""

    shape: _Shape
    bytes_per_token: int
    dtype: str
    slots: int | None  # a real cache's max_len (preallocated rows)


def _cache_spec(source: Any, dtype: torch.dtype | str | None = None) -> _CacheSpec:
    shape = _shape(source)
    if isinstance(source, Cache):
        return _CacheSpec(shape, source.bytes_per_token, str(source.dtype).removeprefix("torch."), source.max_len)
    if isinstance(source, configs.ModelConfig):
        dtype = dtype or torch.bfloat16
        size = configs.dtype_bytes(dtype)
        name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        return _CacheSpec(shape, configs.kv_elements_per_token(source, per_layer=True) * size, name, None)
    weight = next(source.parameters())  # a module: its own dtype, unless one is given
    dtype = dtype or weight.dtype
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    return _CacheSpec(shape, shape.numbers_per_token * configs.dtype_bytes(dtype), name, None)


def _piece_names(pieces: Sequence[tuple[str, str, int, int]]) -> list[tuple[str, str]]:
    """Legend entries for what a cache row holds: (role, text)."""
    names = {"K": "key", "V": "value", "c_kv": "latent", "k_rope": "RoPE key, shared by all heads"}
    out = []
    for name, role, heads, width in pieces:
        what = f"{heads} heads × {width:,}" if heads > 1 else f"{width:,} numbers"
        out.append((role, f"{name} ({names[name]}): {what}"))
    return out


def _cache_row(sk: _Sketch, x: float, y: float, h: float, pieces: Sequence[tuple[str, str, int, int]],
               scale: float, *, filled: bool, row: int) -> float:
    """One token's row of the cache, to scale; an empty (preallocated) row is a dashed outline."""
    widths = [heads * width * scale for _, _, heads, width in pieces]
    total = sum(widths) + 0.06 * (len(pieces) - 1)
    if not filled:
        sk.rect(x, y, total, h, edge=plots.INK, lw=0.6, dashed=True, gid=f"cache-slot-{row}")
        return total
    for (name, role, heads, width), w in zip(pieces, widths):
        sk.rect(x, y, max(w, 0.03), h, role=role, lw=0.6, gid=f"cache-entry-{row}-{name}")
        if heads > 1 and width * scale >= 0.025:
            ink = _ink_on(plots.ROLES[role])
            sk.lines([(x + j * width * scale, y, x + j * width * scale, y + h) for j in range(1, heads)],
                     color=ink, lw=0.6, alpha=0.85)
        x += w + 0.06
    return total


def cache_growth(source: Any, tokens: Sequence[str] = SENTENCE, *, prompt_len: int | None = None,
                 dtype: torch.dtype | str | None = None, scale_numbers: int | None = None,
                 width_in: float = plots.COLUMN_IN) -> Figure:
    """What the cache holds, one row per token, as prefill and then decoding fill it. To scale.

    Each token's row shows what it leaves in one layer's cache: its keys and
    values per K/V head (a :class:`kqv.KVCache`), or MLA's latent and RoPE key
    (a :class:`kqv.LatentCache`), as bars proportional to their numbers. The
    first ``prompt_len`` rows are written by one prefill step, each later row by
    one decoding step. A real cache given as ``source`` also shows its
    preallocated, still empty rows (up to its ``max_len``) and its own
    ``bytes_per_token``.

    Args:
        source: a :class:`kqv.KVCache` or :class:`kqv.LatentCache`, an attention
            module (:class:`kqv.Attention`, :class:`kqv.MultiHeadLatentAttention`)
            or a :class:`kqv.configs.ModelConfig`.
        tokens: one label per token (the running sentence by default).
        prompt_len: how many tokens the prefill writes (default: all but the last).
        dtype: the numbers' type for a module (default its own) or a config (default bfloat16).
        scale_numbers: the numbers per token that span the row's full width;
            pass the same value to draw two caches to one scale.
        width_in: the figure's width in inches.

    Book: chapter 4 (the KV cache), chapter 8 (the latent cache).
    """
    spec = _cache_spec(source, dtype)
    T = len(tokens)
    if T < 1:
        raise ValueError("tokens must name at least one token")
    prompt_len = T - 1 if prompt_len is None else prompt_len
    if not 0 <= prompt_len <= T:
        raise ValueError(f"prompt_len must be in 0 .. {T} (the number of tokens), got {prompt_len}")
    slots = max(T, min(spec.slots or T, T + 3))  # a few preallocated, empty rows at most
    pieces = spec.shape.pieces()
    sk = _Sketch(width_in)
    y = _legend(sk, 0.0, _piece_names(pieces))
    steps = [("prefill" if i < prompt_len else f"step {i - prompt_len + 1}") for i in range(T)]
    step_w = max(_text_width(s) for s in steps) + 0.18
    tok_w = max(_text_width(t) for t in tokens) + 0.1
    x_cache = step_w + tok_w + 0.12
    biggest = max(scale_numbers or 0, spec.shape.numbers_per_token)
    scale = (sk.width - x_cache - 0.06 * (len(pieces) - 1) - 0.02) / biggest
    row_h, pitch = 0.22, 0.28
    y += 0.08
    top = y
    for s in range(slots):
        yy = top + s * pitch
        if s < T:
            sk.text(step_w + tok_w, yy + row_h / 2, tokens[s], ha="right", gid=f"token-{s}")
            if s >= prompt_len:
                sk.text(0.0, yy + row_h / 2, steps[s], gid=f"step-{s}")
        _cache_row(sk, x_cache, yy, row_h, pieces, scale, filled=s < T, row=s)
    if prompt_len:  # one bracket for the rows that one prefill step writes
        bx, y0, y1 = step_w - 0.08, top, top + (prompt_len - 1) * pitch + row_h
        sk.lines([(bx, y0, bx, y1), (bx, y0, bx + 0.06, y0), (bx, y1, bx + 0.06, y1)], lw=1.0)
        sk.text(bx - 0.06, (y0 + y1) / 2, "prefill", ha="right", gid="step-prefill")
    y = top + slots * pitch + 0.06
    bpt = spec.bytes_per_token
    note = (f"{T} tokens × {spec.shape.numbers_per_token:,} numbers ({bpt:,} bytes in {spec.dtype}) "
            f"= {T * bpt:,} bytes in this layer")
    if slots > T:
        note += f"; dashed: rows allocated, not yet written (max_len = {spec.slots:,})"
    for i, line in enumerate(_wrap(note, sk.width)):
        sk.text(0.0, y + _LINE * (i + 0.5), line, gid="cache-total" if i == 0 else None)
    return sk.figure(lambda w: cache_growth(source, tokens, prompt_len=prompt_len, dtype=dtype,
                                            scale_numbers=scale_numbers, width_in=w))


# --- 4. MHA, MQA, GQA and MLA side by side ------------------------------------------------------------

_ARTICLE = ("article/MHA", "article/MQA", "article/GQA", "article/MLA")


def compare_designs(designs: Sequence[Any] | None = None, *, dtype: torch.dtype | str = torch.bfloat16,
                    width_in: float = plots.COLUMN_IN) -> Figure:
    """MHA, MQA, GQA and MLA side by side: which query heads read which catalog, and what each caches.

    One panel per design, read from its config or module: a row of query
    heads, the catalogs they read (a K/V head, key and value halves, under the
    group of query heads that shares it; for MLA one latent and one RoPE key
    that every head reads through its own up-projections), and a bar of the
    numbers one token leaves in one layer's cache. The bars are drawn to one
    scale across the panels and labelled with the count and its bytes in
    ``dtype``; they follow DeepSeek-V2's Table 1 (2·n_h·d_h for MHA, 2·n_g·d_h
    for GQA, 2·d_h for MQA, d_c + d_r for MLA), as
    :func:`kqv.configs.kv_elements_per_token` does.

    Args:
        designs: configs (:class:`kqv.configs.ModelConfig`) or attention modules,
            in the order to draw them; default the source article's four
            (``article/MHA``, ``article/MQA``, ``article/GQA``, ``article/MLA``).
        dtype: the type of the cached numbers, for the bytes.
        width_in: the figure's width in inches.

    Book: chapters 6 and 7 (one catalog, department catalogs), chapter 9 (the showdown).
    """
    designs = [configs.get(n) for n in _ARTICLE] if designs is None else list(designs)
    if not designs:
        raise ValueError("give at least one design to draw")
    shapes = [_shape(d) for d in designs]
    for s in shapes:
        if s.H is None:
            raise ValueError(f"{s.name} is a cache, which does not know its query heads: give a config or module")
    size = configs.dtype_bytes(dtype)
    dtype_name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    sk = _Sketch(width_in)
    roles = [("query", "query head"), ("key", "key"), ("value", "value")]
    if any(s.kind == "MLA" for s in shapes):
        roles += [("latent", "latent c_kv")]
    if any(s.kind == "MLA" and s.d_r for s in shapes):
        roles += [("rope", "RoPE key")]
    y = _legend(sk, 0.0, roles)
    y = _title(sk, y, f"Bars: the numbers one token leaves in one layer's cache, on one scale ({dtype_name}).",
               weight="normal") + 0.1
    notes = [f"{s.numbers_per_token:,} numbers = {_bytes_text(s.numbers_per_token * size)}" for s in shapes]
    note_w = max(_text_width(n) for n in notes) + _GAP + 0.01
    scale = (sk.width - note_w) / max(s.numbers_per_token for s in shapes)
    if scale * max(s.numbers_per_token for s in shapes) < 0.45 * sk.width:  # narrow: notes go under the bars
        scale = (sk.width - 0.02) / max(s.numbers_per_token for s in shapes)
    for i, (s, note) in enumerate(zip(shapes, notes)):
        y = _design_panel(sk, y, s, note, scale, panel=i) + 0.24
    return sk.figure(lambda w: compare_designs(designs, dtype=dtype, width_in=w))


def _design_panel(sk: _Sketch, y: float, s: _Shape, note: str, scale: float, *, panel: int) -> float:
    """One design's panel: title, query heads, catalogs, cache bar. Returns the y below it."""
    H = s.H
    if s.kind == "MLA":
        reads = f"every head reads one latent of {s.d_c:,}" + (f" and one RoPE key of {s.d_r:,}" if s.d_r else "")
    else:
        reads = "each reads its own K/V head" if s.kind == "MHA" else (
            "all share one K/V head" if s.H_kv == 1 else f"{H // s.H_kv} share each of {s.H_kv} K/V heads")
    named = "/" in s.name and not s.name.startswith("article/")
    head = f"{s.kind}" + (f" ({s.name.split('/')[-1]})" if named else "") + f": {H} query heads"
    sk.marker(0.08, y + _LINE / 2, s.kind)
    y = _bold_then(sk, 0.24, y, head, reads, gid=f"design-title-{panel}") + 0.06
    # Query heads, evenly spaced over the width.
    pitch = sk.width / H
    qw, qh = min(pitch * 0.7, 0.3), 0.16
    centers = [(h + 0.5) * pitch for h in range(H)]
    for h, c in enumerate(centers):
        sk.rect(c - qw / 2, y, qw, qh, role="query", lw=0.5, gid=f"query-head-{panel}-{h}")
    q_bottom = y + qh
    y_cat = y + qh + 0.34
    cat_h = 0.2
    if s.kind == "MLA":
        # One latent card and one RoPE key, under all the heads: their widths in proportion.
        span = sk.width * 0.8
        x0 = (sk.width - span) / 2
        w_c = span * s.d_c / (s.d_c + s.d_r)
        sk.rect(x0, y_cat, w_c, cat_h, role="latent", lw=0.6, gid=f"catalog-{panel}-latent")
        if s.d_r:
            sk.rect(x0 + w_c, y_cat, span - w_c, cat_h, role="rope", lw=0.6, gid=f"catalog-{panel}-rope")
        # Every head reads the whole card (through its own W_UK_h, W_UV_h), so every line meets in one point.
        sk.lines([(c, q_bottom, x0 + span / 2, y_cat) for c in centers], lw=0.6, alpha=0.7)
    else:
        g = H // s.H_kv
        for j in range(s.H_kv):
            c = (j + 0.5) * g * pitch
            w = min(g * pitch * 0.8, 0.9)
            sk.rect(c - w / 2, y_cat, w / 2, cat_h, role="key", lw=0.6, gid=f"kv-head-{panel}-{j}")
            sk.rect(c, y_cat, w / 2, cat_h, role="value", lw=0.6)
        sk.lines([(c, q_bottom, (h // g + 0.5) * g * pitch, y_cat) for h, c in enumerate(centers)],
                 lw=0.6, alpha=0.7)
    y = y_cat + cat_h + 0.14
    # The cache bar: what one token leaves in one layer's cache, to one scale for every panel.
    x = 0.0
    for name, role, heads, width in s.pieces():
        w = heads * width * scale
        sk.rect(x, y, max(w, 0.02), _BAR, role=role, lw=0.6, gid=f"cache-bar-{panel}-{name}")
        x += max(w, 0.02)
    if x + _GAP + _text_width(note) <= sk.width:
        sk.text(x + _GAP, y + _BAR / 2, note, gid=f"cache-note-{panel}")
        return y + _BAR
    sk.text(0.0, y + _BAR + 0.04 + _LINE / 2, note, gid=f"cache-note-{panel}")
    return y + _BAR + _LINE + 0.04


# --- 5. MLA's path ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One piece of a flow: text, a vector's bar, an arrow with the matrix it applies, or a shortened bar."""

    kind: str                 # "text", "bar", "arrow" or "long"
    text: str = ""            # the text, the arrow's label or the bar's size label
    numbers: int = 0
    role: str = "hidden"
    weight: str = "normal"
    gid: str | None = None


def _t(text: str, weight: str = "normal") -> _Item:
    return _Item("text", text, weight=weight)


def _v(numbers: int, role: str, gid: str | None = None) -> _Item:
    return _Item("bar", f"{numbers:,}", numbers, role, gid=gid)


def _a(label: str) -> _Item:
    return _Item("arrow", label)


def _item_width(item: _Item, scale: float, long_w: float) -> float:
    if item.kind == "text":
        return _text_width(item.text, item.weight)
    if item.kind == "arrow":
        return max(_text_width(item.text) + 0.1, 0.4)
    if item.kind == "long":
        return max(long_w, _text_width(item.text))
    return max(item.numbers * scale, _text_width(item.text) if item.numbers * scale < _text_width(item.text)
               + 0.08 else 0.0)


def _needs_label_row(item: _Item, scale: float) -> bool:
    """Does the item write anything above its line (an arrow's matrix, a bar's size outside the bar)?"""
    if item.kind in ("arrow", "long"):
        return True
    return item.kind == "bar" and _text_width(item.text) + 0.08 > max(item.numbers * scale, 0.03)


def _flow(sk: _Sketch, y: float, groups: Sequence[Sequence[_Item]], scale: float, *,
          long_w: float = 2.0, indent: float = 0.3) -> float:
    """Lay out groups of items left to right, wrapping between groups; returns the y below.

    A line has a row of labels above it (an arrow's matrix, a bar's size when
    it does not fit inside the bar) only if one of its items needs it.
    """
    lines: list[list[tuple[_Item, float, float]]] = [[]]  # per line: (item, x, width)
    x = 0.0
    for group in groups:
        widths = [_item_width(it, scale, long_w) for it in group]
        need = sum(widths) + _GAP * (len(group) - 1)
        if lines[-1] and x + _GAP + need > sk.width:
            lines.append([])
            x = indent
        elif lines[-1]:
            x += _GAP
        for it, w in zip(group, widths):
            if lines[-1] and x + w > sk.width:  # a group wider than a line breaks between its items
                lines.append([])
                x = indent
            lines[-1].append((it, x, w))
            x += w + _GAP
        x -= _GAP
    for line in lines:
        top = y + (_LINE if any(_needs_label_row(it, scale) for it, _, _ in line) else 0.0)
        mid = top + _BAR / 2
        for it, x, w in line:
            if it.kind == "text":
                sk.text(x, mid, it.text, weight=it.weight, gid=it.gid)
            elif it.kind == "arrow":
                sk.arrow(x + 0.03, mid, x + w - 0.03, mid)
                sk.text(x + w / 2, top - _LINE / 2 + 0.02, it.text, ha="center")
            elif it.kind == "long":  # a bar too long for the scale: drawn shortened, with a break
                cut = x + long_w * 0.62
                sk.rect(x, top, cut - x - 0.04, _BAR, role=it.role, gid=it.gid)
                sk.rect(cut + 0.04, top, long_w - (cut - x) - 0.04, _BAR, role=it.role)
                sk.lines([(cut - 0.07, top + _BAR + 0.04, cut - 0.01, top - 0.04),
                          (cut + 0.01, top + _BAR + 0.04, cut + 0.07, top - 0.04)], lw=1.0)
                sk.text(x, top - _LINE / 2 + 0.02, it.text)
            else:
                bw = max(it.numbers * scale, 0.03)
                bx = x + (w - bw) / 2
                _bar(sk, bx, top, it.numbers, scale, it.role, gid=it.gid)
                if _needs_label_row(it, scale):
                    sk.text(bx + bw / 2, top - _LINE / 2 + 0.02, it.text, ha="center")
                else:
                    sk.text(bx + bw / 2, mid, it.text, ha="center", color=_ink_on(plots.ROLES[it.role]))
        y = top + _BAR + 0.1
    return y


def mla_path(module: MultiHeadLatentAttention | configs.ModelConfig, *,
             width_in: float = plots.COLUMN_IN) -> Figure:
    """Multi-head latent attention, step by step: what is cached, and the two ways to attend. To scale.

    Three parts, read from the module's (or config's) widths:

    1. per token, computed once: the latent ``c_kv = RMSNorm(W_DKV x)`` (d_c
       numbers, cached), the decoupled RoPE key ``k_rope = RoPE(W_KR x)`` (d_r,
       cached, one for all heads) and each head's query ``[q_nope_h ; q_rope_h]``;
    2. the naive path: every head rebuilds its key ``[W_UK_h c_kv ; k_rope]``
       and value ``W_UV_h c_kv`` from the cache, for every cached token;
    3. the absorbed path: W_UK_h folded into the query (``q_lat_h = W_UK_hᵀ
       q_nope_h``, d_c wide), the scores taken against the cache as stored, and
       W_UV_h applied once to the weighted sum of latents, before W_o.

    Bars are to one scale (the hidden vector is drawn shortened). DeepSeek-V2
    (arXiv 2405.04434), section 2.1: equations 9 to 19 and the absorption of
    W_UK into W_Q and of W_UV into W_O; the DeepSeek-V3 reference code
    (inference/model.py, ``attn_impl="absorb"``) caches exactly c_kv (normalized)
    and k_rope.

    Args:
        module: a :class:`kqv.MultiHeadLatentAttention` or an MLA :class:`kqv.configs.ModelConfig`.
        width_in: the figure's width in inches.

    Book: chapter 8 (index cards: the latent, decoupled RoPE, absorption).
    """
    s = _shape(module)
    if s.kind != "MLA" or s.hidden is None:
        raise ValueError(f"mla_path draws multi-head latent attention; {s.name} is {s.kind}")
    H, d_c, d_r, D_nope, D_v = s.H, s.d_c, s.d_r, s.D_nope, s.D_v
    sk = _Sketch(width_in)
    scale = min(0.42 * sk.width, 2.6) / max(d_c, D_nope, D_v, d_r)
    long_w = min(0.55 * sk.width, max(s.hidden * scale, 1.0))
    y = _legend(sk, 0.0, [("hidden", "token x"), ("query", "query"), ("key", "key"), ("value", "value"),
                          ("latent", "latent c_kv"), ("rope", "RoPE part")])
    hidden = (_Item("long", f"{s.hidden:,} (shortened)", s.hidden, "hidden", gid="vector-x")
              if s.hidden * scale > long_w else _v(s.hidden, "hidden", gid="vector-x"))
    q_matrix = "W_Q" if s.d_q is None else f"W_DQ, W_UQ (via {s.d_q:,})"
    rope = [[_t("k_rope"), _v(d_r, "rope", gid="vector-k_rope")], [_t("cached, one for all heads", "bold")]]
    parts = [
        ("1. Each token, once: what is cached", [
            [[_t("x"), hidden]],
            [[_t("x"), _a("W_DKV, RMSNorm")], [_t("c_kv"), _v(d_c, "latent", gid="vector-c_kv")],
             [_t("cached", "bold")]],
            [[_t("x"), _a("W_KR, RoPE")]] + (rope if d_r else [[_t("(no RoPE part: d_r = 0)")]]),
            [[_t("x"), _a(q_matrix)], [_t("q_nope_h"), _v(D_nope, "query", gid="vector-q_nope")]]
            + ([[_t("q_rope_h"), _v(d_r, "rope")]] if d_r else []) + [[_t(f"for each of {H} heads")]],
        ]),
        ("2. Naive: every head rebuilds K and V from the cache, for every cached token", [
            [[_t("c_kv"), _a("W_UK_h")], [_t("k_nope_h"), _v(D_nope, "key", gid="vector-k_nope")]]
            + ([[_t("and k_rope"), _v(d_r, "rope")]] if d_r else []),
            [[_t("c_kv"), _a("W_UV_h")], [_t("v_h"), _v(D_v, "value", gid="vector-v")]],
            [[_t("score = q_h · k_h,")], [_t("o_h = Σ_s w_s v_h,s")]],
        ]),
        ("3. Absorbed: W_UK folded into the query, W_UV into the output", [
            [[_t("q_nope_h"), _v(D_nope, "query"), _a("W_UK_hᵀ")],
             [_t("q_lat_h"), _v(d_c, "query", gid="vector-q_lat")]],
            [[_t("score = q_lat_h · c_kv" + (" + q_rope_h · k_rope" if d_r else ""))]],
            [[_t("Σ_s w_s c_kv,s"), _v(d_c, "latent", gid="vector-o_lat"), _a("W_UV_h")],
             [_t("o_h"), _v(D_v, "value"), _a("W_o"), _t("out")]],
            [[_t(f"The cache is read as stored: one K/V row of {d_c + d_r:,} numbers for all {H} heads.")]],
        ]),
    ]
    y += 0.04
    for title, flows in parts:
        y = _title(sk, y + 0.08, title)
        for groups in flows:
            if len(groups) == 1 and len(groups[0]) == 1 and groups[0][0].kind == "text" \
                    and _text_width(groups[0][0].text) > sk.width:  # a sentence: wrap it
                y = _title(sk, y + 0.02, groups[0][0].text, weight="normal")
                continue
            y = _flow(sk, y, groups, scale, long_w=long_w) + 0.04
    return sk.figure(lambda w: mla_path(module, width_in=w))


# --- 6. Cached decoding, animated ---------------------------------------------------------------------


@torch.no_grad()
def decode_weights(module: Attention | MultiHeadLatentAttention, inputs: torch.Tensor) -> list[torch.Tensor]:
    """Feed ``inputs`` through ``module`` one token per step, with its cache; return each step's weights.

    Step t (0-based) appends token t to the module's own cache
    (:meth:`~kqv.Attention.new_cache`) and attends from its query to the t + 1
    entries now cached, exactly as the module's forward pass does (MLA through
    its absorbed path, which reads the latent cache as stored).

    Args:
        module: a :class:`kqv.Attention` or :class:`kqv.MultiHeadLatentAttention`.
        inputs: the tokens' vectors, (T, hidden) or (1, T, hidden).

    Returns:
        T tensors; entry t has shape (H, t + 1), float32 on the CPU: how much
        each query head of token t attends to each cached token.
    """
    if not isinstance(module, (Attention, MultiHeadLatentAttention)):
        raise TypeError(f"expected a kqv.Attention or kqv.MultiHeadLatentAttention, got {type(module).__name__}")
    if inputs.dim() == 2:
        inputs = inputs.unsqueeze(0)                                         # (1, T, hidden)
    if inputs.dim() != 3 or inputs.shape[0] != 1 or inputs.shape[-1] != module.hidden_size:
        raise ValueError(f"inputs must have shape (T, {module.hidden_size}) or (1, T, {module.hidden_size}), "
                         f"got {tuple(inputs.shape)}")
    weight = next(module.parameters())
    x = inputs.to(device=weight.device, dtype=weight.dtype)
    T = x.shape[1]
    cache = module.new_cache(1, T)
    steps = []
    for t in range(T):
        x_t = x[:, t : t + 1]                                                # (1, 1, hidden)
        if isinstance(module, MultiHeadLatentAttention):
            q, k, v = module._absorbed_qkv(*module.project(x_t, cache=cache))  # (1, H, 1, d_c + d_r), (1, 1, S, ...)
            _, w = scaled_dot_product_attention(q, k, v, is_causal=True, scale=module.scale, return_weights=True)
        else:
            q, k, v = module.project(x_t, cache=cache)                       # (1, H, 1, D), (1, H_kv, S, D)
            _, w = scaled_dot_product_attention(q, k, v, is_causal=True, return_weights=True)
        steps.append(w[0, :, 0].float().cpu())                               # (H, S)
    return steps


#: The small modules that :func:`decode_animation` draws when given none: 64 wide, 4 query heads of 16.
_DEMO = {
    "MHA": dict(num_kv_heads=4),
    "GQA": dict(num_kv_heads=2),
    "MQA": dict(num_kv_heads=1),
    "MLA": dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
}


def demo_module(kind: str, *, seed: int = 0) -> Attention | MultiHeadLatentAttention:
    """A small attention of the given kind with random weights (seeded): hidden 64, 4 query heads of 16.

    "MHA", "GQA" (2 K/V heads), "MQA" (1) or "MLA" (latent 32, RoPE part 8):
    per token they cache 128, 64, 32 and 40 numbers.
    """
    if kind not in _DEMO:
        raise ValueError(f"unknown kind {kind!r}; known: {sorted(_DEMO)}")
    with torch.random.fork_rng(devices=[]):  # the caller's random numbers stay as they were
        torch.manual_seed(seed)
        if kind == "MLA":
            return MultiHeadLatentAttention(64, 4, q_lora_rank=None, **_DEMO[kind]).eval()
        return Attention(64, 4, head_dim=16, rope_theta=10000.0, **_DEMO[kind]).eval()


def _decode_frame(spec: _CacheSpec, tokens: Sequence[str], weights: Sequence[torch.Tensor], step: int, *,
                  scale_numbers: int, title_lines: int, width_in: float) -> Figure:
    """Step ``step`` (1-based) of cached decoding: the cache so far, and the new query's weights."""
    s, T = spec.shape, len(tokens)
    H = weights[0].shape[0]
    pieces = s.pieces()
    sk = _Sketch(width_in)
    y = _title(sk, 0.0, _step_title(s, H, tokens, step), lines=title_lines)
    y = _legend(sk, y, _piece_names(pieces) + [("query", "weight of the new query, per head")])
    # Columns: tokens | cache row, to scale | the new query's weights, one column per head (grouped).
    tok_w = max(_text_width(t) for t in tokens) + 0.08
    x_cache = tok_w + 0.08
    groups = 1 if s.kind == "MLA" else s.H_kv
    per_group = H // groups
    room = sk.width - x_cache - 0.3 - 0.06 * (len(pieces) - 1) - 0.08 * (groups - 1)
    cell = min(0.5, max(0.14, (room - 1.0) / H))
    numbers = cell >= 0.44  # room to write each weight in its cell
    cache_w = min(room - H * cell, 2.4)
    scale = cache_w / scale_numbers
    x_w = x_cache + cache_w + 0.06 * (len(pieces) - 1) + 0.3
    col_x = [x_w + h * cell + (h // per_group) * 0.08 for h in range(H)]
    # Above the weights: which catalog each group of query heads reads, then the heads themselves.
    y += 0.06
    for gi in range(groups):
        a, b = col_x[gi * per_group], col_x[gi * per_group + per_group - 1] + cell
        label = "c_kv, k_rope" if s.kind == "MLA" else f"K{gi + 1} V{gi + 1}"
        if _text_width(label) > b - a:
            label = "latent" if s.kind == "MLA" else f"{gi + 1}"
        if _text_width(label) > b - a + 0.06:
            label = ""
        sk.text((a + b) / 2, y + _LINE / 2, label, ha="center", gid=f"reads-{gi}")
        sk.lines([(a + 0.02, y + _LINE + 0.02, b - 0.02, y + _LINE + 0.02),
                  (a + 0.02, y + _LINE + 0.02, a + 0.02, y + _LINE + 0.08),
                  (b - 0.02, y + _LINE + 0.02, b - 0.02, y + _LINE + 0.08)], lw=0.9)
    y += _LINE + 0.12
    for h in range(H):
        name = f"q{h + 1}" if _text_width(f"q{h + 1}") + 0.06 <= cell else (str(h + 1) if cell >= 0.16 else "")
        sk.rect(col_x[h] + 0.02, y, cell - 0.04, 0.2, role="query", lw=0.6, gid=f"query-head-{h}")
        if name:
            sk.text(col_x[h] + cell / 2, y + 0.1, name, ha="center", color=_ink_on(plots.ROLES["query"]))
    if s.kind != "MLA":
        cache_headers = [(f"{n}{j + 1}", j) for n, _, heads, _ in pieces for j in range(heads)]
        widths = [width * scale for _, _, heads, width in pieces for _ in range(heads)]
        if all(_text_width(t) + 0.04 <= w for (t, _), w in zip(cache_headers, widths)):
            x = x_cache
            for i, ((t, _), w) in enumerate(zip(cache_headers, widths)):
                sk.text(x + w / 2, y + 0.1, t, ha="center")
                x += w + (0.06 if (i + 1) == s.H_kv else 0.0)
    y += 0.3
    # The rows: cached tokens, the new one outlined, then the rows still empty.
    w_now = weights[step - 1]
    row_h, pitch = 0.22, 0.28
    for r in range(T):
        yy = y + r * pitch
        filled = r < step
        if filled:
            sk.text(tok_w, yy + row_h / 2, tokens[r], ha="right", weight="bold" if r == step - 1 else "normal")
        total = _cache_row(sk, x_cache, yy, row_h, pieces, scale, filled=filled, row=r)
        if r == step - 1:
            sk.rect(x_cache - 0.04, yy - 0.04, total + 0.08, row_h + 0.08, lw=2.0, gid="new-entry")
        if filled:
            for h in range(H):
                w = float(w_now[h, r])
                if w >= 0.02:  # a cell as opaque as the weight is large
                    sk.rect(col_x[h] + 0.02, yy, cell - 0.04, row_h, fill=plots.ROLES["query"], alpha=w,
                            edge=None)
                if numbers and w >= 0.005:  # blank: rounds to .00
                    sk.text(col_x[h] + cell / 2, yy + row_h / 2, f"{w:.2f}"[1:] if w < 1 else "1.0",
                            ha="center", color=plots.DARK if w > 0.45 else plots.INK)
    y += T * pitch + 0.04
    note = (f"{step} of {T} rows written, {spec.bytes_per_token:,} bytes each ({spec.dtype}); "
            f"cells: the share of each head's attention that goes to each row"
            + (" (blank: under 0.005)." if numbers else "."))
    _title(sk, y, note, weight="normal", lines=3 if sk.width < 4 else 2)
    return sk.figure(lambda w: _decode_frame(spec, tokens, weights, step, scale_numbers=scale_numbers,
                                             title_lines=_title_lines(spec, tokens, H, w), width_in=w))


_MPL_FONTS = ("'DejaVu Sans', 'Bitstream Vera Sans', 'Computer Modern Sans Serif', 'Lucida Grande', 'Verdana', "
              "'Geneva', 'Lucid', 'Arial', 'Helvetica', 'Avant Garde', sans-serif")
_FONTS = "'DejaVu Sans', 'Bitstream Vera Sans', 'Lucida Grande', Verdana, Geneva, Arial, Helvetica, sans-serif"


def _compact(svg: str) -> str:
    """The same picture in fewer bytes: an animation stores every frame in the page.

    Drops matplotlib's metadata block, the line breaks inside path data and
    between elements, the wrapper group of each shape and each text (all but
    the figure's own background, which the site recognises to make it
    transparent in dark mode), the digits of coordinates past the second
    decimal (a hundredth of a point), the identity rotation of each text and
    the rare fonts of matplotlib's list of fallbacks (DejaVu Sans, whose
    widths the layout measured, and its look-alikes stay first).
    """
    import re

    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r'd="([^"]*)"', lambda m: 'd="' + " ".join(m.group(1).split()) + '"', svg)
    svg = re.sub(r'( d="[^"]*"| [xy]="[-0-9.]*")', lambda m: re.sub(r"(\d+\.\d\d)\d+", r"\1", m.group(1)), svg)
    svg = re.sub(r' transform="rotate\(-?0 [-0-9.]+ [-0-9.]+\)"', "", svg)
    # A rectangle, M a b L c b L c d L a d z, as M a b H c V d H a z.
    svg = re.sub(r'd="M ([-0-9.]+) ([-0-9.]+) L ([-0-9.]+) \2 L \3 ([-0-9.]+) L \1 \4 z"',
                 r'd="M \1 \2 H \3 V \4 H \1 z"', svg)
    svg = svg.replace(_MPL_FONTS, _FONTS)
    svg = re.sub(r">\s+<", "><", svg)
    return re.sub(r'<g id="(?:patch|text)_(\d+)">(<path [^>]*/>|<text [^>]*>[^<]*</text>)</g>',
                  lambda m: m.group(0) if m.group(1) == "1" else m.group(2), svg)


def _title_lines(spec: _CacheSpec, tokens: Sequence[str], H: int, width_in: float) -> int:
    """The most lines any step's title takes at this width (every frame reserves as many)."""
    sk = _Sketch(width_in)
    return max(len(_wrap(_step_title(spec.shape, H, tokens, step), sk.width, "bold"))
               for step in range(1, len(tokens) + 1))


def _step_title(s: _Shape, H: int, tokens: Sequence[str], step: int) -> str:
    token = tokens[step - 1].strip() or repr(tokens[step - 1])
    entries = "the only entry" if step == 1 else f"all {step} entries"
    reads = {
        "MLA": f"its {H} query heads all read {entries} through the shared latent",
        "MQA": f"its {H} query heads all read the one K/V head in {entries}",
        "MHA": f"each of its {H} query heads reads its own K/V head in {entries}",
    }.get(s.kind, f"each group of {H // max(s.H_kv, 1)} query heads reads its K/V head in {entries}")
    return f'Step {step} of {len(tokens)}: "{token}" is appended to the cache; {reads}.'



def decode_animation(kind: str = "GQA", *, module: Attention | MultiHeadLatentAttention | None = None,
                     inputs: torch.Tensor | None = None, tokens: Sequence[str] = SENTENCE,
                     interval: int = 1200, width_in: float = plots.COLUMN_IN) -> HTML:
    """Cached decoding of the running sentence, one step per token: a slider and a play button.

    Each frame is one decoding step: the new token's row is appended to the
    cache (its keys and values per K/V head, or MLA's latent and RoPE key, to
    scale), and its query heads read every row: each head's attention weights
    over the rows, computed with kqv (:func:`decode_weights`), are shaded in
    the query's colour, and brackets say which K/V head (or the latent) each
    group of query heads reads. The rows not yet written are dashed: the cache
    is allocated for the whole sentence at the start.

    It is an explorer drawn in advance (:func:`kqv.explore.frames`), so it plays
    on the book's pages and in a notebook without a kernel.

    Args:
        kind: "MHA", "GQA", "MQA" or "MLA"; checked against ``module`` if both are given.
        module: the attention to run; default :func:`demo_module` of ``kind``
            (random weights, so the pattern of the weights is arbitrary).
        inputs: (T, hidden) vectors, one per token; default random (seeded). For
            a real model's layer ``l``, pass what that layer's attention sees:
            ``model.layers[l].input_layernorm(heads.hidden_states(model, ids)[l])[0]``.
        tokens: one label per token (the running sentence by default).
        interval: milliseconds between steps when playing.
        width_in: the pictures' width in inches.

    Returns:
        The HTML output (the last line of a cell shows it).

    Book: chapter 4 (the cache grows), chapters 6 to 8 (what each design caches).
    """
    from . import explore

    if kind not in _DEMO:
        raise ValueError(f"unknown kind {kind!r}; known: {sorted(_DEMO)}")
    demo = module is None
    module = demo_module(kind) if demo else module
    shape = _shape(module)
    if shape.kind != kind:
        raise ValueError(f"kind={kind!r} but the module is {shape.kind} "
                         f"({shape.H} query heads, {shape.H_kv} K/V heads)")
    T = len(tokens)
    if not 1 <= T <= explore.MAX_FRAMES:
        raise ValueError(f"one frame per token: give 1 to {explore.MAX_FRAMES} tokens, got {T}")
    if inputs is None:  # random vectors, three times the usual size so that the weights are not all alike
        g = torch.Generator().manual_seed(1)
        inputs = 3 * torch.randn(T, module.hidden_size, generator=g)         # (T, hidden)
    if inputs.shape[-2] != T:
        raise ValueError(f"{T} tokens but inputs for {inputs.shape[-2]}")
    weights = decode_weights(module, inputs)
    spec = _cache_spec(module)
    scale_numbers = max(_shape(demo_module("MHA")).numbers_per_token, shape.numbers_per_token) if demo \
        else shape.numbers_per_token  # the demos share one scale, so their rows compare
    title_lines = _title_lines(spec, tokens, shape.H, width_in)
    steps = [f"{i}: {t.strip() or repr(t)}" for i, t in enumerate(tokens, start=1)]

    def draw(step: str) -> plots.Rendition:
        drawn = plots.renditions(_decode_frame(spec, tokens, weights, steps.index(step) + 1,
                                               scale_numbers=scale_numbers, title_lines=title_lines,
                                               width_in=width_in))
        return plots.Rendition(_compact(drawn.wide), drawn.narrow and _compact(drawn.narrow), drawn.width_px)

    def alt(step: str) -> str:
        t = steps.index(step) + 1
        w = weights[t - 1]
        best = int(w[0].argmax())
        return (f"Step {t} of {T} of cached decoding with {kind}: the cache holds {t} of its {T} rows, one per "
                f"token; the new token {tokens[t - 1].strip()!r} has {shape.H} query heads, shaded by how much "
                f"each attends to each row; head 1 gives {float(w[0, best]):.0%} to {tokens[best].strip()!r}.")

    what = "a small " + kind + " with random weights (the pattern of the weights is arbitrary)" if demo else \
        f"{shape.name} ({kind})"
    return explore.frames(
        draw, alt=alt, play="step", interval=interval,
        controls={"step": explore.Slider("step", steps, value=steps[-1])},
        note=f"Drawn in advance, one picture per step: {what}, weights computed with kqv.",
    )
