#!/bin/bash
# Score the l2 baseline (re-scored, to check it reproduces docs/eval/huber-loss/scores.jsonl) and the two runs of
# finetune.sh with docs/eval/huber-loss/score.py (200 held-out prompts, same noise per prompt, paired McNemar).
#   bash docs/eval/multires-noise/score.sh     (from the repo root; about 2-5 min per model on one thread)
set -e
OMP_NUM_THREADS=1 exec .venv/bin/python docs/eval/huber-loss/score.py 200 runs/huber-ft-clean-l2/model \
  runs/multires-ft-multires/model runs/multires-ft-debiased/model
