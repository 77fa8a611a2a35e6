"""Sphinx extension: the built site serves MathJax itself.

Jupyter Book's pages load MathJax (and, for stored widgets, require.js and the
ipywidgets HTML manager) from CDNs by default. This book's pages load nothing
from a third party: the npm package pinned in tools/vendor/package.json
(installed by `make vendor`, part of `make book`) is copied into
``_static/vendor/`` of the built site, and _config.yml points Sphinx at it with
``mathjax_path: vendor/mathjax/tex-chtml.js`` (MathJax 3; its whole ``es5/``
folder is copied, because extensions and fonts load on demand). The site shows
no stored ipywidgets: each explorer also carries a version drawn in advance
that works with no kernel (kqv.explore), and the site renders that one.

The files are copied when the build finishes, not through ``html_static_path``:
Jupyter Book adds every ``.js`` found in a static folder to every page.

Jupyter Book also always loads sphinx-thebe, which puts on every page a script
naming thebe's CDN URL (and loads thebe from it on demand). Thebe needs Binder
and that CDN, so it cannot work offline; the book does not use it
(``launch_buttons.thebe: false``), and its scripts and style sheet are removed
from the pages.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

NODE_MODULES = Path(__file__).resolve().parent / "vendor" / "node_modules"
ASSETS = {
    "mathjax": NODE_MODULES / "mathjax" / "es5",
}


def _check_installed(app: Sphinx) -> None:
    for name, folder in ASSETS.items():
        if not folder.is_dir():
            raise ExtensionError(
                f"the vendored {name} files are missing ({folder}); "
                "run `make vendor` (npm ci --prefix tools/vendor), or simply `make book`"
            )


def _copy(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / "_static" / "vendor"
    for name, folder in ASSETS.items():
        destination = target / name
        if destination.exists():
            shutil.rmtree(destination)
        shutil.copytree(folder, destination, ignore=shutil.ignore_patterns("*.map"))


def _drop_thebe(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    def is_thebe(asset) -> bool:
        name = str(getattr(asset, "filename", asset) or "")
        body = str(getattr(asset, "attributes", {}).get("body", ""))
        return "thebe" in name or "THEBE_JS_URL" in body

    for key in ("script_files", "css_files"):
        if key in context:
            context[key][:] = [asset for asset in context[key] if not is_thebe(asset)]


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", _check_installed)
    app.connect("html-page-context", _drop_thebe, priority=900)
    app.connect("build-finished", _copy)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
