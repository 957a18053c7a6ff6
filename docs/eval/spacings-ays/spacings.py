"""The step spacings on the shipped teacher: trailing (default), karras, exponential, beta, ays, kl_optimal.

    OMP_NUM_THREADS=1 python docs/eval/spacings-ays/spacings.py [N] [K ...] [SAMPLER ...]
    # N prompts (default 200), K steps (default 8 16), samplers (default dpmpp_2m euler)

The shipped shapes64 teacher at w = 2 (the model's), the same N held-out prompts and seeds (0, 100, ... per batch of
100 prompts, as docs/eval/samplers-kdiff/equal_nfe.py) for every row, judged by the oracle (prompt accuracy) and FD in
its features against N held-out real images, as `python -m ldm.eval` does. Each row is paired with the trailing grid
of the same sampler and steps (ldm.eval.compare.paired: accuracy difference, 95% CI, exact McNemar p). Every row
makes 2K net calls (CFG), whatever the grid. Rows go to stdout as JSON lines, with each grid's s = sigma / alpha at
its steps and each prompt's outcome ("correct").
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

SPACINGS = ["trailing", "karras", "exponential", "beta", "ays", "kl_optimal"]   # trailing first: the pairing base
n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
ks = [int(a) for a in sys.argv[2:] if a.isdigit()] or [8, 16]
samplers = [a for a in sys.argv[2:] if not a.isdigit()] or ["dpmpp_2m", "euler"]
prompts = heldout_prompts(n, seed=0)
oracle = Oracle.load()
reals = oracle.features(real_images(n, 0))
pipe = TextToImage.from_folder("ldm/assets/shapes64")
for k in ks:
    for sampler in samplers:
        base = None
        for spacing in SPACINGS:
            start = time.perf_counter()
            images, nfe = [], 0
            for i in range(0, n, 100):
                out, info = pipe.generate(prompts[i:i + 100], steps=k, seed=i, teacher=True, sampler=sampler,
                                          spacing=spacing)
                images.append(out)
                nfe = info["nfe"]
            r = evaluate_images(oracle, torch.cat(images), prompts, reals)
            base = base or r
            vs = paired(base["correct"], r["correct"])
            ts = pipe.schedule.timesteps(k, spacing=spacing)[:-1]
            alpha, sigma = pipe.schedule.alpha_sigma(ts)
            print(json.dumps(dict(steps=k, sampler=sampler, spacing=spacing, nfe=nfe, accuracy=r["accuracy"],
                                  fd=r["fd"], vs_trailing=dict(diff=vs["diff"], ci95=vs["ci95"], p=vs["p"]),
                                  s=[round(float(v), 4) for v in sigma / alpha],
                                  seconds=round(time.perf_counter() - start, 1), correct=r["correct"])), flush=True)
