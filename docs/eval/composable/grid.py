"""samples.png: the first 12 prompts (columns) drawn by each run of run.py (rows, in RUNS' order), from its PNGs.
python docs/eval/composable/grid.py"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.eval.score import load_images
from ldm.training.images import make_grid

OUT = Path(__file__).parent
RUNS = ["plain", "and-objects", "and-full", "and-full-norm", "plain-w8"]

if __name__ == "__main__":
    images = torch.cat([load_images(OUT / "images" / run, list(range(12))) for run in RUNS])   # (5 x 12, 3, H, W)
    grid = make_grid(images.float() / 127.5 - 1, nrow=12, padding=2)
    Image.fromarray(np.ascontiguousarray(grid)).save(OUT / "samples.png")
    print("\n".join(f"column {i}: {line}" for i, line in
                    enumerate((OUT / "prompts.txt").read_text().splitlines()[:12])))
