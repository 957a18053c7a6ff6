#!/bin/bash
# Fine-tune the shipped teacher as docs/eval/huber-loss/finetune.sh does (same data, cache, steps and lr; the l2 run
# there, runs/huber-ft-clean-l2, is the baseline), writing runs/multires-ft-NAME instead.
#   bash docs/eval/multires-noise/finetune.sh NAME [key=value ...]     (from the repo root)
#   bash docs/eval/multires-noise/finetune.sh multires diffusion.multires_noise_iterations=6 diffusion.multires_noise_discount=0.3
#   bash docs/eval/multires-noise/finetune.sh debiased diffusion.weighting=debiased
# The later train.output_dir override wins over the huber script's (ldm.training.config applies them in order).
set -e
name=$1; shift
exec bash docs/eval/huber-loss/finetune.sh "$name" train.output_dir=runs/multires-ft-$name "$@"
