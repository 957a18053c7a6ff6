#!/bin/bash
# Session 21: the LoRA style check (docs/provenance/lora_style.py); resumable: rerun this script.
# STEPS=1200 docs/provenance/lora_train.sh data.path=runs/lora-mix-data train.output_dir=runs/lora-mix2 train.lr=5e-4
cd /work/main
export OMP_NUM_THREADS=2
exec .venv/bin/python stages/train_latent.py --config configs/latent/shapes64.yaml --resume latest \
  init_from=ldm/assets/shapes64 lora.rank=8 data.source=imagefolder data.path=runs/lora-gray-data \
  cache_latents=true cache_dir=runs/lora-gray-cache train.output_dir=runs/lora-gray \
  train.max_steps=${STEPS:-400} train.lr=1e-3 train.warmup_steps=20 train.batch_size=32 \
  train.checkpoint_every=100 train.validate_every=0 train.log_every=25 save_dtype=float16 "$@"
