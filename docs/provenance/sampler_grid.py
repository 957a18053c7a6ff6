"""Session-21 check (docs/sampling.md): the shipped teacher under each sampler and time grid.

    OMP_NUM_THREADS=2 python docs/provenance/sampler_grid.py [N] [SAMPLER:SPACING ...]   # N prompts (default 500)

w = 2 (the model's default), seeds 0, 100, ... per batch of 100 prompts, judged by the oracle (prompt
accuracy) and FD in its features against N held-out real images, as `python -m ldm.eval` does.
"""
import json
import sys

import torch

from ldm.eval.metrics import heldout_prompts
from ldm.eval.oracle import Oracle
from ldm.eval.score import evaluate_images, real_images
from ldm.pipeline import TextToImage

n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
GRIDS = [tuple(a.split(":")) for a in sys.argv[2:]] or [          # SAMPLER:SPACING arguments, else session 21's
    ("ddim", "trailing"), ("dpmpp_2m", "trailing"), ("heun", "trailing"), ("dpmpp_2m", "karras"), ("heun", "karras")]
prompts = heldout_prompts(n, seed=0)
oracle = Oracle.load()
reals = oracle.features(real_images(n, 0))
pipe = TextToImage.from_folder("ldm/assets/shapes64")
rows = []
for steps in (8, 16):
    for sampler, spacing in GRIDS:
        images, nfe = [], 0
        for i in range(0, n, 100):
            out, info = pipe.generate(prompts[i:i + 100], steps=steps, seed=i, teacher=True, sampler=sampler,
                                      spacing=spacing)
            images.append(out)
            nfe = info["nfe"]
        r = evaluate_images(oracle, torch.cat(images), prompts, reals)
        rows.append(dict(steps=steps, sampler=sampler, spacing=spacing, nfe=nfe, accuracy=r["accuracy"], fd=r["fd"]))
        print(json.dumps(rows[-1]), flush=True)
