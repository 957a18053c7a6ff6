"""Session-22 check (docs/sampling.md): FreeU on the shipped model's 4-step student and 16-step teacher.

    OMP_NUM_THREADS=1 python docs/provenance/freeu_sweep.py [N]     # N held-out prompts (default 500)

w = 2, seeds 0, 100, ... per batch of 100 prompts; prompt accuracy and FD from the oracle, as
`python -m ldm.eval` does. Factors (b1, b2, s1, s2) as `--freeu` takes them.
"""
import json
import sys

import torch

from ldm.eval.metrics import heldout_prompts
from ldm.eval.oracle import Oracle
from ldm.eval.score import evaluate_images, real_images
from ldm.pipeline import TextToImage

n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
prompts = heldout_prompts(n, seed=0)
oracle = Oracle.load()
reals = oracle.features(real_images(n, 0))
pipe = TextToImage.from_folder("ldm/assets/shapes64")
for steps, teacher in ((4, False), (16, True)):
    for factors in (None, (1.1, 1.2, 0.9, 0.2), (1.2, 1.4, 0.9, 0.2), (1.5, 1.6, 0.9, 0.2)):
        pipe.set_freeu(factors)
        images = torch.cat([pipe.generate(prompts[i:i + 100], steps=steps, seed=i, teacher=teacher)[0]
                            for i in range(0, n, 100)])
        r = evaluate_images(oracle, images, prompts, reals)
        print(json.dumps(dict(steps=steps, model="teacher" if teacher else "student-4", freeu=factors,
                              accuracy=r["accuracy"], fd=round(r["fd"], 3))), flush=True)
