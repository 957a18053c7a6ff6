#!/bin/bash
# The MMDiT against the U-Net: configs/latent/shapes64-mmdit.yaml (the shapes64 preset with the MMDiT), 2000 steps as
# the session-25 baseline runs/cmp-vp (the preset's U-Net, 2000 steps), then the same evaluation
cd "$(dirname "$0")/../../.."   # the repository root
OMP_NUM_THREADS=2 .venv/bin/python stages/train_latent.py --config configs/latent/shapes64-mmdit.yaml --resume latest \
  train.output_dir=runs/cmp-mmdit train.max_steps=2000 train.validate_every=0 cache_dir=runs/latent-cache
OMP_NUM_THREADS=2 .venv/bin/python -m ldm.eval report --model runs/cmp-mmdit/model --n 500 \
  --teacher-steps 8,32 --ws 2 --student-sweep 0 --out-dir runs/eval-mmdit
.venv/bin/python -m ldm.eval compare runs/eval-vp runs/eval-mmdit --out runs/compare-vp-mmdit.json
