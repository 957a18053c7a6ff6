#!/bin/bash
# Rectified flow with the preset's training times (uniform, half of them shifted by 8), else the shapes64 preset, 2000 steps
cd /work/main
OMP_NUM_THREADS=1 .venv/bin/python stages/train_latent.py --config configs/latent/shapes64.yaml --resume latest \
  train.output_dir=runs/cmp-rfmix train.max_steps=2000 train.validate_every=0 cache_dir=runs/latent-cache \
  diffusion.schedule=rectified_flow diffusion.prediction=flow
