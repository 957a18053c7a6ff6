"""grid.png: 8 held-out prompts (columns) drawn by the shipped teacher, dpmpp_2m, 32 steps, w = 2, seed 0, under
(rows) the full U-Net, --deepcache 2:0, 3:0, 5:0, 3:2, 5:3.

    OMP_NUM_THREADS=1 python docs/eval/deepcache/grid.py
"""
import os

import torch
from PIL import Image

from ldm.eval.metrics import heldout_prompts
from ldm.pipeline import TextToImage
from ldm.training.images import make_grid

prompts = heldout_prompts(8, seed=0)
pipe = TextToImage.from_folder("ldm/assets/shapes64")
rows = []
for deepcache in [None, (2, 0), (3, 0), (5, 0), (3, 2), (5, 3)]:
    pipe.set_deepcache(*(deepcache or (None,)))
    rows.append(pipe.generate(prompts, steps=32, seed=0, teacher=True, sampler="dpmpp_2m")[0])
grid = make_grid(torch.cat(rows), nrow=len(prompts))
Image.fromarray(grid).save(os.path.join(os.path.dirname(__file__), "grid.png"))
print("\n".join(f"{i}: {p}" for i, p in enumerate(prompts)))
