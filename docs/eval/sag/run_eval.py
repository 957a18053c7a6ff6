"""Self-attention guidance (--sag) on the shipped shapes64 teacher: prompt accuracy and FD by the oracle.

    OMP_NUM_THREADS=1 python docs/eval/sag/run_eval.py STEPS [N] > docs/eval/sag/steps-STEPS.json

N held-out prompts (default 200; seeds 0, 100, ... per batch of 100, as docs/eval/samplers-kdiff/equal_nfe.py),
dpmpp_2m on the trailing grid, w = 2 (the model's) with SAG scale 0 (plain CFG), 0.5, 0.75, 1.0; plain CFG at
STEPS * 3 / 2 steps (the same net calls as SAG at STEPS: 3 a step against 2); and w = 0 with and without SAG 0.75.
Each run is judged by the oracle (prompt accuracy) and FD in its features against N held-out real images, as
`python -m ldm.eval` does, and paired per prompt (ldm.eval.compare.paired) with plain CFG at STEPS and, for SAG at
w = 2, with the equal-call CFG run. Also per run: the mean |z - z_cfg| of the latents against plain CFG at STEPS,
and for SAG the share of latent pixels the mask blurred, averaged over calls.
"""
import json
import sys
import time

import torch

import ldm.diffusion.sag as sag_module
from ldm.eval.compare import paired
from ldm.eval.metrics import heldout_prompts
from ldm.eval.oracle import Oracle
from ldm.eval.score import evaluate_images, real_images
from ldm.pipeline import TextToImage

steps = int(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
torch.set_num_threads(1)
RUNS = [  # name, guidance w, SAG scale, steps
    ("cfg", 2.0, 0.0, steps), ("sag-0.5", 2.0, 0.5, steps), ("sag-0.75", 2.0, 0.75, steps),
    ("sag-1.0", 2.0, 1.0, steps), (f"cfg-{steps * 3 // 2}-steps", 2.0, 0.0, steps * 3 // 2),
    ("w0", 0.0, 0.0, steps), ("w0-sag-0.75", 0.0, 0.75, steps)]

masked = []                                   # the mask's mean over each call's latents (a driver-side tap)
plain_mask = sag_module.attention_mask


def tapped_mask(*args, **kwargs):
    mask = plain_mask(*args, **kwargs)
    masked.append(float(mask.mean()))
    return mask


sag_module.attention_mask = tapped_mask

prompts = heldout_prompts(n, seed=0)
oracle = Oracle.load()
reals = oracle.features(real_images(n, 0))
pipe = TextToImage.from_folder("ldm/assets/shapes64")
results, latents = {}, {}
for name, w, scale, k in RUNS:
    masked.clear()
    start = time.perf_counter()
    zs, nfe = [], 0
    for i in range(0, n, 100):
        z, info = pipe.sample(prompts[i:i + 100], steps=k, seed=i, teacher=True, sampler="dpmpp_2m", guidance=w,
                              sag_scale=scale)
        zs.append(z)
        nfe = info["nfe"]
    z = torch.cat(zs)
    seconds = time.perf_counter() - start
    r = evaluate_images(oracle, pipe.decode(z), prompts, reals)
    latents[name] = z
    row = dict(name=name, guidance=w, sag=scale, steps=k, nfe_per_image=nfe, calls_per_step=nfe / k,
               accuracy=r["accuracy"], fd=r["fd"], sampling_s=round(seconds, 1),
               mean_abs_dz_vs_cfg=float((z - latents["cfg"]).abs().mean()),
               masked_share=sum(masked) / len(masked) if masked else None, correct=r["correct"])
    base = "w0" if w == 0 and name != "w0" else "cfg"
    if name not in ("cfg", "w0"):
        vs = paired(results[base]["correct"], r["correct"])
        row[f"vs_{base}"] = dict(diff=vs["diff"], ci95=vs["ci95"], p=vs["p"])
    results[name] = row
    print(json.dumps({k2: v for k2, v in row.items() if k2 != "correct"}), file=sys.stderr, flush=True)
equal = results[f"cfg-{steps * 3 // 2}-steps"]
for name in ("sag-0.5", "sag-0.75", "sag-1.0"):
    vs = paired(equal["correct"], results[name]["correct"])
    results[name][f"vs_cfg_{steps * 3 // 2}_steps"] = dict(diff=vs["diff"], ci95=vs["ci95"], p=vs["p"])
json.dump(dict(setup=dict(model="ldm/assets/shapes64", prompts=n, steps=steps, sampler="dpmpp_2m",
                          spacing="trailing", seeds="0, 100, ... per batch of 100", threads=1,
                          torch=torch.__version__),
               runs=list(results.values())), sys.stdout, indent=1)
print()
