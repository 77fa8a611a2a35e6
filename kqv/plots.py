"""Figures for the book: one palette, one look, and the helpers every chapter reuses.

Chapters import this module instead of pasting plotting code between notebooks::

    from kqv import plots
    plots.use_style()                          # palette, fonts, sizes (once, in the set-up cell)

    fig, ax = plt.subplots()
    plots.bars(ax, ["Crust", "Mantle", "Core"], [2.0, 2.0, 3.0], highlight=2)
    plots.glue_figure("fig-scores", fig)       # shown in the prose by {glue:figure}, with alt text
    plots.glue_number("best_score", 3.0)       # shown in the prose by {glue:text}

Interactive figures come in two kinds, placed side by side in a chapter:

- :func:`explorer` builds an ipywidgets panel that recomputes with ``kqv`` and
  redraws when a control moves (it needs a running kernel to respond, and its
  first drawing is stored in the notebook so the built page shows it);
- :func:`jshtml_slider` builds a kernel-free slider (matplotlib's ``to_jshtml``):
  every frame is drawn in advance and stored in the page.

Colours come from the Okabe-Ito palette, which stays distinguishable under the
common forms of colour blindness; matrices use the ``cividis`` colour map, which
was designed for the same purpose and reads in greyscale too.

Everything here is deterministic: no random ids and no timestamps end up in a
notebook's outputs, so regenerating a chapter rewrites the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import re
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

if TYPE_CHECKING:  # imported lazily at run time: kqv itself needs neither
    import ipywidgets
    from IPython.display import HTML
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "OKABE_ITO",
    "COLORS",
    "SEQUENTIAL",
    "use_style",
    "bars",
    "heatmap",
    "to_png",
    "glue_figure",
    "glue_number",
    "jshtml_slider",
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

_BASE = OKABE_ITO["blue"]
_HIGHLIGHT = OKABE_ITO["orange"]


def use_style() -> None:
    """Set the book's matplotlib look: palette, colour map, sizes, no chart junk."""
    import matplotlib as mpl
    from cycler import cycler

    mpl.rcParams.update(
        {
            "axes.prop_cycle": cycler(color=COLORS),
            "image.cmap": SEQUENTIAL,
            "figure.figsize": (6.4, 3.4),
            "figure.dpi": 100,
            "savefig.dpi": 100,
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": False,
            "legend.frameon": False,
            "figure.constrained_layout.use": True,
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
                fontsize=9,
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

    Each annotation is written in black or white, whichever contrasts more with
    its cell. ``matrix`` may be a tensor (moved to the CPU), an array or nested lists.

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
            ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=8,
                    color="black" if luminance > 0.5 else "white")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, shrink=0.8)
    if title:
        ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    return image


def to_png(fig: Figure) -> bytes:
    """The figure as PNG bytes, cropped to its contents, without a timestamp."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def glue_figure(name: str, fig: Figure) -> None:
    """Store a figure under ``name`` for the prose, and close it.

    Place it in a Markdown cell with its caption and alt text::

        ```{glue:figure} fig-scores
        :alt: Bar chart: the page "Core" scores 3, Crust and Mantle 2, ...
        :name: fig-scores

        Caption, referred to elsewhere as {numref}`fig-scores`.
        ```

    The cell itself shows nothing, so the figure appears once, where the prose puts it.
    """
    import matplotlib.pyplot as plt

    _glue(name, fig)
    plt.close(fig)


def glue_number(name: str, value: Any, digits: int | None = 3) -> None:
    """Store a number under ``name`` for the prose, rounded to ``digits`` decimals.

    In a Markdown cell, ``{glue:text}`name:.2f``` prints it with a format of the
    prose's choosing. Rounding here keeps the stored text stable: the last bits
    of a float can change with the thread count, its first three decimals do not.
    A tensor with one element is turned into a Python number first. Nothing is
    shown in the cell (and nothing is returned, so a cell may end with it).
    """
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and digits is not None:
        value = round(value, digits)
        if value == 0:
            value = 0.0  # never -0.0
    _glue(name, value)


def jshtml_slider(
    fig: Figure,
    update: Callable[[Any], Any],
    frames: Sequence[Any],
    *,
    alt: str,
    interval: int = 700,
) -> HTML:
    """A slider over ``frames`` that works in the built page with no kernel.

    ``update(frame)`` redraws ``fig`` for one frame (it is called once per frame,
    in order, and its return value is ignored). Every frame is stored in the page
    as a PNG, so keep to a few dozen frames. Returns HTML to display as the
    last line of a cell. Compared with matplotlib's own ``to_jshtml``:

    - the font-awesome style sheet that it links from a CDN is dropped (the book's
      theme already serves the icons, and the page must not load third-party files);
    - its random element ids are replaced by ids derived from the content,
      so re-running the cell gives the same bytes;
    - the frame image gets ``alt`` text.

    The figure is closed.
    """
    import matplotlib.pyplot as plt
    from IPython.display import HTML
    from matplotlib.animation import FuncAnimation

    if not alt.strip():
        raise ValueError("a slider figure needs alt text")
    anim = FuncAnimation(fig, lambda frame: update(frame), frames=list(frames), interval=interval, blit=False)
    page = anim.to_jshtml(default_mode="once")
    plt.close(fig)
    page = re.sub(r'<link rel="stylesheet"\s+href="https://[^"]*font-awesome[^"]*">\s*', "", page)
    if re.search(r'(?:src|href)="(?:https?:)?//', page):
        raise RuntimeError("to_jshtml output links a third-party file that this helper does not know")
    random_ids = set(re.findall(r"_anim_img([0-9a-f]{32})", page))
    if len(random_ids) != 1:
        raise RuntimeError("unexpected to_jshtml output: cannot find its element id")
    (random_id,) = random_ids
    stable_id = "kqv" + hashlib.sha1(page.replace(random_id, "").encode()).hexdigest()[:24]
    page = page.replace(random_id, stable_id)
    page = page.replace(f'<img id="_anim_img{stable_id}">',
                        f'<img id="_anim_img{stable_id}" alt="{html.escape(alt, quote=True)}">')
    return HTML(page)


def explorer(draw: Callable[..., Figure], *, alt: str, **controls: ipywidgets.ValueWidget) -> ipywidgets.VBox:
    """An ipywidgets panel: ``controls`` above, ``draw(**values)``'s figure below.

    ``draw`` receives each control's value under the control's keyword, returns a
    matplotlib figure (which this helper closes), and is called again whenever a
    control changes. Display the returned panel as the last line of a cell::

        plots.explorer(draw, alt="...", d=widgets.IntSlider(...), scaled=widgets.Checkbox(...))

    The figure is written into the panel's ``Output`` as data (not captured
    from the cell's output stream), so the executed notebook stores the first
    drawing in its widget state and the built page shows it, and the cell's own
    outputs are the same with or without a widget-aware front end (nbval).
    ``alt`` describes the figure for screen readers; it is used for every drawing.
    """
    import ipywidgets as widgets

    if not controls:
        raise ValueError("an explorer needs at least one control")
    out = widgets.Output(layout=widgets.Layout(min_height="200px"))

    def redraw(change: Any = None) -> None:
        fig = draw(**{name: control.value for name, control in controls.items()})
        png = base64.b64encode(to_png(fig)).decode("ascii")
        import matplotlib.pyplot as plt

        plt.close(fig)
        out.outputs = (
            {
                "output_type": "display_data",
                "data": {
                    "text/html": f'<img src="data:image/png;base64,{png}" alt="{html.escape(alt, quote=True)}">',
                    "image/png": png,
                    "text/plain": alt,
                },
                "metadata": {},
            },
        )

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox(list(controls.values())), out])


def _glue(name: str, value: Any) -> None:
    """myst-nb's ``glue(name, value, display=False)``, without needing myst-nb installed.

    The value's representations are displayed under MIME types prefixed with
    ``application/papermill.record/`` (which front ends do not show) and tagged
    with the name, which is how myst-nb finds them when it builds the page. So a
    chapter runs on Colab, where myst-nb is absent, and builds the same way.
    """
    try:
        from myst_nb import glue
    except ImportError:
        from IPython.core.formatters import format_display_data
        from IPython.display import display

        prefix = "application/papermill.record/"
        bundle, metadata = format_display_data(value)
        metadata["scrapbook"] = {"name": name, "mime_prefix": prefix}
        display({prefix + mime: data for mime, data in bundle.items()}, raw=True, metadata=metadata)
    else:
        glue(name, value, display=False)


def _to_numpy(x: Any) -> Any:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return x


def _as_list(x: Any) -> list:
    x = _to_numpy(x)
    return list(x.tolist()) if hasattr(x, "tolist") else list(x)
