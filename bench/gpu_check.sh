#!/usr/bin/env bash
# The GPU check (issue 16, part 5): our ViT vs timm on CUDA, vit_base throughput eager and
# compiled, serving batched vs unbatched at 1/16/64/256 clients, decode rate per core vs the GPU.
# Under 8 minutes on one H100/H200-class GPU; writes bench/gpu_check.json and bench/gpu_check.md.
#   bash bench/gpu_check.sh                 # on a GPU machine
#   bash bench/gpu_check.sh --dry-run       # CPU, tiny sizes: checks the script (the test suite runs this)
# All logic is in bench/gpu_check.py; arguments pass through (--out, --images, --sections).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
# 470 s: a hard stop under the 8-minute promise; each section is saved as soon as it ends.
exec timeout --signal=TERM --kill-after=10 470 "$PY" bench/gpu_check.py "$@"
