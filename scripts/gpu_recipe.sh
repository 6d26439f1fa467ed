#!/usr/bin/env bash
# Dice vs iw-Dice in the paper's recipe on one GPU: the paper's 11 M-parameter U-Net (model_size paper),
# SGD with Nesterov momentum, lr 1e-2 -> 1e-3 at 80%, batch 2, p = 0.5 lesion-centred patches, the last
# checkpoint tested; on the LiTS-regime synthetic data of scripts/compare_losses.py (the same cases as
# the CPU study, so the two tables compare), 2,000 steps per run (the paper ran 10,000), seeds 0-2,
# two runs side by side on the one GPU. Prints the table (also in $WORK/table.md).
#
# Budget: written to fit 8 minutes on one H100 (about 6 x 2,000 steps of 2 x 32x40x40 at a few ms each,
# plus 5 scored checkpoints per run). It has NOT been run on a GPU yet: no device was lent to the
# session that wrote it. Usage (GPU machine, repository root, .venv with a CUDA build of PyTorch):
#     bash scripts/gpu_recipe.sh            # WORK=gpu_output by default
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-gpu_output}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_recipe: no CUDA device visible to PyTorch')"
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
start=$(date +%s)
"$PY" -m scripts.compare_losses --regime lits --work "$WORK" --jobs 2 --arms dice iw-dice --seeds 0 1 2 \
  --epochs 20 --iters 100 --eval-every 4 --set device=cuda --set model_size=paper --set amp=bf16 \
  --markdown "$WORK/table.md"
echo "gpu_recipe: $(( $(date +%s) - start )) s wall" >&2
cat "$WORK/table.md"
