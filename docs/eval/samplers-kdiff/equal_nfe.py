"""k-diffusion's samplers against euler and dpmpp_2m on the shipped teacher at equal net calls.

    OMP_NUM_THREADS=1 python docs/eval/samplers-kdiff/equal_nfe.py [N] [K ...] [SAMPLER:SPACING ...]
    # N prompts (default 200), K: 4 8; default runs: the samplers below on the trailing grid

A single-step second-order sampler (dpm_2, dpm_2_ancestral, dpmpp_2s_ancestral, dpmpp_sde) at K steps calls the
net 2K - 1 times (the last step is Euler), as euler, dpmpp_2m and lms do at 2K - 1 steps: same NFE (CFG: twice
that). The trailing grid unless SAMPLER:SPACING says, w = 2 (the model's), seeds 0, 100, ... per batch of 100
prompts (as docs/provenance/sampler_grid.py), judged by the oracle (prompt accuracy) and FD in its features against N
held-out real images, as `python -m ldm.eval` does; each row paired with the first run at the same NFE
(ldm.eval.compare; dpmpp_2m by default). Rows go to stdout as JSON lines, with each prompt's outcome ("correct").
"""
import json
import sys

import torch

from ldm.eval.compare import paired
from ldm.eval.metrics import heldout_prompts
from ldm.eval.oracle import Oracle
from ldm.eval.score import evaluate_images, real_images
from ldm.pipeline import TextToImage

n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
ks = [int(k) for k in sys.argv[2:] if ":" not in k] or [4, 8]
SINGLE = ["dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"]   # two calls a step but the last
RUNS = [tuple(a.split(":")) for a in sys.argv[2:] if ":" in a] or [
    (s, "trailing") for s in ["dpmpp_2m", "euler", "lms"] + SINGLE]
prompts = heldout_prompts(n, seed=0)
oracle = Oracle.load()
reals = oracle.features(real_images(n, 0))
pipe = TextToImage.from_folder("ldm/assets/shapes64")
for k in ks:
    base = None
    for sampler, spacing in RUNS:
        steps = k if sampler in SINGLE else 2 * k - 1
        images, nfe = [], 0
        for i in range(0, n, 100):
            out, info = pipe.generate(prompts[i:i + 100], steps=steps, seed=i, teacher=True, sampler=sampler,
                                      spacing=spacing)
            images.append(out)
            nfe = info["nfe"]
        r = evaluate_images(oracle, torch.cat(images), prompts, reals)
        base = base or r
        vs = paired(base["correct"], r["correct"])
        print(json.dumps(dict(steps=steps, sampler=sampler, spacing=spacing, nfe=nfe, accuracy=r["accuracy"],
                              fd=r["fd"],
                              vs_first=dict(diff=vs["diff"], ci95=vs["ci95"], p=vs["p"]), correct=r["correct"])),
              flush=True)
