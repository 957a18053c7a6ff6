"""Classifier-free guidance (Ho & Salimans 2021) as a model wrapper, not a sampler feature.

Convention (project-wide, Imagen / Meng et al. 2023):
    pred_w = (1 + w) * pred_cond - w * pred_uncond,   w = 0 is the plain conditional model.
Stable Diffusion's guidance scale is sd_scale = 1 + w (sd_scale 7.5 <=> w = 6.5); so is diffusers' FLUX.1
"true CFG" scale, neg + s (pos - neg): w = s - 1, our wrapper around the guidance-distilled net (FLUX.1-dev).
Because the weights sum to 1, guiding x0-hat equals guiding eps-hat or v-hat at the same x_t,
so wrapping the x0 model function (e.g. a `Denoiser`) is exact. Guidance rescale is not linear:
it depends on the space it runs in (the net's own, as diffusers' `guidance_rescale`, see `cfg`).

A guidance interval (Kynkaanniemi et al. 2024) limits CFG to noise levels lo < sigma <= hi, on EDM's axis
sigma = sigma_t / alpha_t (`edm_sigma`), which every schedule maps to; elsewhere the conditional model runs alone.
"""
from __future__ import annotations

import math

import torch

from .param import append_dims


def drop_captions(captions: list[str], p: float, generator: torch.Generator | None = None) -> list[str]:
    """Each caption -> "" with probability p: one network learns p(x|c) and p(x) (Ho & Salimans 2021)."""
    keep = (torch.rand(len(captions), generator=generator) >= p).tolist()
    return [c if k else "" for c, k in zip(captions, keep)]


def _batched_args(cond: dict, uncond: dict, batch: int) -> dict:
    """extra_args for the doubled batch [cond; uncond]: keys in `uncond` get their uncond value, others repeat."""
    for key in uncond:
        if key not in cond:
            raise ValueError(f"uncond has key {key!r} that the conditional extra_args lack: {sorted(cond)}")
    args = {}
    for key, value in cond.items():
        if key in uncond:
            u = torch.as_tensor(uncond[key]).to(value.device)
            if u.shape[0] == 1 and batch > 1:          # one null embedding for the whole batch
                u = u.expand(batch, *u.shape[1:])
            if u.shape != value.shape:
                raise ValueError(f"uncond[{key!r}] has shape {tuple(u.shape)}, cond has {tuple(value.shape)}")
            args[key] = torch.cat([value, u.to(value.dtype)])
        elif torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
            args[key] = torch.cat([value, value])       # per-sample but shared by both halves
        else:
            args[key] = value                           # scalars and options pass through
    return args


def rescale_guided(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2024, eqs. 15-16: guided * std(cond) / std(guided), mixed with guided by phi.

    A large w inflates the prediction's spread past anything the net saw in training (over-exposed,
    over-saturated images, worst with zero terminal SNR); the rescale brings each sample's standard
    deviation back to the conditional prediction's, and phi < 1 keeps some of the plain guided result
    (they found phi = 0.7 best). std over all but the batch dim, unbiased (torch's default)."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def edm_sigma(schedule, time_scale: float = 1.0):
    """t -> sigma_t / alpha_t, EDM's noise level (Karras et al. 2022, sec. 2), for a model called with time
    t * time_scale on `schedule`: VP sqrt((1 - alpha_bar) / alpha_bar), rectified flow t / (1 - t), VE sigma_t.
    float64, shaped like t; 0 for clean data (t < 0), inf where alpha = 0 (pure noise)."""
    def sigma(t):
        t = torch.as_tensor(t)
        alpha, sig = schedule.alpha_sigma(t if time_scale == 1.0 else t.double() / time_scale)
        return sig / alpha
    return sigma


def check_interval(interval) -> tuple[float, float]:
    """(lo, hi) as floats with 0 <= lo < hi <= inf (0 and inf: unbounded), else ValueError."""
    lo, hi = (float(v) for v in interval)
    if not 0.0 <= lo < hi:          # also refuses NaN
        raise ValueError(f"guidance interval ({lo:g}, {hi:g}]: need 0 <= LO < HI (EDM sigma = sigma_t / alpha_t)")
    return lo, hi


def in_interval(sigma: torch.Tensor, interval: tuple[float, float]) -> torch.Tensor:
    """Where guidance acts: lo < sigma <= hi, lo excluded and hi included (Kynkaanniemi et al. 2024, eq. 6)."""
    lo, hi = interval
    return (sigma > lo) & (sigma <= hi)


def cfg(model, w, uncond: dict, rescale: float = 0.0, interval: tuple[float, float] | None = None,
        noise_level=None):
    """Model function (x, t, **extra_args) -> (1 + w) * model(cond) - w * model(uncond).

    `extra_args` carry the conditioning, e.g. context (B, L, D) and context_mask (B, L);
    `uncond` maps the same keys to the unconditional values (batch 1 or B), e.g. the embedding
    of the empty prompt and its mask. Keys absent from `uncond` are shared by both halves.
    cond and uncond run as one batch of 2B. w: float or per-sample (B,) tensor.
    rescale: phi of `rescale_guided` (0 = off), in the space `model` returns: wrap the raw net
    (then a `Denoiser` around the result) to rescale its eps / v as diffusers does.
    interval: (lo, hi) with `noise_level` (t -> EDM sigma, e.g. `edm_sigma(schedule)`): guide only where
    lo < noise_level(t) <= hi (Kynkaanniemi et al. 2024; lo = 0, hi = inf is plain CFG), elsewhere return
    model(cond) from one pass of B. A batch whose per-sample t straddles a bound runs the 2B pass for all
    and takes model(cond) where outside.

    Caution: the interval is decided per call, from the t it is given. The paper keeps w constant within each
    sampler step; for samplers with one evaluation per step (ddim, euler, dpmpp_*, unipc) that is the same,
    but a step of Heun whose two evaluations lie on either side of a bound mixes a guided and an unguided slope.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale phi must be in [0, 1], got {rescale}")
    if interval is not None:
        interval = check_interval(interval)
        if noise_level is None:
            raise ValueError("a guidance interval needs noise_level: t -> EDM sigma (e.g. edm_sigma(schedule))")
        if interval == (0.0, math.inf):
            interval = None                             # everywhere: plain CFG
    def guided(x, t, **extra_args):
        if not torch.is_tensor(w) and w == 0:
            return model(x, t, **extra_args)            # w = 0 is the conditional model: one pass
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        inside = None
        if interval is not None:
            inside = in_interval(noise_level(t), interval).to(x.device).expand(batch)   # (B,)
            if not bool(inside.any()):
                return model(x, t, **extra_args)        # outside the interval: the conditional model, one pass
        t2 = t if t.ndim == 0 else torch.cat([t, t])
        out = model(torch.cat([x, x]), t2, **_batched_args(extra_args, uncond, batch))
        pred_cond, pred_uncond = out[:batch], out[batch:]
        wt = append_dims(torch.as_tensor(w, dtype=out.dtype, device=out.device), out.ndim)
        guided = (1 + wt) * pred_cond - wt * pred_uncond
        guided = rescale_guided(guided, pred_cond, rescale) if rescale else guided
        if inside is not None and not bool(inside.all()):
            guided = torch.where(append_dims(inside, out.ndim), guided, pred_cond)
        return guided
    return guided
