"""Sphinx extension: the built site serves MathJax and the widget manager itself.

Jupyter Book's pages load MathJax, require.js and the ipywidgets HTML manager
from CDNs by default. This book's pages load nothing from a third party: the
npm packages pinned in tools/vendor/package.json (installed by `make vendor`,
part of `make book`) are copied into ``_static/vendor/`` of the built site.
_config.yml points Sphinx at them:

- ``mathjax_path: vendor/mathjax/tex-chtml.js`` (MathJax 3; its whole ``es5/``
  folder is copied, because extensions and fonts load on demand);
- ``nb_ipywidgets_js: {vendor/widgets/embed.js: {}}`` (the standalone embed
  bundle of ``@jupyter-widgets/html-manager``, which finds its fonts next to
  itself and needs no require.js).

The embed bundle typesets widget labels with MathJax 2's ``MathJax.Hub.Queue``,
which MathJax 3 lacks; the copy served here calls MathJax 3's
``typesetPromise`` instead (a two-place patch, checked when it is applied).

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
    "widgets": NODE_MODULES / "@jupyter-widgets" / "html-manager" / "dist",
}
MATHJAX2_TYPESET = re.compile(r'MathJax\.Hub\.Queue\(\["Typeset",MathJax\.Hub,(\w+)\]\)')


def _check_installed(app: Sphinx) -> None:
    for name, folder in ASSETS.items():
        if not folder.is_dir():
            raise ExtensionError(
                f"the vendored {name} files are missing ({folder}); "
                "run `make vendor` (npm ci --prefix tools/vendor), or simply `make book`"
            )


def _patch_embed(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    patched, count = MATHJAX2_TYPESET.subn(
        r"(MathJax.typesetPromise&&MathJax.typesetPromise([\1]))", text
    )
    if count == 0 or "MathJax.Hub" in patched:
        raise ExtensionError(
            f"{path.name}: expected MathJax 2 typeset calls to replace, found {count}; "
            "did the @jupyter-widgets/html-manager version change?"
        )
    path.write_text(patched, encoding="utf-8")


def _copy(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / "_static" / "vendor"
    for name, folder in ASSETS.items():
        destination = target / name
        if destination.exists():
            shutil.rmtree(destination)
        ignore = shutil.ignore_patterns("*.map", "*-amd.js", "libembed*")
        shutil.copytree(folder, destination, ignore=ignore)
    _patch_embed(target / "widgets" / "embed.js")


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
