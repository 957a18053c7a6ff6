"""MultiDiffusion (Bar-Tal et al. 2023) as a model wrapper: a latent larger than the model's native size denoised as
overlapping native-size windows whose predictions are averaged where they overlap.

The paper fuses the windows' denoising steps Phi(x_t^i) by least squares (eq. 5),
    Psi(J_t) = argmin_J sum_i || W_i * (F_i(J) - Phi(F_i(J_t))) ||^2,
whose solution (eq. 7) is, per pixel, the W-weighted mean of the steps of the windows covering it. Its panoramas
use W_i = 1. Here the windows' x0-hat are averaged instead, and the sampler takes one step on the big latent. For a
DDIM step x_next = a x0-hat + b (x_t - alpha x0-hat) / sigma (Song et al. 2021, eq. 12) that is the same thing: the
step is affine in (x0-hat, x_t) with coefficients set by t alone, and every window covering a pixel holds that
pixel's x_t, so the mean of the windows' steps is the step of the mean x0-hat (tests/diffusion/test_multidiffusion.py
checks it for DDIM and Euler). So is any step affine in the model's outputs with t-only coefficients (Euler,
DPM-Solver++ 2M, UniPC: multistep history is the fused x0-hat, as if each window had been fused at every earlier
call). Stochastic samplers draw one noise for the big latent rather than
one per window (the paper's averaged per-window noise would shrink its variance where windows overlap).

Because it wraps the x0 model, it composes with `cfg` (either order: both are linear in the predictions; with
guidance rescale or a guidance interval `windowed(cfg(...))` decides them per window) and with every sampler.

Windows sit at 0, s, 2s, ... along each side, and one more flush with the far edge when the stride does not land
there, so every pixel is covered. Caution: extra_args that are spatial (a ControlNet's image, an inpainting U-Net's
mask, reference latents) are not cut into windows; callers refuse those.
"""
from __future__ import annotations

import torch

from .guidance import is_per_sample


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Offsets of the windows along a side: 0, stride, ..., and length - window (the last flush with the edge)."""
    if not 0 < window <= length:
        raise ValueError(f"a window of {window} does not fit a side of {length}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)      # flush with the edge: the last pixels are covered
    return starts


def window_boxes(size: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int]]:
    """(top, left) of every window over a (h, w) grid, row by row."""
    return [(top, left) for top in window_starts(size[0], window[0], stride[0])
            for left in window_starts(size[1], window[1], stride[1])]


def windowed(model, window: tuple[int, int], stride: tuple[int, int], chunk: int | None = None):
    """Model function (x, t, **extra_args) -> x0-hat for a big latent (B, C, H, W): the mean of `model`'s x0-hat over
    the (h, w) windows at `stride` covering each position (MultiDiffusion, eq. 7 with W_i = 1). All windows of all
    samples run as one batch, or `chunk` rows at a time; per-sample extra_args and t are repeated per window."""
    window, stride = tuple(window), tuple(stride)

    def fused(x, t, **extra_args):
        batch, size = x.shape[0], tuple(x.shape[-2:])
        boxes = window_boxes(size, window, stride)
        if len(boxes) == 1 and size == window:
            return model(x, t, **extra_args)    # the native size: the model itself
        h, w = window
        crops = torch.cat([x[..., top:top + h, left:left + w] for top, left in boxes])   # (n B, C, h, w)
        t = torch.as_tensor(t, device=x.device)
        rows = {key for key, value in extra_args.items() if is_per_sample(value, batch)}
        if is_per_sample(t, batch):
            rows.add("t")
        # window-major like the crops: row k * B + b is window k of sample b
        args = {key: value.repeat(len(boxes), *([1] * (value.ndim - 1))) if key in rows else value
                for key, value in {**extra_args, "t": t}.items()}
        step = len(crops) if chunk is None else chunk
        preds = []
        for i in range(0, len(crops), step):
            part = {key: value[i:i + step] if key in rows else value for key, value in args.items()}
            preds.append(model(crops[i:i + step], part.pop("t"), **part))
        preds = torch.cat(preds).view(len(boxes), batch, *crops.shape[1:])
        # eq. 7: per pixel, the sum of the covering windows' predictions over their count
        total = torch.zeros_like(x, dtype=preds.dtype)
        count = torch.zeros(size, dtype=preds.dtype, device=x.device)
        for pred, (top, left) in zip(preds, boxes):
            total[..., top:top + h, left:left + w] += pred
            count[top:top + h, left:left + w] += 1
        return total / count
    return fused
