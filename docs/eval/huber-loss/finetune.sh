#!/bin/bash
# Fine-tune the shipped teacher on shapes data with a share of swapped captions, l2 vs scheduled pseudo-Huber.
#   bash docs/eval/huber-loss/finetune.sh NAME [key=value ...]     (from the repo root; writes runs/huber-ft-NAME)
# Same data for every run: 8000 scenes (seed 0), their latents cached once in runs/huber-cache.
set -e
name=$1; shift
OMP_NUM_THREADS=1 exec .venv/bin/python stages/train_latent.py --config configs/latent/shapes64.yaml \
  init_from=ldm/assets/shapes64 train.output_dir=runs/huber-ft-$name \
  train.max_steps=500 train.lr=1e-4 train.warmup_steps=0 train.lr_schedule=constant \
  train.validate_every=0 train.checkpoint_every=500 train.keep_last=1 train.tracker=none \
  data.length=8000 cache_dir=runs/huber-cache save_dtype=float32 "$@"
