#!/usr/bin/env bash
# Runs every benchmark the way the docs' tables were produced: quiet machine, glibc malloc
# kept from returning freed memory (freed pages are slow to touch again on these VMs),
# warm-up inside each script, medians, side-by-side ratios in one run. Tables go to docs/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
mkdir -p docs/bench
parts=${*:-weights evaluate inference training precision}
for part in $parts; do
  echo "== bench_${part}" >&2
  if [ "$part" = precision ]; then
    # bf16 vs fp32 needs a trained checkpoint: the one `make demo` leaves in demo_output/
    held=demo_output/data/heldout
    if [ ! -f demo_output/model.safetensors ]; then
      echo "   skipped: run 'make demo' first (it needs demo_output/model.safetensors)" >&2
      continue
    fi
    $PY scripts/bench_precision.py --model demo_output/model.safetensors --input $held/imagesTr \
      --organ-mask $held/masksTr --labels $held/labelsTr --markdown docs/bench/precision.md
    continue
  fi
  $PY scripts/bench_${part}.py --markdown docs/bench/${part}.md
done
