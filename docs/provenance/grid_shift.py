"""Session-26 check (docs/sampling.md, "Grid shift"): a teacher's few-step samples with its time grid shifted
(`--shift S`: log-SNR lower by 2 log S at every grid time, SD3's eq. 23).

    OMP_NUM_THREADS=2 python docs/provenance/grid_shift.py N STEPS SHIFTS MODEL_DIR [MODEL_DIR ...]

STEPS and SHIFTS are comma lists (e.g. 4,8 and 1,2,3). Each model folder's teacher with DDIM and
DPM-Solver++(2M) on the trailing grid, w = 2, seeds 0, 100, ... per batch of 100 prompts; N held-out prompts
judged by the oracle (prompt accuracy) and FD in its features against N held-out real images, as
`python -m ldm.eval` does (docs/provenance/flow_samplers.py with a shift).
"""
import json
import sys

import torch

from ldm.eval.metrics import heldout_prompts
from ldm.eval.oracle import Oracle
from ldm.eval.score import evaluate_images, real_images
from ldm.pipeline import TextToImage

n, folders = int(sys.argv[1]), sys.argv[4:]
steps_list = [int(s) for s in sys.argv[2].split(",")]
shifts = [float(s) for s in sys.argv[3].split(",")]
prompts = heldout_prompts(n, seed=0)
oracle = Oracle.load()
reals = oracle.features(real_images(n, 0))
for folder in folders:
    pipe = TextToImage.from_folder(folder)
    for steps in steps_list:
        for sampler in ("ddim", "dpmpp_2m"):
            for shift in shifts:
                images = []
                for i in range(0, n, 100):
                    out, info = pipe.generate(prompts[i:i + 100], steps=steps, seed=i, teacher=True, sampler=sampler,
                                              spacing="trailing", guidance=2.0, shift=shift)
                    images.append(out)
                r = evaluate_images(oracle, torch.cat(images), prompts, reals)
                print(json.dumps(dict(model=folder, steps=steps, sampler=sampler, shift=shift, nfe=info["nfe"],
                                      accuracy=r["accuracy"], fd=r["fd"], correct=r["correct"])), flush=True)
