"""Explorers that run in the page: no kernel, offline, nothing loaded from a CDN.

An explorer is one HTML output: a small JavaScript component (``kqv/web/*.js``,
inlined) and its data. The same output works on the book's site, in Colab, in
JupyterLab and in VS Code, because it needs nothing but a browser. Where a front
end does not run the script (an untrusted notebook in JupyterLab), the output
still shows its first picture, and re-running the cell brings it to life.

:func:`frames` is the general one: Python draws a picture for every combination
of a few controls' options in advance, and the page switches between them. Other
components compute in the browser (see the chapters that use them).

Pictures are SVG, drawn by :mod:`kqv.plots`: sharp at any size, with real text.
Each comes in two renditions, one for the column of a desktop page and one for a
phone, and the component shows the one that fits. On the site the pictures
follow the page's light or dark mode; in a notebook they keep a white paper.

Book: every chapter's "Explore" sections.
"""

from __future__ import annotations

import base64
import hashlib
import html
import itertools
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from IPython.display import HTML
    from matplotlib.figure import Figure

__all__ = ["Slider", "Choice", "Toggle", "frames", "component", "MAX_FRAMES"]

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
