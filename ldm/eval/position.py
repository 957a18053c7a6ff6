"""Do position words move objects? A fast probe of a shapes-world model (no oracle needed).

For "a large red circle" with each position suffix (on the left / on the right / at the top / at
the bottom), it samples the same noise for every prompt and measures where the red is: the
centroid of the redness max(0, R - (G + B) / 2), which is 0 on the white, gray and black
backgrounds and proportional to "how red" on a blurry prediction. The score is the
shift the words cause, x(left) - x(right) and y(top) - y(bottom) in pixels: 0 means the words
are ignored; the data's own shift (rendered scenes for the same prompts) is printed beside it.
With steps = 1 the image is the model's x0 prediction from pure noise, i.e. its conditional
mean: the first thing a diffusion model learns, so it shows position learning early in training.

It also reports where that first prediction comes from (`spread`): its variance across noise
draws for a fixed prompt against the variance of its per-prompt mean across the four prompts.
At t = 1 the input holds no image, so the ideal prediction does not depend on the noise at all;
a model whose first x0 follows the noise lays the scene out from the noise, and the words can
only recolour it later (docs/stage2-latent.md, session 8).
"""
from __future__ import annotations

import numpy as np
import torch

from ldm.data.shapes import render, scene_for_prompt

BASE = "a large red circle"
SUFFIXES = {"left": " on the left", "right": " on the right", "top": " at the top", "bottom": " at the bottom"}


def red_centroid(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) centroids in pixels (B,) of the redness of images (B, 3, H, W) in [-1, 1]."""
    r, g, b = images.unbind(1)
    weight = (r - (g + b) / 2).clamp_min(0)  # (B, H, W); gray levels give exactly 0
    h, w = weight.shape[1:]
    mass = weight.sum((1, 2)).clamp_min(1e-8)
    xs = torch.arange(w, dtype=images.dtype, device=images.device)
    ys = torch.arange(h, dtype=images.dtype, device=images.device)
    return (weight.sum(1) * xs).sum(1) / mass, (weight.sum(2) * ys).sum(1) / mass


def shifts(centres: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Horizontal shift x(left) - x(right) and vertical y(top) - y(bottom) (both < 0 when obeyed)."""
    return {"horizontal": centres["left"][0] - centres["right"][0],
            "vertical": centres["top"][1] - centres["bottom"][1]}


def data_centres(n: int, resolution: int, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Mean red centroid of n rendered scenes per position prompt: what the data says."""
    out = {}
    for key, suffix in SUFFIXES.items():
        rng = np.random.default_rng(seed)
        imgs = np.stack([render(scene_for_prompt(BASE + suffix, rng, resolution)) for _ in range(n)])
        x, y = red_centroid(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1)
        out[key] = (x.mean().item(), y.mean().item())
    return out


@torch.no_grad()
def model_samples(pipe, n: int, steps: int, guidance: float, seed: int = 0) -> torch.Tensor:
    """n teacher samples per position prompt, the same noise for each: (4 prompts, n, 3, H, W) on the CPU."""
    return torch.stack([pipe.generate([BASE + suffix] * n, steps=steps, guidance=guidance, seed=seed,
                                      teacher=True)[0].float().cpu() for suffix in SUFFIXES.values()])


def sample_centres(samples: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Mean red centroid per position prompt of `model_samples`' output."""
    out = {}
    for key, images in zip(SUFFIXES, samples):
        x, y = red_centroid(images)
        out[key] = (x.mean().item(), y.mean().item())
    return out


def spread(images: torch.Tensor) -> dict[str, float]:
    """images (P prompts, N noises, C, H, W): mean per-pixel variance over noise and over prompts."""
    return {"noise": images.var(1).mean().item(), "prompt": images.mean(1).var(0).mean().item()}


def probe(model: str, n: int = 32, steps: list[int] = (1, 16), ws: list[float] = (0.0, 4.0),
          device: str = "cpu", seed: int = 0) -> dict:
    """Shifts at each (steps, w), and the `spread` of the one-step (t = 1, w = 0) predictions."""
    from ldm.pipeline import TextToImage

    pipe = TextToImage.from_folder(model, device=device)
    truth = data_centres(n, pipe.index.resolution, seed)
    rows, first = [], None
    for s in steps:
        for w in ws:
            samples = model_samples(pipe, n, s, w, seed)
            if s == 1 and w == 0:
                first = samples
            centres = sample_centres(samples)
            rows.append(dict(steps=s, guidance=w, centres=centres, **shifts(centres)))
    if n > 1 and first is None:  # the grid has no one-step, unguided row: sample it for the spread
        first = model_samples(pipe, n, 1, 0.0, seed)
    return dict(model=model, n=n, data=dict(centres=truth, **shifts(truth)), rows=rows,
                first_step=spread(first) if n > 1 else None)


def format_probe(result: dict) -> str:
    d = result["data"]
    lines = [f"position probe of {result['model']} ({result['n']} samples per prompt; pixels; 0 = words ignored)",
             f"{'':>18} {'x(left)-x(right)':>17} {'y(top)-y(bottom)':>17}",
             f"{'data':>18} {d['horizontal']:>17.1f} {d['vertical']:>17.1f}"]
    for r in result["rows"]:
        lines.append(f"{'steps=%d w=%g' % (r['steps'], r['guidance']):>18} {r['horizontal']:>17.1f} "
                     f"{r['vertical']:>17.1f}")
    if result.get("first_step"):
        f = result["first_step"]
        lines.append(f"first step (t=1, w=0) x0 variance: {f['noise']:.4f} across noise, {f['prompt']:.4f} "
                     "across the 4 prompts (ideal: 0 across noise)")
    return "\n".join(lines)
