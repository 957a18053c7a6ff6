#!/usr/bin/env bash
# Post-hoc EMA on the shapes world: fine-tune the shipped teacher at a high constant lr, tracking sigma_rel 0.05 and
# 0.10 (snapshots every 50 steps), then rebuild several EMA lengths and score each on the same held-out prompts.
# Run from the repository root; 2-core CPU, OMP_NUM_THREADS=1. Results: scores.jsonl, sweep.txt, report.md.
set -euo pipefail
export OMP_NUM_THREADS=1
PY=.venv/bin/python RUN=runs/phema-ft HERE=docs/eval/posthoc-ema N=${N:-200}

# 1. training (~35 min here): the preset with init_from, lr 4e-4 constant after 50 warmup steps, 600 steps
[ -d $RUN/checkpoint-000600 ] || $PY stages/train_latent.py --config configs/latent/shapes64.yaml \
    init_from=ldm/assets/shapes64 cache_latents=false train.output_dir=$RUN train.max_steps=600 train.lr=4e-4 \
    train.lr_schedule=constant train.warmup_steps=50 train.validate_every=0 train.checkpoint_every=300 \
    train.tracker=none "train.posthoc_ema.sigma_rels=[0.05,0.10]" train.posthoc_ema.every=50

# 2. reconstruction errors, then the model folders: post-hoc EMAs, and the raw weights at step 600
$PY -m ldm.training.posthoc_ema $RUN --sweep | tee $HERE/sweep.txt
for s in 0.02 0.05 0.08 0.10 0.15 0.20 0.25; do
    $PY -m ldm.training.posthoc_ema $RUN --sigma-rel $s --out $RUN/posthoc-$s
done
[ -d $RUN/raw ] || $PY $HERE/raw_folder.py $RUN/checkpoint-000600 $RUN/raw
$PY $HERE/holdout_check.py $RUN | tee $HERE/holdout.jsonl      # each tracked EMA rebuilt from the other one
$PY $HERE/classic_vs_phema.py $RUN 600 0.9995 0.75 | tee $HERE/classic_vs_phema.json   # the preset's classic EMA

# 3. N held-out prompts, 25 DDIM steps, w = 2; paired against the first row (the shipped teacher)
$PY $HERE/score_models.py $N 25 teacher=ldm/assets/shapes64 raw=$RUN/raw classic-ema=$RUN/model \
    phema-0.02=$RUN/posthoc-0.02 phema-0.05=$RUN/posthoc-0.05 phema-0.08=$RUN/posthoc-0.08 \
    phema-0.10=$RUN/posthoc-0.10 phema-0.15=$RUN/posthoc-0.15 phema-0.20=$RUN/posthoc-0.20 \
    phema-0.25=$RUN/posthoc-0.25 | tee $HERE/scores.jsonl
