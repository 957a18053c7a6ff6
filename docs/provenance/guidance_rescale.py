"""Session-22 check (docs/sampling.md): guidance rescale (Lin et al. 2024, eqs. 15-16) on the shipped teacher.

    OMP_NUM_THREADS=1 python docs/provenance/guidance_rescale.py [N]   # N held-out prompts (default 300)

16 DDIM steps on the trailing grid, w in {2, 5, 8} x phi in {0, 0.7}, seeds 0, 100, ... per batch of 100
prompts; prompt accuracy and FD from the oracle (as `python -m ldm.eval`), and two pixel statistics next to
the real images': the mean per-image standard deviation and the share of clipped pixels (|x| > 0.98 in
[-1, 1]), the over-saturation that guidance rescale is meant to undo.
"""
import json
import sys

import torch

from ldm.eval.metrics import heldout_prompts
from ldm.eval.oracle import Oracle
from ldm.eval.score import evaluate_images, real_images
from ldm.pipeline import TextToImage


def pixel_stats(images: torch.Tensor) -> dict:
    images = images.clamp(-1, 1)                   # what a PNG holds
    return dict(pixel_std=round(float(images.flatten(1).std(1).mean()), 4),
                clipped=round(float((images.abs() > 0.98).float().mean()), 4))


n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
prompts = heldout_prompts(n, seed=0)
oracle = Oracle.load()
reals = real_images(n, 0)
real_features = oracle.features(reals)
print(json.dumps({"real": pixel_stats(reals.float() / 127.5 - 1)}), flush=True)
pipe = TextToImage.from_folder("ldm/assets/shapes64")
for w in (2.0, 5.0, 8.0):
    for phi in (0.0, 0.7):
        images = torch.cat([pipe.generate(prompts[i:i + 100], steps=16, seed=i, teacher=True, guidance=w,
                                          guidance_rescale=phi)[0] for i in range(0, n, 100)])
        r = evaluate_images(oracle, images, prompts, real_features)
        print(json.dumps(dict(w=w, phi=phi, accuracy=r["accuracy"], fd=round(r["fd"], 3), **pixel_stats(images))),
              flush=True)
