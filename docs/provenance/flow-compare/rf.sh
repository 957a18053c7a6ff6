#!/bin/bash
# Rectified flow (SD3's recipe: flow velocity, logit-normal(0, 1) times, no shift), else the shapes64 preset, 2000 steps
cd /work/main
OMP_NUM_THREADS=1 .venv/bin/python stages/train_latent.py --config configs/latent/shapes64.yaml --resume latest \
  train.output_dir=runs/cmp-rf train.max_steps=2000 train.validate_every=0 cache_dir=runs/latent-cache \
  diffusion.schedule=rectified_flow diffusion.prediction=flow diffusion.time=logit_normal \
  diffusion.time_shift=1 diffusion.time_shift_share=1
