"""Sphinx extension: what the book's pages do beyond Jupyter Book's defaults.

- **The notebook a learner opens.** The Binder and Colab launch buttons of a
  chapter open ``notebooks/NN_name.ipynb`` (tools/reader_notebooks.py), not the
  MyST source, and the download button serves that notebook too.
- **Figures as inline SVG, for any screen and either theme.** myst-nb places a
  glued figure as ``<img src="...svg">``. Each one is replaced by the SVG itself,
  with its rendition for phones beside it (``--narrow``, see kqv.plots); the
  site's script (book/_static/book.js) shows the one that fits the column, so
  the text is never shrunk. Inline, the figure follows the page's light or dark
  mode: pure black ink becomes the text colour and the white paper transparent
  (the same two rules as kqv/web/explore.js). Ids inside each SVG get a prefix
  of their own, so two figures on a page cannot take each other's clip paths.
- (The warning while the book has no public address is tools/publishing.py,
  printed by ``make book``: not a Sphinx warning, so the build still passes with
  warnings as errors.)
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import shutil
from pathlib import Path

from sphinx.application import Sphinx

ROOT = Path(__file__).resolve().parent.parent
READER = ROOT / "notebooks"
GLUE_PREFIX = "application/papermill.record/"
NARROW = "--narrow"
IMG = re.compile(r'<img\s+([^>]*?)src="([^"]+\.svg)"([^>]*?)/?>')


# --- launch and download buttons ---------------------------------------------------------------


def _reader_notebook(pagename: str) -> Path | None:
    path = READER / (Path(pagename).name + ".ipynb")
    if pagename.startswith("book/chapters/") and path.is_file():
        return path
    return None


def _launch_to_reader(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Point the launch buttons of a chapter at its notebook under notebooks/."""
    reader = _reader_notebook(pagename)
    if reader is None:
        return
    source = f"{pagename}.ipynb"
    target = reader.relative_to(ROOT).as_posix()

    def rewrite(buttons) -> None:
        for button in buttons:
            if isinstance(button, dict):
                url = button.get("url")
                if isinstance(url, str) and url.startswith("http") and source in url:
                    button["url"] = button["url"].replace(source, target)
                rewrite(button.get("buttons", []))

    rewrite(context.get("header_buttons", []))


# --- figures ---------------------------------------------------------------------------------------


def adapt_svg(svg: str) -> str:
    """Make a kqv figure follow the page's theme (kqv/web/explore.js does the same in the browser)."""
    svg = re.sub(
        r'(<g id="(?:figure|axes)_\d+">\s*<g id="patch_\d+">\s*<path [^>]*?style=")fill: ?#ffffff',
        r"\1fill: none",
        svg,
    )
    # Text without a colour of its own inherits the SVG's fill, which book.css sets to currentColor.
    return svg.replace("#000000", "currentColor")


def _scoped(svg: str, prefix: str) -> str:
    """Prefix every id of an SVG (and each reference to it); scope its style sheet to itself."""
    ids = set(re.findall(r'\sid="([^"]+)"', svg))
    for ident in sorted(ids, key=len, reverse=True):
        new = f"{prefix}-{ident}"
        svg = svg.replace(f'id="{ident}"', f'id="{new}"')
        svg = svg.replace(f"url(#{ident})", f"url(#{new})")
        svg = svg.replace(f'href="#{ident}"', f'href="#{new}"')
    svg = re.sub(r"<svg\b", f'<svg data-kqv-figure="{prefix}"', svg, count=1)
    return svg.replace("*{", f'[data-kqv-figure="{prefix}"] *{{')


def _inline(svg: str, alt: str, prefix: str, css_class: str) -> str:
    svg = re.sub(r"^<\?xml[^>]*>\s*", "", svg)
    svg = re.sub(r"<!DOCTYPE[^>]*>\s*", "", svg)
    svg = _scoped(adapt_svg(svg), prefix)
    width = re.search(r'<svg[^>]*\swidth="([0-9.]+)pt"', svg)
    style = f' style="width:{float(width.group(1)) * 4 / 3:.1f}px"' if width else ""
    svg = re.sub(r"<svg\b", f'<svg role="img" aria-label="{html.escape(alt, quote=True)}"{style}', svg, count=1)
    return f'<div class="{css_class}">{svg}</div>'


def _glued_figures(notebook: Path) -> dict[str, str]:
    """name -> SVG of every figure the executed chapter glued (narrow renditions included)."""
    found = {}
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            svg = output.get("data", {}).get(GLUE_PREFIX + "image/svg+xml")
            if name and svg:
                found[name] = "".join(svg) if isinstance(svg, list) else svg
    return found


def _inline_figures(page: Path, notebook: Path) -> int:
    glued = _glued_figures(notebook)
    if not glued:
        return 0
    by_content = {svg.strip(): name for name, svg in glued.items() if not name.endswith(NARROW)}
    text = page.read_text(encoding="utf-8")
    done = 0

    def replace(m: re.Match) -> str:
        nonlocal done
        attributes = m.group(1) + m.group(3)
        file = (page.parent / m.group(2)).resolve()
        if not file.is_file():
            return m.group(0)
        svg = file.read_text(encoding="utf-8")
        name = by_content.get(svg.strip())
        if name is None:
            return m.group(0)
        alt = re.search(r'alt="([^"]*)"', attributes)
        alt_text = html.unescape(alt.group(1)) if alt else ""
        prefix = "f" + hashlib.sha1(name.encode()).hexdigest()[:8]
        parts = [_inline(svg, alt_text, prefix + "w", "kqv-wide")]
        narrow = glued.get(name + NARROW)
        if narrow is not None:
            parts.append(_inline(narrow, alt_text, prefix + "n", "kqv-narrow"))
        width = re.search(r'<svg[^>]*\swidth="([0-9.]+)pt"', svg)
        width_px = float(width.group(1)) * 4 / 3 if width else 0
        done += 1
        return f'<div class="kqv-svg" data-kqv-width="{width_px:.1f}">{"".join(parts)}</div>'

    new = IMG.sub(replace, text)
    if new != text:
        page.write_text(new, encoding="utf-8")
    return done


def _finish(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    outdir = Path(app.outdir)
    for docname in app.env.found_docs:
        source = ROOT / f"{docname}.ipynb"
        page = outdir / f"{docname}.html"
        if not source.is_file() or not page.is_file():
            continue
        _inline_figures(page, source)
        reader = _reader_notebook(docname)
        copy = outdir / "_sources" / f"{docname}.ipynb"
        if reader is not None and copy.parent.is_dir():
            shutil.copyfile(reader, copy)  # the download button serves the learner's notebook


def setup(app: Sphinx) -> dict:
    app.connect("html-page-context", _launch_to_reader, priority=999)
    app.connect("build-finished", _finish)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
