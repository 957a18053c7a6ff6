"""Session-25 check (docs/stage2-latent.md, "Rectified flow against the preset"): few-step samplers on the
teachers of the comparison runs.

    OMP_NUM_THREADS=2 python docs/provenance/flow_samplers.py N MODEL_DIR [MODEL_DIR ...]

Each model folder's teacher at 4 steps (8 NFE with CFG) with DDIM and DPM-Solver++(2M) on the trailing grid, w = 2,
seeds 0, 100, ... per batch of 100 prompts; N held-out prompts judged by the oracle (prompt accuracy) and
FD in its features against N held-out real images, as `python -m ldm.eval` does (docs/provenance/sampler_grid.py
with a model argument).
"""
import json
import sys

import torch

from ldm.eval.metrics import heldout_prompts
from ldm.eval.oracle import Oracle
from ldm.eval.score import evaluate_images, real_images
from ldm.pipeline import TextToImage

n, folders = int(sys.argv[1]), sys.argv[2:]
prompts = heldout_prompts(n, seed=0)
oracle = Oracle.load()
reals = oracle.features(real_images(n, 0))
for folder in folders:
    pipe = TextToImage.from_folder(folder)
    for steps in (4,):
        for sampler in ("ddim", "dpmpp_2m"):
            images = []
            for i in range(0, n, 100):
                out, info = pipe.generate(prompts[i:i + 100], steps=steps, seed=i, teacher=True, sampler=sampler,
                                          spacing="trailing", guidance=2.0)
                images.append(out)
            r = evaluate_images(oracle, torch.cat(images), prompts, reals)
            print(json.dumps(dict(model=folder, steps=steps, sampler=sampler, nfe=info["nfe"],
                                  accuracy=r["accuracy"], fd=r["fd"])), flush=True)
