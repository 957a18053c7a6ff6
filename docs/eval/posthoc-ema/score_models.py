"""Score model folders on the same held-out shapes prompts: prompt accuracy and FD by the oracle, paired to the first.

    OMP_NUM_THREADS=1 python docs/eval/posthoc-ema/score_models.py N STEPS NAME=MODEL_DIR [NAME=MODEL_DIR ...]

N held-out prompts (ldm.eval.metrics.heldout_prompts(N, 0)), DDIM at STEPS steps, w = each folder's default (2),
seeds 0, 100, ... per batch of 100 prompts (as docs/eval/samplers-kdiff/equal_nfe.py), judged by the oracle and FD
in its features against N held-out real scenes, as `python -m ldm.eval` does; each row paired with the first
(ldm.eval.compare). Rows go to stdout as JSON lines, with each prompt's outcome ("correct").
"""
import json
import sys
import time

import torch

from ldm.eval.compare import paired
from ldm.eval.metrics import heldout_prompts
from ldm.eval.oracle import Oracle
from ldm.eval.score import evaluate_images, real_images
from ldm.pipeline import TextToImage

n, steps = int(sys.argv[1]), int(sys.argv[2])
models = [a.split("=", 1) for a in sys.argv[3:]]
prompts = heldout_prompts(n, seed=0)
oracle = Oracle.load()
reals = oracle.features(real_images(n, 0))
first = None
for name, folder in models:
    start = time.time()
    pipe = TextToImage.from_folder(folder)
    images = torch.cat([pipe.generate(prompts[i:i + 100], steps=steps, seed=i, sampler="ddim")[0].cpu()
                        for i in range(0, n, 100)])
    r = evaluate_images(oracle, images, prompts, reals)
    first = first or r
    vs = paired(first["correct"], r["correct"])
    print(json.dumps(dict(name=name, model=folder, prompts=n, steps=steps, accuracy=r["accuracy"],
                          one_object=r["one_object"], two_object=r["two_object"], fd=r["fd"],
                          vs_first=dict(diff=vs["diff"], ci95=vs["ci95"], p=vs["p"]),
                          seconds=round(time.time() - start, 1), correct=r["correct"])), flush=True)
