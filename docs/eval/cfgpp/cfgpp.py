"""CFG++ (euler_cfg_pp, dpmpp_2m_cfg_pp) against CFG (euler, dpmpp_2m) on the shipped teacher, with a guidance sweep.

    OMP_NUM_THREADS=1 python docs/eval/cfgpp/cfgpp.py N STEPS [SAMPLER:W ...] > rows.jsonl
    # default runs: euler:2 dpmpp_2m:2, then euler_cfg_pp and dpmpp_2m_cfg_pp at w -0.5 0 0.5 1 2

w is our guidance weight; CFG++'s scale (the paper's lambda, ComfyUI's cfg) is 1 + w: w = -0.5 is lambda = 0.5,
inside the paper's [0, 1]. Every run has the same NFE (CFG's two calls a step; CFG++ makes two even at w = 0). The
trailing grid, seeds 0, 100, ... per batch of 100 prompts, 200 held-out prompts judged by the oracle (prompt accuracy)
and FD in its features against N held-out real images, as docs/eval/samplers-kdiff/equal_nfe.py; each CFG++ row is
paired (ldm.eval.compare.paired: B - A, 95% CI, exact McNemar p) with its plain sampler at w = 2 at the same steps.
Rows go to stdout as JSON lines with each prompt's outcome ("correct") and the run's wall time.
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
RUNS = [(a.split(":")[0], float(a.split(":")[1])) for a in sys.argv[3:]] or (
    [("euler", 2.0), ("dpmpp_2m", 2.0)] +
    [(s, w) for s in ("euler_cfg_pp", "dpmpp_2m_cfg_pp") for w in (-0.5, 0.0, 0.5, 1.0, 2.0)])
PLAIN = {"euler_cfg_pp": "euler", "dpmpp_2m_cfg_pp": "dpmpp_2m"}
prompts = heldout_prompts(n, seed=0)
oracle = Oracle.load()
reals = oracle.features(real_images(n, 0))
pipe = TextToImage.from_folder("ldm/assets/shapes64")
base = {}
for sampler, w in RUNS:
    start = time.perf_counter()
    images, nfe = [], 0
    for i in range(0, n, 100):
        out, info = pipe.generate(prompts[i:i + 100], steps=steps, guidance=w, seed=i, teacher=True, sampler=sampler)
        images.append(out)
        nfe = info["nfe"]
    r = evaluate_images(oracle, torch.cat(images), prompts, reals)
    row = dict(steps=steps, sampler=sampler, w=w, nfe=nfe, accuracy=r["accuracy"], fd=r["fd"],
               seconds=round(time.perf_counter() - start, 1))
    if w == 2.0 and sampler in PLAIN.values():
        base[sampler] = r["correct"]
    reference = PLAIN.get(sampler)
    if reference in base:
        vs = paired(base[reference], r["correct"])
        row[f"vs_{reference}_w2"] = dict(diff=vs["diff"], ci95=vs["ci95"], p=vs["p"])
    print(json.dumps({**row, "correct": r["correct"]}), flush=True)
