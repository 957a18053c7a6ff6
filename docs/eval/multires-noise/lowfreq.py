"""Large-scale statistics of generated images against the real held-out images: what multi-resolution noise is meant
to free (Whitaker 2023; the offset-noise argument), measured on the 200 images score.py draws (same prompts, noise).

    OMP_NUM_THREADS=1 python docs/eval/multires-noise/lowfreq.py N FOLDER [FOLDER ...]

Per image (uint8 pixels / 255): its mean over all pixels and channels, and its 4x4 average-pooled picture minus that
mean (the coarse layout). One JSON line per source: the std over images of the mean (how far images range from
mid-grey) and the RMS of the coarse part (large-scale contrast); "real" first.
"""
import json
import sys

import torch
import torch.nn.functional as F

from ldm.eval.metrics import heldout_prompts
from ldm.eval.score import real_images, to_uint8
from ldm.pipeline import TextToImage


def large_scale(pixels: torch.Tensor) -> dict:
    """std over images of each image's mean, RMS of its 4x4-pooled picture around that mean (uint8 in)."""
    x = pixels.float() / 255
    mean = x.mean(dim=(1, 2, 3))
    coarse = F.adaptive_avg_pool2d(x, 4) - mean.view(-1, 1, 1, 1)
    return {"mean_std": float(mean.std()), "mean_avg": float(mean.mean()), "coarse_rms": float(coarse.pow(2).mean().sqrt())}


n, folders = int(sys.argv[1]), sys.argv[2:]
prompts = heldout_prompts(n, seed=0)
print(json.dumps({"source": "real", **large_scale(real_images(n, 0))}), flush=True)
for folder in folders:
    pipe = TextToImage.from_folder(folder)
    images = torch.cat([pipe.generate(prompts[i:i + 100], steps=32, seed=i, teacher=True, sampler="dpmpp_2m")[0]
                        for i in range(0, n, 100)])
    print(json.dumps({"source": folder, **large_scale(to_uint8(images))}), flush=True)
