#!/bin/bash
# it/s of the demo training configuration, old (de48e32) vs new (main), interleaved, quiet machine
set -e
# usage: OLD=/path/to/de48e32-checkout scripts/bench_speed_old_new.sh
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
# NEW: a checkout of main; OLD: git worktree add --detach /work/wt/old9 de48e32
NEW=${NEW:-$(cd "$(dirname "$0")/.." && pwd)}; OLD=${OLD:-/work/wt/old9}
PY=${PY:-$NEW/.venv/bin/python}
export D=${D:-$(mktemp -d)}
PYTHONPATH=$NEW $PY - $NEW/scripts/demo.py <<'PYX'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("demo", sys.argv[1]); demo = importlib.util.module_from_spec(spec); spec.loader.exec_module(demo)
from IWSegmentationLib.data.synth import write_dataset
import os; write_dataset(os.environ["D"] + "/data", 12, 0, demo.SYNTH_PRESET, shape=demo.SYNTH_SHAPE)
PYX
for r in 0 1 2 3; do
  for t in new old; do
    tree=$NEW; [ $t = old ] && tree=$OLD
    PYTHONPATH=$tree $PY $NEW/scripts/bench_startup.py --speed-child $tree $D/data $D/$t-$r.json 10 3
    echo "round $r $t: $(cat $D/$t-$r.json)"
  done
done
