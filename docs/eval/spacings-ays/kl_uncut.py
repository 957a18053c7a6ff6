"""Ablation: kl_optimal over the shipped teacher's whole range of s = sigma / alpha (4.5e-5 to 22026, log-SNR +-20)
instead of the [0.002, 80] cut it shares with karras and exponential, to see whether the cut start costs it.

    OMP_NUM_THREADS=1 python docs/eval/spacings-ays/kl_uncut.py [N] [K ...]   # default 200 prompts, K: 8 16

Same prompts, seeds, oracle, FD and JSON rows as spacings.py; each row paired with that run's trailing grid, drawn
again here (it reproduces spacings.py's rows exactly).
"""
import json
import math
import sys

import torch

import ldm.diffusion.schedules as schedules
from ldm.eval.compare import paired
from ldm.eval.metrics import heldout_prompts
from ldm.eval.oracle import Oracle
from ldm.eval.score import evaluate_images, real_images
from ldm.pipeline import TextToImage

n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
ks = [int(a) for a in sys.argv[2:]] or [8, 16]
prompts = heldout_prompts(n, seed=0)
oracle = Oracle.load()
reals = oracle.features(real_images(n, 0))
pipe = TextToImage.from_folder("ldm/assets/shapes64")
cut = schedules.KARRAS_SIGMAS
for k in ks:
    for sampler in ["dpmpp_2m", "euler"]:
        base = None
        for spacing, ends in [("trailing", cut), ("kl_optimal", (0.0, math.inf))]:
            schedules.KARRAS_SIGMAS = ends          # read by Schedule._sigma_grid at each call
            images = torch.cat([pipe.generate(prompts[i:i + 100], steps=k, seed=i, teacher=True, sampler=sampler,
                                              spacing=spacing)[0] for i in range(0, n, 100)])
            r = evaluate_images(oracle, images, prompts, reals)
            base = base or r
            vs = paired(base["correct"], r["correct"])
            ts = pipe.schedule.timesteps(k, spacing=spacing)[:-1]
            alpha, sigma = pipe.schedule.alpha_sigma(ts)
            schedules.KARRAS_SIGMAS = cut
            label = spacing if spacing == "trailing" else spacing + "_uncut"
            print(json.dumps(dict(steps=k, sampler=sampler, spacing=label, accuracy=r["accuracy"], fd=r["fd"],
                                  vs_trailing=dict(diff=vs["diff"], ci95=vs["ci95"], p=vs["p"]),
                                  s=[round(float(v), 5) for v in sigma / alpha], correct=r["correct"])), flush=True)
