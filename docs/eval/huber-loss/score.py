"""Score model folders on held-out shapes prompts: prompt accuracy by the oracle and FD in its features, as
`python -m ldm.eval` does, each pair of runs compared per prompt (ldm.eval.compare.paired: McNemar's exact p).

    OMP_NUM_THREADS=1 python docs/eval/huber-loss/score.py N FOLDER [FOLDER ...]

dpmpp_2m, 32 steps, w = 2 (the model's), seeds 0, 100, ... per batch of 100 prompts: every folder draws the same noise
for the same prompt. One JSON line per folder (with each prompt's outcome), then one per pair.
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

n, folders = int(sys.argv[1]), sys.argv[2:]
prompts = heldout_prompts(n, seed=0)
oracle = Oracle.load()
reals = oracle.features(real_images(n, 0))
results = {}
for folder in folders:
    start = time.time()
    pipe = TextToImage.from_folder(folder)
    images = torch.cat([pipe.generate(prompts[i:i + 100], steps=32, seed=i, teacher=True, sampler="dpmpp_2m")[0]
                        for i in range(0, n, 100)])
    r = evaluate_images(oracle, images, prompts, reals)
    results[folder] = r
    print(json.dumps(dict(model=folder, prompts=n, accuracy=r["accuracy"], one_object=r["one_object"],
                          two_object=r["two_object"], fd=r["fd"], seconds=round(time.time() - start),
                          correct=r["correct"])), flush=True)
for i, a in enumerate(folders):
    for b in folders[i + 1:]:
        vs = paired(results[a]["correct"], results[b]["correct"])
        print(json.dumps(dict(a=a, b=b, diff=vs["diff"], ci95=vs["ci95"], p=vs["p"], a_only=vs["a_only"],
                              b_only=vs["b_only"])), flush=True)
