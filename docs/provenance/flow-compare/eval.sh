#!/bin/bash
# The three 2000-step runs of the rectified-flow comparison: 500 held-out prompts, teacher DDIM + CFG w = 2
cd /work/main
for arm in vp rf rfmix; do
  OMP_NUM_THREADS=2 .venv/bin/python -m ldm.eval report --model runs/cmp-$arm/model --n 500 \
    --teacher-steps 8,32 --ws 2 --student-sweep 0 --out-dir runs/eval-$arm
done
for pair in "vp rf" "vp rfmix" "rf rfmix"; do set -- $pair
  .venv/bin/python -m ldm.eval compare runs/eval-$1 runs/eval-$2 --out runs/compare-$1-$2.json
done
mkdir -p runs/cmp-rf/model-shift3 && cp -r runs/cmp-rf/model/* runs/cmp-rf/model-shift3/
.venv/bin/python - <<'PY'
import json; p = "runs/cmp-rf/model-shift3/model_index.json"; d = json.load(open(p))
d["schedule"]["shift"] = 3.0; json.dump(d, open(p, "w"), indent=2)
PY
OMP_NUM_THREADS=2 .venv/bin/python docs/provenance/flow_samplers.py 500 runs/cmp-vp/model runs/cmp-rf/model \
  runs/cmp-rf/model-shift3 runs/cmp-rfmix/model | tee runs/flow_samplers.jsonl
