"""The package itself: every public submodule is reachable after ``import kqv``, which stays light."""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import kqv

ROOT = Path(__file__).resolve().parents[1]
SUBMODULES = sorted(m.name for m in pkgutil.iter_modules(kqv.__path__) if not m.name.startswith("_"))


def run_python(code: str) -> dict:
    """Run code in a fresh interpreter (this one has imported everything already); it prints JSON."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_submodule_list_is_complete():
    """No public module of kqv is left out of the lazy list (a new one must be added there)."""
    assert SUBMODULES == sorted(kqv._SUBMODULES)
    assert "smollm2" in SUBMODULES and "data" not in SUBMODULES


def test_import_kqv_loads_no_heavy_dependency():
    loaded = run_python(
        "import json, sys, kqv; "
        "print(json.dumps([m for m in ('transformers', 'gguf', 'matplotlib', 'tokenizers', 'IPython') if m in sys.modules]))"
    )
    assert loaded == []


def test_every_submodule_is_an_attribute_after_import_kqv():
    code = (
        "import json, kqv; "
        f"print(json.dumps([[getattr(kqv, n).__name__, n in dir(kqv)] for n in {SUBMODULES!r}]))"
    )
    assert run_python(code) == [[f"kqv.{name}", True] for name in SUBMODULES]


def test_unknown_attribute_names_itself():
    with pytest.raises(AttributeError, match="module 'kqv' has no attribute 'modle'"):
        kqv.modle  # noqa: B018
