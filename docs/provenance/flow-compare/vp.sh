#!/bin/bash
# Baseline for the rectified-flow comparison: the shapes64 preset (VP, v, cosine log-SNR, shift 8 x 0.5), 2000 steps
cd /work/main
OMP_NUM_THREADS=1 .venv/bin/python stages/train_latent.py --config configs/latent/shapes64.yaml --resume latest \
  train.output_dir=runs/cmp-vp train.max_steps=2000 train.validate_every=0 cache_dir=runs/latent-cache
