"""Sphinx extension: two small rules that let kqv's docstrings read naturally.

1. **Short names resolve.** ``kqv`` re-exports its main objects, so docstrings
   and chapters write :class:`kqv.Attention` or
   :func:`kqv.scaled_dot_product_attention`, while the API reference documents
   each object where it is defined (``kqv.attention.Attention``). A Python
   cross-reference under ``kqv.`` that Sphinx cannot find is looked up in the
   live package and retried under the object's defining module. Anything that
   still does not resolve stays a warning (an error with ``-W``).

2. **No inline types.** Napoleon reads the first line of a property's or
   attribute's docstring, and the first line of a ``Returns:`` section, as
   ``type: description``, so "Bytes that the buffers occupy: B * S_max * ..."
   would turn its first half into a bogus type (and, with nitpicky
   references, a warning). kqv states types with annotations, never inline, so
   those first lines are always kept as prose.
"""

from __future__ import annotations

import importlib
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment


def _defining_name(target: str) -> str | None:
    """'kqv.Attention.forward' -> 'kqv.attention.Attention.forward' (None if unchanged or unknown)."""
    parts = target.split(".")
    if len(parts) < 2 or parts[0] != "kqv":
        return None
    try:
        obj: Any = importlib.import_module("kqv")
        for part in parts[1:2]:
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(obj, type(importlib)):  # a submodule, e.g. kqv.configs
        real = obj.__name__
    elif module and qualname:
        real = f"{module}.{qualname}"
    else:
        return None
    real = ".".join([real, *parts[2:]])
    return None if real == target else real


def _missing_reference(app: Sphinx, env: BuildEnvironment, node: nodes.Element, contnode: nodes.Element):
    if node.get("refdomain") != "py":
        return None
    real = _defining_name(node.get("reftarget", ""))
    if real is None:
        return None
    domain = env.get_domain("py")
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], real, node, contnode)


RETURNS_HEADERS = ("Returns:", "Return:", "Yields:", "Yield:")


def _keep_first_line_as_prose(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    # An empty type before a colon: napoleon keeps the whole line as the description.
    if what in ("attribute", "data", "property") and lines and lines[0].strip():
        lines[0] = ": " + lines[0]
    for i, line in enumerate(lines):
        if line.strip() in RETURNS_HEADERS:
            for j in range(i + 1, len(lines)):
                if lines[j].strip():
                    if ":" in lines[j]:
                        indent = len(lines[j]) - len(lines[j].lstrip())
                        lines[j] = lines[j][:indent] + ": " + lines[j][indent:]
                    break


def setup(app: Sphinx) -> dict:
    app.setup_extension("sphinx.ext.autodoc")
    app.connect("missing-reference", _missing_reference)
    # Before napoleon, which handles the same event at the default priority (500).
    app.connect("autodoc-process-docstring", _keep_first_line_as_prose, priority=400)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
