"""Image grids: PNG files and tensorboard images for validation samples."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1], C in {1, 3} -> uint8 (H', W', C) grid, `nrow` images per row."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"make_grid expects (N, 1|3, H, W) images, got shape {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    n, c, h, w = images.shape
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C)
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), np.uint8)
    for i in range(n):
        y = (i // nrow) * (h + padding) + padding
        x = (i % nrow) * (w + padding) + padding
        grid[y:y + h, x:x + w] = pixels[i]
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Image.Image:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid; returns the PIL image."""
    grid = make_grid(images, nrow)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return image


def log_images(accelerator: Accelerator, images: torch.Tensor, step: int, tag: str = "val/samples",
               output_dir: str | Path | None = None, nrow: int = 8) -> None:
    """On the main process: save `output_dir/samples/step-<step>.png` and log the grid to tensorboard."""
    if not accelerator.is_main_process:
        return
    grid = make_grid(images, nrow)
    if output_dir is not None:
        save_image_grid(images, Path(output_dir) / "samples" / f"step-{step:06d}.png", nrow)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: grid[None]}, step=step, dataformats="NHWC")
