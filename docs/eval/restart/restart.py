"""Restart (Xu et al. 2023) against heun, dpmpp_2m and dpmpp_2s_ancestral at equal net calls on the shipped teacher.

    OMP_NUM_THREADS=1 python docs/eval/restart/restart.py [N] [BUDGET ...]
    # N prompts (default 200); budgets 30 60 114 (net calls per image, CFG's two halves counted)

The shipped shapes64 teacher at w = 2 (the model's), the same N held-out prompts and seeds (0, 100, ... per batch of
100 prompts, as docs/eval/spacings-ays/spacings.py) for every row, judged by the oracle (prompt accuracy) and FD in
its features against N held-out real images, as `python -m ldm.eval` does. Each row is paired with heun at the same
budget (ldm.eval.compare.paired: accuracy difference, 95% CI, exact McNemar p). Each sampler takes its default grid
(karras for heun and restart, trailing for the others). Restart's nfe: 2 (2n - 1 + 2KN) on n main steps. Rows go to
stdout as JSON lines, with each prompt's outcome ("correct").
"""
import json
import sys
import time

import torch

from ldm.diffusion.restart import Restart
from ldm.eval.compare import paired
from ldm.eval.metrics import heldout_prompts
from ldm.eval.oracle import Oracle
from ldm.eval.score import evaluate_images, real_images
from ldm.pipeline import TextToImage

# budget: [(label, sampler, steps, restart)], heun first (the pairing base). None: the sampler's default restart.
ROWS = {
    30: [("heun", "heun", 8, None), ("dpmpp_2m", "dpmpp_2m", 15, None),
         ("dpmpp_2s_ancestral", "dpmpp_2s_ancestral", 8, None),
         ("restart [0.1,2] K2 N2", "restart", 4, Restart(0.1, 2.0, 2, 2)),
         ("restart [0.1,2] K1 N2", "restart", 6, Restart(0.1, 2.0, 1, 2)),
         ("restart [0.1,3] K1 N2", "restart", 6, Restart(0.1, 3.0, 1, 2))],
    60: [("heun", "heun", 15, None), ("dpmpp_2m", "dpmpp_2m", 30, None),
         ("dpmpp_2s_ancestral", "dpmpp_2s_ancestral", 15, None),
         ("restart [0.1,2] K1 N5", "restart", 10, Restart(0.1, 2.0, 1, 5)),
         ("restart [0.1,2] K2 N3", "restart", 9, Restart(0.1, 2.0, 2, 3)),
         ("restart [0.1,3] K2 N3", "restart", 9, Restart(0.1, 3.0, 2, 3)),
         ("restart [1,9] K2 N3", "restart", 9, Restart(1.0, 9.0, 2, 3))],
    114: [("heun", "heun", 29, None), ("dpmpp_2m", "dpmpp_2m", 57, None),
          ("dpmpp_2s_ancestral", "dpmpp_2s_ancestral", 29, None),
          ("restart default (20 steps: [0.1,2] K1 N9)", "restart", 20, None),
          ("restart [0.1,3] K1 N9", "restart", 20, Restart(0.1, 3.0, 1, 9))],
}
n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
budgets = [int(a) for a in sys.argv[2:]] or list(ROWS)
prompts = heldout_prompts(n, seed=0)
oracle = Oracle.load()
reals = oracle.features(real_images(n, 0))
pipe = TextToImage.from_folder("ldm/assets/shapes64")
for budget in budgets:
    base = None
    for label, sampler, steps, restart in ROWS[budget]:
        start = time.perf_counter()
        images, nfe, spacing = [], 0, None
        options = {} if restart is None else {"restart": restart}
        for i in range(0, n, 100):
            out, info = pipe.generate(prompts[i:i + 100], steps=steps, seed=i, teacher=True, sampler=sampler,
                                      **options)
            images.append(out)
            nfe, spacing = info["nfe"], info["spacing"]
        r = evaluate_images(oracle, torch.cat(images), prompts, reals)
        base = base or r
        vs = paired(base["correct"], r["correct"])
        print(json.dumps(dict(budget=budget, label=label, sampler=sampler, steps=steps, spacing=spacing,
                              restart=None if restart is None else list(restart), nfe=nfe, accuracy=r["accuracy"],
                              fd=r["fd"], vs_heun=dict(diff=vs["diff"], ci95=vs["ci95"], p=vs["p"]),
                              seconds=round(time.perf_counter() - start, 1), correct=r["correct"])), flush=True)
