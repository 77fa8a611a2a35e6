"""Root pytest configuration: the `book` marker, and two adjustments to nbval.

`make test-kqv` runs ``pytest -m "not book" tests``; the tests of the book
(notebooks, site, browser) carry the ``book`` marker and run in their own
targets, after the site is built.

nbval (``make test-notebooks``) is adjusted in two ways, both to make its run
match how the stored outputs were made (tools/execute_notebooks.py, through
nbclient), not to loosen the comparison:

1. It sends each cell with ``store_history=False``, unlike Jupyter and nbclient.
   IPython then ignores a trailing ``;`` and a plotting cell shows a
   ``[<matplotlib.lines.Line2D ...>]`` that the stored notebook lacks (nbval
   issue 194). Here cells run with ``store_history=True``, as everywhere else.
2. It skips ``image/png`` in its comparison (pixels are not compared), but not
   the same PNG when myst-nb's ``glue`` stores it under a prefixed MIME type for
   a figure placed in the prose. That key is skipped too, like any other PNG.
"""

from __future__ import annotations

import pytest

GLUED_PNG = "application/papermill.record/image/png"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "book: tests of the book (notebooks, built site, browser); `make test` runs them"
    )


try:
    from nbval import kernel as _nbval_kernel
    from nbval import plugin as _nbval_plugin
except ImportError:  # nbval is not installed: nothing to adjust
    _nbval_kernel = _nbval_plugin = None

if _nbval_kernel is not None:

    def _execute_cell_input(self, cell_input, allow_stdin=None):
        return self.kc.execute(cell_input, store_history=True, allow_stdin=allow_stdin, stop_on_error=False)

    _nbval_kernel.RunningKernel.execute_cell_input = _execute_cell_input

    _original_init = _nbval_plugin.IPyNbFile.__init__

    def _init(self, *args, **kwargs):
        _original_init(self, *args, **kwargs)
        self.skip_compare = tuple(self.skip_compare) + (GLUED_PNG,)

    _nbval_plugin.IPyNbFile.__init__ = _init
