"""Figures for the book: one palette, one look per design, and the helpers every chapter reuses.

Chapters import this module instead of pasting plotting code between notebooks::

    from kqv import plots
    plots.use_style()                          # palette, fonts, sizes (once, in the set-up cell)

    fig, ax = plt.subplots()
    plots.bars(ax, ["Crust", "Mantle", "Core"], [2.0, 2.0, 3.0], highlight=2)
    plots.glue_figure("fig-scores", fig)       # the figure, placed in the prose by {glue:figure}
    plots.glue_number("best_score", 3.0)       # a number, placed in the prose by {glue:text}

    ax.plot(x, y, **plots.look("MQA"))         # every design has one colour and one marker

Figures are SVG: sharp on any screen, with real text. Their text is never smaller
than :data:`MIN_FONT_PT` (the size of the site's small print) and figures are
drawn for the page's column (:data:`COLUMN_IN` wide at most). Each figure is also
re-laid out for a phone's column (:func:`renditions`), and the site shows the one
that fits, so the text never has to shrink. On the site figures follow the light
or dark mode: pure black (:data:`INK`) becomes the text colour and the white paper
becomes transparent; use :data:`DARK` for text that must stay dark (on a light
cell of a heatmap, say).

When the book is built (``KQV_BOOK_BUILD=1``, set by ``make notebooks`` and
``make test``) figures and numbers are stored for the prose with myst-nb's glue
and the cell shows nothing; anywhere else (Colab, JupyterLab) the cell simply
shows its figure, and re-running it redraws it.

Interactive figures come in two kinds:

- :func:`explorer` builds an ipywidgets panel that recomputes with ``kqv`` and
  redraws when a control moves (it needs a running kernel), together with the
  same panel drawn in advance for every combination of its controls, which works
  in the page with no kernel (:func:`kqv.explore.frames`);
- :mod:`kqv.explore` has components that compute in the browser itself.

Colours come from the Okabe-Ito palette, which stays distinguishable under the
common forms of colour blindness; matrices use the ``cividis`` colour map, which
was designed for the same purpose and reads in greyscale too.

Everything here is deterministic: no random ids and no timestamps end up in a
notebook's outputs, so regenerating a chapter rewrites the same bytes.
"""

from __future__ import annotations

import html
import io
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

if TYPE_CHECKING:  # imported lazily at run time: kqv itself needs neither
    import ipywidgets
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "OKABE_ITO",
    "COLORS",
    "SEQUENTIAL",
    "INK",
    "DARK",
    "DESIGNS",
    "SERIES",
    "ROLES",
    "look",
    "MIN_FONT_PT",
    "COLUMN_IN",
    "NARROW_IN",
    "use_style",
    "bars",
    "heatmap",
    "to_svg",
    "Rendition",
    "renditions",
    "check_text_sizes",
    "svg_font_sizes",
    "plain_log_ticks",
    "building_book",
    "glue_figure",
    "glue_number",
    "explorer",
]

#: The Okabe-Ito palette (Okabe and Ito, 2008), eight colours that people with
#: the common colour-vision deficiencies can tell apart.
OKABE_ITO: dict[str, str] = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky blue": "#56B4E9",
    "bluish green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish purple": "#CC79A7",
}

#: The order in which lines and bars take colours, strong contrasts first.
COLORS: list[str] = [
    OKABE_ITO[name]
    for name in ("blue", "orange", "bluish green", "vermillion", "reddish purple", "sky blue", "black", "yellow")
]

#: The colour map for matrices (attention weights, scores), perceptually uniform
#: and colour-blind safe.
SEQUENTIAL = "cividis"

#: Text, axes and ticks. On the site it becomes the page's text colour (light in dark mode).
INK = "#000000"
#: A black that stays black in dark mode (text on a light matrix cell).
DARK = "#1a1a1a"

#: One look per design, the same in every chapter: the reader learns the legend once.
#: "latent" is a GQA model converted to low-rank latent keys and values without
#: MLA's decoupled RoPE (chapter 8); converted models with decoupled RoPE are MLA.
DESIGNS: dict[str, dict[str, str]] = {
    "MHA": {"color": OKABE_ITO["blue"], "marker": "o", "label": "MHA"},
    "GQA": {"color": OKABE_ITO["bluish green"], "marker": "s", "label": "GQA"},
    "MQA": {"color": OKABE_ITO["vermillion"], "marker": "^", "label": "MQA"},
    "MLA": {"color": OKABE_ITO["reddish purple"], "marker": "D", "label": "MLA"},
    "latent": {"color": OKABE_ITO["orange"], "marker": "v", "label": "latent K/V"},
}

#: Looks for series that are not designs (prefill and decode, with and without sinks, one
#: scaling rule or another): colours and markers that no design uses, so that a reader who
#: learned :data:`DESIGNS` never takes such a line for MHA or MQA. The ink follows the theme
#: on the site (it becomes the text colour in dark mode); the line styles tell the series
#: apart without colour too (none is dotted: dotted lines mark references, such as a full cache).
SERIES: tuple[dict[str, str], ...] = (
    {"color": INK, "marker": "X", "linestyle": "-"},
    {"color": OKABE_ITO["sky blue"], "marker": "P", "linestyle": "--"},
    {"color": INK, "marker": "p", "linestyle": "-."},
)

#: One colour per role in the concept diagrams (:mod:`kqv.diagrams`), the same in every chapter:
#: a query is always reddish purple, a key yellow, a value sky blue (the roles of Jay Alammar's
#: "Illustrated Transformer"), MLA's cached latent blue and the decoupled RoPE part vermillion.
#: "hidden" (the token's vector x and the layer's output) is a tint of the ink. These five
#: Okabe-Ito colours are, of all choices of five, the set whose closest pair stays furthest apart
#: (CIELAB distance at least 20) under simulated protanopia, deuteranopia and tritanopia
#: (Machado et al. 2009), because all five meet in one figure (MLA's path). Where designs are
#: compared, the design's own colour (:data:`DESIGNS`) marks its name only.
ROLES: dict[str, str] = {
    "hidden": INK,
    "query": OKABE_ITO["reddish purple"],
    "key": OKABE_ITO["yellow"],
    "value": OKABE_ITO["sky blue"],
    "latent": OKABE_ITO["blue"],
    "rope": OKABE_ITO["vermillion"],
}

#: The smallest text a figure may show, in points: 10.8 pt is 14.4 CSS pixels, the
#: size of the site's small print (``<small>``, 0.9 rem).
MIN_FONT_PT = 10.8
#: The widest a figure is drawn, in inches (96 CSS pixels each): the site's column is 768 px.
COLUMN_IN = 7.6
#: The width a figure is re-laid out to for a phone's column (about 340 px).
NARROW_IN = 3.5

_BASE = OKABE_ITO["blue"]
_HIGHLIGHT = OKABE_ITO["orange"]
BUILD_ENV = "KQV_BOOK_BUILD"


def look(design: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``ax.plot`` / ``ax.scatter`` that draw ``design`` in its colour and marker.

    ``design`` is one of :data:`DESIGNS` ("MHA", "GQA", "MQA", "MLA", "latent");
    ``overrides`` replace or add keywords (``label=...``, ``linestyle=...``).
    """
    if design not in DESIGNS:
        raise ValueError(f"unknown design {design!r}; known: {sorted(DESIGNS)}")
    return {**DESIGNS[design], **overrides}


def use_style() -> None:
    """Set the book's matplotlib look: palette, colour map, sizes, SVG, no chart junk."""
    import matplotlib as mpl
    from cycler import cycler

    size = 11.0
    mpl.rcParams.update(
        {
            "axes.prop_cycle": cycler(color=COLORS),
            "image.cmap": SEQUENTIAL,
            "figure.figsize": (6.4, 3.4),
            "figure.dpi": 100,
            "savefig.dpi": 200,  # the raster parts of an SVG (a heatmap's image), sharp at 2x
            "font.size": size,
            "axes.titlesize": size,
            "axes.labelsize": size,
            "xtick.labelsize": size,
            "ytick.labelsize": size,
            "legend.fontsize": size,
            "legend.title_fontsize": size,
            "figure.titlesize": size,
            "text.color": INK,
            "axes.labelcolor": INK,
            "axes.edgecolor": INK,
            "xtick.color": INK,
            "ytick.color": INK,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": False,
            "legend.frameon": False,
            "figure.constrained_layout.use": True,
            "svg.fonttype": "none",  # real text: selectable, measurable, sharp
            "svg.hashsalt": "kqv",  # ids from content, not random: the same bytes every run
        }
    )


def bars(
    ax: Axes,
    labels: Sequence[str],
    values: Iterable[float],
    *,
    highlight: int | Sequence[int] | None = None,
    fmt: str = "{:.2f}",
    annotate: bool = True,
    ylabel: str | None = None,
    title: str | None = None,
    ylim: tuple[float, float] | None = None,
) -> Any:
    """A bar chart with the value written over each bar.

    Args:
        ax: where to draw.
        labels: one label per bar.
        values: one height per bar (floats, or a 1-D tensor or array).
        highlight: index or indices of bars drawn in the highlight colour
            (orange) instead of the base colour (blue); annotated in bold.
        fmt: format of the annotations.
        annotate: write the values over the bars.
        ylabel, title, ylim: passed to the axes.

    Returns:
        The matplotlib ``BarContainer``.
    """
    values = [float(v) for v in _as_list(values)]
    if len(values) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(values)} values")
    marked = set() if highlight is None else {highlight} if isinstance(highlight, int) else set(highlight)
    colors = [_HIGHLIGHT if i in marked else _BASE for i in range(len(values))]
    container = ax.bar(range(len(values)), values, color=colors)
    if annotate:
        ax.margins(y=0.15)  # room for the numbers over the bars, below the title
    ax.set_xticks(range(len(values)), labels)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if annotate:
        for i, (rect, v) in enumerate(zip(container, values)):
            ax.annotate(
                fmt.format(v),
                (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontweight="bold" if i in marked else "normal",
            )
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return container


def heatmap(
    ax: Axes,
    matrix: Any,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    annotate: bool = True,
    fmt: str = "{:.2f}",
    vmin: float | None = 0.0,
    vmax: float | None = None,
    cmap: str = SEQUENTIAL,
    colorbar: bool = True,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
) -> Any:
    """A matrix as coloured cells (attention weights: rows are queries, columns keys).

    Each annotation is written in black (:data:`DARK`, which stays black in dark
    mode) or white, whichever contrasts more with its cell; at the book's text
    size a cell must be about 0.45 in wide to hold "0.00". ``matrix`` may be a tensor (moved to the CPU), an array or nested lists.

    Returns:
        The ``AxesImage``.
    """
    import numpy as np

    m = np.asarray(_to_numpy(matrix), dtype=float)
    if m.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D matrix, got shape {m.shape}")
    image = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    rows, cols = m.shape
    ax.set_xticks(range(cols), col_labels if col_labels is not None else range(cols))
    ax.set_yticks(range(rows), row_labels if row_labels is not None else range(rows))
    if col_labels is not None and max((len(str(c)) for c in col_labels), default=0) > 3:
        ax.tick_params(axis="x", labelrotation=45)
    ax.spines[:].set_visible(False)
    if annotate:
        for (r, c), v in np.ndenumerate(m):
            red, green, blue, _ = image.cmap(image.norm(v))
            luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
            ax.text(c, r, fmt.format(v), ha="center", va="center",
                    color=DARK if luminance > 0.5 else "#ffffff")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, shrink=0.8)
    if title:
        ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    return image


def to_svg(fig: Figure, *, width_in: float | None = None) -> str:
    """The figure as SVG text, cropped to its contents, the same bytes on every run.

    ``width_in`` re-lays the figure out at another width first (constrained
    layout moves the axes; text keeps its size) and restores it afterwards.
    """
    size = fig.get_size_inches().copy()
    if width_in is not None:
        fig.set_size_inches(width_in, size[1] * max(1.0, min(1.35, size[0] / width_in / 1.6)))
    try:
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    finally:
        fig.set_size_inches(size)
    svg = buffer.getvalue()
    # The XML prologue and the comments name no content; drop them so the text embeds anywhere.
    svg = re.sub(r"^<\?xml[^>]*>\s*", "", svg)
    svg = re.sub(r"<!DOCTYPE[^>]*>\s*", "", svg)
    return svg


def check_text_sizes(fig: Figure) -> None:
    """Raise if any visible text of ``fig`` is smaller than :data:`MIN_FONT_PT` (or a figure is too wide)."""
    width = float(fig.get_size_inches()[0])
    if width > COLUMN_IN + 1e-6:
        raise ValueError(f"the figure is {width:.2f} in wide; the page's column holds {COLUMN_IN} in")
    small = sorted(
        {f"{t.get_text()!r} at {t.get_fontsize():.1f} pt" for t in fig.findobj(_is_text)
         if t.get_visible() and t.get_text().strip() and t.get_fontsize() < MIN_FONT_PT - 1e-6}
    )
    if small:
        raise ValueError(f"text smaller than {MIN_FONT_PT} pt is unreadable on the page: " + ", ".join(small[:6]))
    # SVG text is drawn by the reader's browser, which lacks the fonts that matplotlib's mathtext builds
    # radicals and fractions from: write them in Unicode (q·k/√d) instead.
    built = sorted({t.get_text() for t in fig.findobj(_is_text)
                    if t.get_visible() and re.search(r"\\(sqrt|frac|dfrac|tfrac|sum|int|prod)\b", t.get_text())})
    if built:
        raise ValueError(f"write these with Unicode, not mathtext (the browser draws SVG text): {built[:4]}")


def _is_text(artist: Any) -> bool:
    from matplotlib.text import Text

    return isinstance(artist, Text)


@dataclass
class Rendition:
    """A figure drawn for the page's column (``wide``) and for a phone's (``narrow``, or None)."""

    wide: str
    narrow: str | None
    width_px: float


def _svg_width_px(svg: str) -> float:
    match = re.search(r'<svg[^>]*\swidth="([0-9.]+)pt"', svg)
    return round(float(match.group(1)) * 4 / 3, 1) if match else 0.0


def renditions(fig: Figure, *, narrow: bool = True) -> Rendition:
    """Check the figure's text sizes, then draw it wide and (unless ``narrow=False``) narrow; close it.

    The narrow rendition is the same figure re-laid out :data:`NARROW_IN` wide,
    which fits a phone's column without shrinking its text. A figure that
    carries ``fig.kqv_relayout`` (a function of a width in inches that returns
    a new figure, as :mod:`kqv.diagrams` sets) is drawn again at that width
    instead. Pass ``narrow=False`` for figures that cannot be re-laid out (a
    wide matrix of numbers): on a phone those scroll sideways in their own box
    instead.
    """
    import matplotlib.pyplot as plt

    check_text_sizes(fig)
    try:
        wide = to_svg(fig)
        _check_svg_text(wide)
        small = _narrow_svg(fig) if narrow else None
    finally:
        plt.close(fig)
    return Rendition(wide, small, _svg_width_px(wide))


def svg_font_sizes(svg: str) -> list[float]:
    """The sizes (pt) of all text in a matplotlib SVG, mathtext's pieces included; symbol fonts left out."""
    sizes = []
    for style in re.findall(r'<(?:text|tspan)\b[^>]*style="([^"]*font-size[^"]*)"', svg):
        if "STIXSize" in style:
            continue  # pieces of a drawn symbol (a radical's stroke), not text
        match = re.search(r"font-size:\s*([0-9.]+)px", style)
        if match:
            sizes.append(float(match.group(1)))
    return sizes


def _check_svg_text(svg: str) -> None:
    """Catch the small text that check_text_sizes cannot see: mathtext super- and subscripts (2^10 on a log axis)."""
    small = sorted({size for size in svg_font_sizes(svg) if size < MIN_FONT_PT - 1e-6})
    if small:
        raise ValueError(
            f"the figure has text at {small} pt, below {MIN_FONT_PT} pt: mathtext exponents or subscripts? "
            "On a log axis, label the ticks with plain numbers (plots.plain_log_ticks)."
        )


def plain_log_ticks(axis: Any, base: int = 2) -> None:
    """Label a log-scaled axis with plain numbers (16, 64, 1,024), not 2^4: exponents would be too small to read."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis.set_major_locator(LogLocator(base=base))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _narrow_svg(fig: Figure) -> str | None:
    """The figure re-laid out for a phone, or None if it is narrow already or its tick labels would collide."""
    if fig.get_size_inches()[0] <= NARROW_IN:
        return None
    relayout = getattr(fig, "kqv_relayout", None)
    if relayout is not None:  # a figure that lays itself out for a given width (kqv.diagrams): ask it
        return _relayout_svg(relayout)
    size = fig.get_size_inches().copy()
    labels = [t for ax in fig.axes for t in ax.get_xticklabels()]
    rotations = [(t, t.get_rotation(), t.get_horizontalalignment()) for t in labels]
    try:
        fig.set_size_inches(NARROW_IN, size[1] * max(1.0, min(1.35, size[0] / NARROW_IN / 1.6)))
        if _labels_collide(fig):  # try slanted category labels before giving up
            for t in labels:
                t.set_rotation(40)
                t.set_horizontalalignment("right")
            if _labels_collide(fig):
                return None
        fig.set_size_inches(size)
        svg = to_svg(fig, width_in=NARROW_IN)
        # A legend or label outside the axes can make the cropped picture wider than a phone's column.
        return svg if _svg_width_px(svg) <= NARROW_IN * 96 * 1.04 else None
    finally:
        fig.set_size_inches(size)
        for t, rotation, align in rotations:
            t.set_rotation(rotation)
            t.set_horizontalalignment(align)


def _relayout_svg(relayout: Callable[[float], Figure]) -> str:
    """The SVG of ``relayout(NARROW_IN)``: the figure drawn again for a phone's column, checked, closed."""
    import matplotlib.pyplot as plt

    small = relayout(NARROW_IN)
    try:
        check_text_sizes(small)
        svg = to_svg(small)
        _check_svg_text(svg)
    finally:
        plt.close(small)
    return svg


def _labels_collide(fig: Figure) -> bool:
    """Do two tick labels of one axis overlap (after layout at the figure's current size)?"""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    import math

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            shown = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text().strip()]
            slanted = [t for t in shown if t.get_rotation() % 180]
            if slanted:  # parallel slanted labels collide when their anchors are closer than a line apart
                angle = math.radians(slanted[0].get_rotation() % 180)
                xs = sorted(t.get_window_extent(renderer).x1 for t in slanted)
                line = slanted[0].get_fontsize() * fig.dpi / 72 * 1.25 / max(math.sin(angle), 0.1)
                if any(b - a < line for a, b in zip(xs, xs[1:])):
                    return True
                continue
            boxes = [t.get_window_extent(renderer) for t in shown]
            boxes.sort(key=lambda b: (b.x0, b.y0))
            for a, b in zip(boxes, boxes[1:]):
                if a.overlaps(b):
                    return True
    return False


def building_book() -> bool:
    """True while ``make notebooks`` or ``make test`` runs a chapter (``KQV_BOOK_BUILD=1``)."""
    return os.environ.get(BUILD_ENV) == "1"


def _figure_bundle(svg: str) -> dict[str, str]:
    return {"image/svg+xml": svg, "text/plain": "<Figure>"}


def glue_figure(name: str, fig: Figure, *, narrow: bool = True) -> None:
    """Show a figure where the prose places it (the book), or right here (a notebook); close it.

    While the book is built the figure is stored under ``name`` and placed in a
    Markdown cell with its caption and alt text::

        ```{glue:figure} fig-scores
        :alt: Bar chart: the page "Core" scores 3, Crust and Mantle 2, ...
        :name: fig-scores

        Caption, referred to elsewhere as {numref}`fig-scores`.
        ```

    and the cell itself shows nothing, so the figure appears once, where the
    prose puts it. The rendition for phones is stored as ``name + "--narrow"``
    (see :func:`renditions`). Anywhere else the cell shows the figure.
    """
    drawn = renditions(fig, narrow=narrow)
    if not building_book():
        from IPython.display import display

        display(_figure_bundle(drawn.wide), raw=True)
        return
    _glue(name, _figure_bundle(drawn.wide))
    if drawn.narrow is not None:
        _glue(name + "--narrow", _figure_bundle(drawn.narrow))


def glue_number(name: str, value: Any, digits: int | None = 3) -> None:
    """Store a number under ``name`` for the prose, rounded to ``digits`` decimals.

    In a Markdown cell, ``{glue:text}`name:.2f``` prints it with a format of the
    prose's choosing. Rounding here keeps the stored text stable: the last bits
    of a float can change with the thread count, its first three decimals do not.
    A tensor with one element is turned into a Python number first. Nothing is
    shown in the cell (and nothing is returned, so a cell may end with it); outside
    the book's build it does nothing.
    """
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and digits is not None:
        value = round(value, digits)
        if value == 0:
            value = 0.0  # never -0.0
    if building_book():
        _glue(name, value)


def jshtml_slider(fig: Figure, update: Callable[[Any], Any], frames: Sequence[Any], *, alt: str,
                  label: str = "", format: str = "{}", interval: int = 900) -> Any:
    """A slider over ``frames`` that works in the page with no kernel (see :func:`kqv.explore.frames`).

    ``update(frame)`` redraws ``fig`` for one frame; it is called once per frame,
    in order, and the pictures are stored in the page. ``label`` names the slider
    and ``format`` shows its value. The figure is closed.
    """
    import matplotlib.pyplot as plt

    from . import explore

    values = list(frames)
    pictures = []
    try:
        for value in values:
            update(value)
            check_text_sizes(fig)
            wide = to_svg(fig)
            _check_svg_text(wide)
            narrow = _narrow_svg(fig)
            pictures.append(Rendition(wide, narrow, _svg_width_px(wide)))
    finally:
        plt.close(fig)
    return explore.frames(lambda frame: pictures[values.index(frame)], alt=alt,
                          controls={"frame": explore.Slider(label, values, format=format)},
                          interval=interval)


def explorer(draw: Callable[..., Figure], *, alt: str, predraw: dict[str, Sequence[Any]] | None = None,
             note: str | None = None, **controls: ipywidgets.ValueWidget) -> Any:
    """An explorer: ipywidgets ``controls`` over ``draw(**values)``'s figure, live in a notebook
    and drawn in advance for the page.

    ``draw`` receives each control's value under the control's keyword and
    returns a matplotlib figure (closed here). In a running notebook it is called
    again whenever a control moves. For pages without a kernel (the book's site,
    a notebook opened without running it) every combination of the controls'
    options is drawn in advance (:func:`kqv.explore.frames`): sliders over a
    list (``SelectionSlider``), drop-downs, toggle buttons and checkboxes give
    their options; for a continuous slider (``FloatSlider``, ``IntSlider``) give
    the values to draw in ``predraw={"name": [...]}``.

    The displayed output carries both: front ends with a live kernel show the
    ipywidgets panel, the site shows the drawn-in-advance one. Works with
    ipywidgets 7 (Colab) and 8.
    """
    import ipywidgets as widgets

    from . import explore

    if not controls:
        raise ValueError("an explorer needs at least one control")
    predraw = dict(predraw or {})
    unknown = set(predraw) - set(controls)
    if unknown:
        raise ValueError(f"predraw names {sorted(unknown)}, which are not controls ({sorted(controls)})")
    page_controls: dict[str, explore.Control] = {}
    for name, control in controls.items():
        page_controls[name] = _page_control(name, control, predraw.get(name))

    out = widgets.Output(layout=widgets.Layout(min_height="200px"))

    def redraw(change: Any = None) -> None:
        drawn = renditions(draw(**{n: c.value for n, c in controls.items()}), narrow=False)
        out.outputs = (
            {"output_type": "display_data", "data": _figure_bundle(drawn.wide), "metadata": {}},
        )

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    panel = widgets.VBox([widgets.HBox(list(controls.values()),
                                       layout=widgets.Layout(flex_flow="row wrap")), out])
    page = explore.frames(draw, alt=alt, controls=page_controls,
                          note=note or "Drawn in advance for this page; in a running notebook "
                                       "(Colab, Binder) the controls recompute with kqv.")
    return _Explorer(panel, page.data, alt)


def _page_control(name: str, control: Any, values: Sequence[Any] | None) -> Any:
    """The drawn-in-advance twin of an ipywidgets control."""
    from . import explore

    label = getattr(control, "description", "") or name
    kind = type(control).__name__
    if kind == "Checkbox" or kind == "ToggleButton":
        return explore.Toggle(label, bool(control.value))
    if values is None:
        options = getattr(control, "options", None)
        if options is None:
            raise ValueError(
                f"control {name!r} ({kind}) is continuous: give the values to draw in advance, "
                f"predraw={{{name!r}: [...]}}"
            )
        values = [o[1] if isinstance(o, tuple) else o for o in options]
        names = [o[0] if isinstance(o, tuple) else str(o) for o in options]
    else:
        values = list(values)
        names = [str(v) for v in values]
    if control.value not in values:
        raise ValueError(f"control {name!r}: its value {control.value!r} is not among the values drawn {values}")
    if kind in ("Dropdown", "ToggleButtons", "RadioButtons", "Select"):
        return explore.Choice(label, values, control.value, names=names)
    fmt = getattr(control, "readout_format", None)
    slider = explore.Slider(label, values, control.value)
    if kind == "FloatSlider" and fmt:
        slider.format = "{:" + fmt + "}"
    elif kind == "SelectionSlider":
        slider.format = "{}"
        slider.options = values
    return slider


class _Explorer:
    """What :func:`explorer` returns: the live panel, and the page's drawn-in-advance version."""

    def __init__(self, panel: Any, page_html: str, alt: str) -> None:
        self.panel = panel
        self.page_html = page_html
        self.alt = alt

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        view = {"version_major": 2, "version_minor": 0, "model_id": self.panel.model_id}
        return {
            "application/vnd.jupyter.widget-view+json": view,
            "text/html": self.page_html,
            "text/plain": self.alt,
        }


def _glue(name: str, value: Any) -> None:
    """myst-nb's ``glue(name, value, display=False)``, without needing myst-nb installed.

    The value's representations are displayed under MIME types prefixed with
    ``application/papermill.record/`` (which front ends do not show) and tagged
    with the name, which is how myst-nb finds them when it builds the page. A
    dict is taken as a ready MIME bundle (a figure's SVG and its text).
    """
    from IPython.core.formatters import format_display_data
    from IPython.display import display

    prefix = "application/papermill.record/"
    if isinstance(value, dict):
        bundle, metadata = dict(value), {}
    else:
        bundle, metadata = format_display_data(value)
    metadata = {"scrapbook": {"name": name, "mime_prefix": prefix}}
    display({prefix + mime: data for mime, data in bundle.items()}, raw=True, metadata=metadata)


def _to_numpy(x: Any) -> Any:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return x


def _as_list(x: Any) -> list:
    x = _to_numpy(x)
    return list(x.tolist()) if hasattr(x, "tolist") else list(x)
