"""kqv.plots: the book's looks."""

from kqv import plots


def test_series_never_look_like_a_design():
    """A non-design series shares neither its colour-and-marker pair nor its marker with any design."""
    design_markers = {d["marker"] for d in plots.DESIGNS.values()}
    design_looks = {(d["color"], d["marker"]) for d in plots.DESIGNS.values()}
    for series in plots.SERIES:
        assert series["marker"] not in design_markers, series
        assert (series["color"], series["marker"]) not in design_looks, series


def test_series_are_told_apart_without_colour():
    """Each series has its own marker and its own line style, for readers who do not see colour."""
    assert len({s["marker"] for s in plots.SERIES}) == len(plots.SERIES)
    assert len({s["linestyle"] for s in plots.SERIES}) == len(plots.SERIES)


def test_no_series_is_dotted():
    """Dotted lines mark references in the book's figures (a full cache, one T x T matrix): no series may be."""
    assert all(s["linestyle"] not in (":", "dotted") for s in plots.SERIES)
