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

Adaptive projected guidance (APG, Sadat et al. 2024, `APG`) changes how the two predictions combine: the update
D_cond - D_uncond, averaged across calls with (reverse) momentum and cut to a norm of at most r, adds its part
orthogonal to D_cond at full weight w and its parallel part (which they found to cause over-saturation) at eta * w.
It is not linear, so unlike plain CFG it depends on the space: theirs is the denoised (x0-hat) prediction D.

Perturbed-attention guidance (PAG, Ahn et al. 2024, `pag`) adds s (D_cond - D_perturbed) to CFG's prediction, where
D_perturbed is the same network with chosen self-attention maps replaced by the identity; linear, like CFG.
Self-attention guidance (SAG, Hong et al. 2023) is in ldm.diffusion.sag: its third prediction is made at another
x_t (a blurred x0-hat renoised), so it needs the schedule.

InstructPix2Pix (Brooks et al. 2023, eq. 3, `pix2pix_cfg`) guides on two conditions, the input image and the
instruction, with one scale each; linear, weights summing to 1, so exact on x0-hat too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .param import append_dims


def drop_captions(captions: list[str], p: float, generator: torch.Generator | None = None) -> list[str]:
    """Each caption -> "" with probability p: one network learns p(x|c) and p(x) (Ho & Salimans 2021)."""
    keep = (torch.rand(len(captions), generator=generator) >= p).tolist()
    return [c if k else "" for c, k in zip(captions, keep)]


def is_per_sample(value, batch: int) -> bool:
    """Whether an extra_arg holds one row per sample (context, masks, a per-sample w), not a shared option."""
    return torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch


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
        elif is_per_sample(value, batch):
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


@dataclass(frozen=True)
class APG:
    """Adaptive projected guidance's settings (Sadat et al. 2024, Algorithm 1); r = inf, eta = 1, beta = 0 is CFG."""

    r: float                  # ||dD|| per sample cut to at most r: on the scale of D's norm, so of the model and
                              # the image size (they used 2.5 for EDM2's 64x64x4 latents, 15 for SD-XL's 128x128x4)
    eta: float = 0.0          # weight of dD's part parallel to D_cond: 0 drops it, as they recommend
    beta: float = -0.5        # momentum across calls: < 0 pushes away from the previous updates (their "reverse
                              # momentum"; -0.5 in their SD-XL settings), 0 off

    def __post_init__(self):
        if not self.r > 0 or not math.isfinite(self.eta) or not -1 < self.beta < 1:   # also refuses NaN
            raise ValueError(f"APG needs r > 0 (inf: no cut), a finite eta and -1 < beta < 1; got r={self.r:g}, "
                             f"eta={self.eta:g}, beta={self.beta:g}")

    @property
    def is_cfg(self) -> bool:
        return self.r == math.inf and self.eta == 1 and self.beta == 0


def project(v: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_par, v_perp): v_par = <v, u> u with u = onto / ||onto||, v_perp = v - v_par, per sample over all non-batch
    dims (Sadat et al. 2024, sec. 3), in float64 (in low precision <v, u> is a sum of many terms that cancel)."""
    dims = list(range(1, v.ndim))
    v64, u = v.double(), onto.double()
    u = u / append_dims(u.flatten(1).norm(dim=1).clamp_min(1e-30), v.ndim)       # unit vectors; 0 stays 0
    par = (v64 * u).sum(dim=dims, keepdim=True) * u
    return par.to(v.dtype), (v64 - par).to(v.dtype)


def apg_guided(cond: torch.Tensor, uncond: torch.Tensor, w, apg: APG, average: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(guided, new average): APG's combination of one call's predictions (Sadat et al. 2024, Algorithm 1).

    average: the momentum's running update from this run's previous calls (None at the first); pass the returned
    one to the next call. w: float or per-sample (B,) tensor, our convention (their scale w' = 1 + w)."""
    diff = cond - uncond                                                # dD = D_cond - D_uncond
    if apg.beta and average is not None:                                # dD_k <- dD_k + beta dD_(k-1), running
        diff = diff + apg.beta * average
    average = diff
    if apg.r != math.inf:                                               # dD <- dD min(1, r / ||dD||)
        norm = diff.flatten(1).norm(dim=1)
        diff = diff * append_dims(torch.clamp(apg.r / norm, max=1.0).to(diff.dtype), diff.ndim)
    par, perp = project(diff, cond)                                     # dD = dD_par + dD_perp, along D_cond
    wt = append_dims(torch.as_tensor(w, dtype=cond.dtype, device=cond.device), cond.ndim)
    return cond + wt * (perp + apg.eta * par), average                  # D_cond + w (dD_perp + eta dD_par)


def cfg(model, w, uncond: dict, rescale: float = 0.0, interval: tuple[float, float] | None = None,
        noise_level=None, apg: APG | None = None):
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

    apg: combine the halves by adaptive projected guidance instead (`apg_guided`; Sadat et al. 2024), in the space
    `model` returns: theirs is x0-hat, so wrap a `Denoiser`. Its momentum runs over this wrapper's guided calls, so
    build one wrapper per sampling run; a sample outside the interval keeps its average. Exclusive with rescale.

    The wrapper also has `guided_and_uncond(x, t, **extra_args) -> (guided, model(uncond))`, one pass of 2B even at
    w = 0, what the CFG++ samplers call (ldm.diffusion.cfgpp); not with an interval.

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
    if apg is not None and rescale:
        raise ValueError("APG and guidance rescale both counter over-saturation (APG by cutting the update's norm to "
                         "r): use one")
    apg = None if apg is None or apg.is_cfg else apg    # r = inf, eta = 1, beta = 0: plain CFG, bit for bit
    momentum = {"average": None}                        # APG's running update, this wrapper's run only

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
        pred_cond, pred_uncond = halves(x, t, extra_args)
        out = combine(pred_cond, pred_uncond, inside)
        if inside is not None and not bool(inside.all()):
            out = torch.where(append_dims(inside, out.ndim), out, pred_cond)
        return out

    def halves(x, t, extra_args):
        """(model(cond), model(uncond)) from one pass of 2B."""
        batch = x.shape[0]
        t2 = t if t.ndim == 0 else torch.cat([t, t])
        out = model(torch.cat([x, x]), t2, **_batched_args(extra_args, uncond, batch))
        return out[:batch], out[batch:]

    def combine(pred_cond, pred_uncond, inside):
        if apg is not None:
            out, average = apg_guided(pred_cond, pred_uncond, w, apg, momentum["average"])
            if inside is not None:                      # samples outside the interval keep their average
                before = momentum["average"]
                average = torch.where(append_dims(inside, out.ndim), average,
                                      torch.zeros_like(average) if before is None else before)
            momentum["average"] = average
            return out
        wt = append_dims(torch.as_tensor(w, dtype=pred_cond.dtype, device=pred_cond.device), pred_cond.ndim)
        out = (1 + wt) * pred_cond - wt * pred_uncond
        return rescale_guided(out, pred_cond, rescale) if rescale else out

    def guided_and_uncond(x, t, **extra_args):
        """(guided, model(uncond)) from one pass of 2B, at w = 0 too: CFG++ renoises with the unconditional
        prediction (Chung et al. 2024, Alg. 1; ComfyUI's disable_cfg1_optimization)."""
        pred_cond, pred_uncond = halves(x, torch.as_tensor(t, device=x.device), extra_args)
        return combine(pred_cond, pred_uncond, None), pred_uncond

    if interval is None:    # outside an interval CFG is off, and CFG++ with it has no agreed meaning: none given
        guided.guided_and_uncond = guided_and_uncond
    return guided


def pag(model, w, scale, uncond: dict, perturb, rescale: float = 0.0):
    """Model function with perturbed-attention guidance (Ahn et al. 2024) beside CFG:

        (1 + w) D(cond) - w D(uncond) + s (D(cond) - D_perturbed(cond)),

    D_perturbed the same network with chosen self-attention maps replaced by the identity (layers.Attention.perturbed).
    The paper's guided prediction is D + s (D - D_perturbed) (sec. 4); with CFG the two terms add, as their SD
    experiments and diffusers' StableDiffusionPAGPipeline do (its guidance_scale is our 1 + w, pag_scale our s).
    The weights sum to 1, so guiding x0-hat equals guiding eps-hat or v-hat at the same x_t (as for `cfg`).
    One model call: [cond; uncond; cond] (3B samples) when w != 0, [cond; cond] (2B) at w = 0, the last B perturbed.
    perturb: a (3B or 2B,) bool mask -> a context manager under which the model's chosen layers perturb those
    samples (ldm.models.unet.perturbed_self_attention bound to its layers). w, scale: floats or per-sample (B,).
    rescale: `cfg`'s phi on the guided prediction against D(cond), with CFG only (w != 0), as diffusers does.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale phi must be in [0, 1], got {rescale}")
    with_uncond = torch.is_tensor(w) or w != 0

    def guided(x, t, **extra_args):
        batch, parts = x.shape[0], 3 if with_uncond else 2
        t = torch.as_tensor(t, device=x.device)
        args = _batched_args(extra_args, uncond if with_uncond else {}, batch)   # [cond; uncond] or [cond; cond]
        if with_uncond:                                 # [cond; uncond; cond]: per-sample keys once more
            for key, value in extra_args.items():
                if is_per_sample(value, batch):
                    args[key] = torch.cat([args[key], value])
        perturbed = torch.arange(parts * batch, device=x.device) >= (parts - 1) * batch
        with perturb(perturbed):
            out = model(torch.cat([x] * parts), t if t.ndim == 0 else torch.cat([t] * parts), **args)
        pred_cond, pred_perturbed = out[:batch], out[-batch:]
        s = append_dims(torch.as_tensor(scale, dtype=out.dtype, device=out.device), out.ndim)
        guided = pred_cond + s * (pred_cond - pred_perturbed)
        if with_uncond:
            wt = append_dims(torch.as_tensor(w, dtype=out.dtype, device=out.device), out.ndim)
            guided = guided + wt * (pred_cond - out[batch:2 * batch])
            guided = rescale_guided(guided, pred_cond, rescale) if rescale else guided
        return guided
    return guided


def _stacked_args(cond: dict, nulls: list[dict], batch: int) -> dict:
    """extra_args for the batch [cond; cond with nulls[0]'s values; ...]: `_batched_args` for more than two parts."""
    parts = [_batched_args(cond, null, batch) for null in nulls]
    args = {}
    for key, value in cond.items():
        if is_per_sample(value, batch) or any(key in null for null in nulls):
            args[key] = torch.cat([value] + [part[key][batch:] for part in parts])
        else:
            args[key] = value                           # scalars and options pass through
    return args


def pix2pix_cfg(model, w, image_scale, null_text: dict, null_image: dict):
    """Model function with InstructPix2Pix's two guidance scales (Brooks et al. 2023, eq. 3):

        D(z, 0_I, 0_T) + s_I (D(z, c_I, 0_T) - D(z, 0_I, 0_T)) + s_T (D(z, c_I, c_T) - D(z, c_I, 0_T)),

    s_T = 1 + w (our convention, as `cfg`: w = 0 leaves the instruction unguided) and s_I = `image_scale` as
    diffusers' image_guidance_scale (1: the image unguided). extra_args hold c_I and c_T; `null_text` maps the
    text's keys to the empty prompt's values (batch 1 or B), `null_image` the image's keys to the null image's (the
    paper's and diffusers' zero latents). One model call of 3B: [c_I, c_T; c_I, 0_T; 0_I, 0_T], as diffusers' batch;
    at w = 0, s_I = 1 the formula is D(z, c_I, c_T) alone: one pass of B. Floats, or per-sample (B,) tensors."""
    def guided(x, t, **extra_args):
        if not torch.is_tensor(w) and not torch.is_tensor(image_scale) and w == 0 and image_scale == 1:
            return model(x, t, **extra_args)
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        args = _stacked_args(extra_args, [null_text, {**null_text, **null_image}], batch)
        out = model(torch.cat([x] * 3), t if t.ndim == 0 else torch.cat([t] * 3), **args)
        both, image, neither = out[:batch], out[batch:2 * batch], out[2 * batch:]
        s_t = append_dims(1 + torch.as_tensor(w, dtype=out.dtype, device=out.device), out.ndim)
        s_i = append_dims(torch.as_tensor(image_scale, dtype=out.dtype, device=out.device), out.ndim)
        return neither + s_t * (both - image) + s_i * (image - neither)     # eq. 3, in diffusers' order
    return guided
