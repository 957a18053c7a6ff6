"""Classifier-free guidance (Ho & Salimans 2021) as a model wrapper, not a sampler feature.

Convention (project-wide, Imagen / Meng et al. 2023):
    pred_w = (1 + w) * pred_cond - w * pred_uncond,   w = 0 is the plain conditional model.
Stable Diffusion's guidance scale is sd_scale = 1 + w (sd_scale 7.5 <=> w = 6.5); so is diffusers' FLUX.1
"true CFG" scale, neg + s (pos - neg): w = s - 1, our wrapper around the guidance-distilled net (FLUX.1-dev).
Because the weights sum to 1, guiding x0-hat equals guiding eps-hat or v-hat at the same x_t,
so wrapping the x0 model function (e.g. a `Denoiser`) is exact. Guidance rescale is not linear:
it depends on the space it runs in (the net's own, as diffusers' `guidance_rescale`, see `cfg`).
"""
from __future__ import annotations

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


def cfg(model, w, uncond: dict, rescale: float = 0.0):
    """Model function (x, t, **extra_args) -> (1 + w) * model(cond) - w * model(uncond).

    `extra_args` carry the conditioning, e.g. context (B, L, D) and context_mask (B, L);
    `uncond` maps the same keys to the unconditional values (batch 1 or B), e.g. the embedding
    of the empty prompt and its mask. Keys absent from `uncond` are shared by both halves.
    cond and uncond run as one batch of 2B. w: float or per-sample (B,) tensor.
    rescale: phi of `rescale_guided` (0 = off), in the space `model` returns: wrap the raw net
    (then a `Denoiser` around the result) to rescale its eps / v as diffusers does.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale phi must be in [0, 1], got {rescale}")
    def guided(x, t, **extra_args):
        if not torch.is_tensor(w) and w == 0:
            return model(x, t, **extra_args)            # w = 0 is the conditional model: one pass
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t2 = t if t.ndim == 0 else torch.cat([t, t])
        out = model(torch.cat([x, x]), t2, **_batched_args(extra_args, uncond, batch))
        pred_cond, pred_uncond = out[:batch], out[batch:]
        wt = append_dims(torch.as_tensor(w, dtype=out.dtype, device=out.device), out.ndim)
        guided = (1 + wt) * pred_cond - wt * pred_uncond
        return rescale_guided(guided, pred_cond, rescale) if rescale else guided
    return guided
