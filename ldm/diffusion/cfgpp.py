"""CFG++ samplers (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion Models"),
ComfyUI's euler_cfg_pp, euler_ancestral_cfg_pp, dpmpp_2m_cfg_pp and dpmpp_2s_ancestral_cfg_pp, as samplers of
ldm.diffusion.samplers (registered there).

CFG's DDIM step renoises the guided x0-hat with the guided noise, x' = alpha' D_g + sigma' eps_g. CFG++ (their
Algorithm 1) keeps D_g but renoises with the unconditional noise prediction,

    x' = alpha' D_g + sigma' eps_u,    eps_u = (x - alpha D_u) / sigma,

so the step stays on the unconditional model's noisy manifold. Every sampler here is its plain twin with that one
change, as ComfyUI writes them (k_diffusion/sampling.py, sample_*_cfg_pp): wherever the twin steps along
(y - D) / s (y = x / alpha, s = sigma / alpha, the slope = eps) it takes eps_u. When the unconditional and the
conditional predictions agree each equals its twin (euler_cfg_pp: euler and ddim). The form in eps_u is the same
for every schedule (VP, zero terminal SNR, rectified flow), alpha = 0 at the start included.

Guidance scale. D_g = D_u + lambda (D_c - D_u): the paper's lambda, in [0, 1] there (0: unconditional, 1:
conditional, no extrapolation), is ComfyUI's cfg for these samplers and our 1 + w; so the paper's range is
w in [-1, 0], and w = 0 is the conditional x0-hat renoised with the unconditional noise (not the plain conditional
sampler: that takes eps_c). The model must give D_u beside D_g: `cfg`'s wrapper does, by its `guided_and_uncond`
(one pass of 2B even at w = 0, as ComfyUI turns off its w = 0 shortcut for them). Other model functions (the
distilled students, a guidance interval, PAG) have none and are refused.
"""
from __future__ import annotations

import math

import torch

# ldm.diffusion's __init__ imports .samplers first, which imports this module at its end: these exist by then.
from .kdiffusion import _ancestral_levels, _check_eta, _levels, _midpoint
from .samplers import _half_logsnr, _noise, _notify, _prepare


def _prepare_cfg_pp(model, x, ts, schedule, extra_args, disable, name: str):
    """`_prepare` on the model's `guided_and_uncond`: denoise(x, t) -> (guided x0-hat, unconditional x0-hat)."""
    both = getattr(model, "guided_and_uncond", None)
    if both is None:
        raise ValueError(f"{name} (CFG++) needs the unconditional prediction beside the guided one: wrap the model in "
                         "ldm.diffusion.guidance.cfg without a guidance interval (a distilled student, PAG or another "
                         "model function gives only one prediction)")
    return _prepare(both, x, ts, schedule, extra_args, disable)


def _eps(x, uncond, alpha: float, sigma: float):
    """The unconditional noise prediction eps_u = (x - alpha D_u) / sigma, CFG++'s renoising direction."""
    return (x - alpha * uncond) / sigma


@torch.no_grad()
def sample_euler_cfg_pp(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None):
    """Euler / DDIM with CFG++ (Chung et al. 2024, Alg. 1; ComfyUI's euler_cfg_pp): x' = alpha' D_g + sigma' eps_u."""
    denoise, steps = _prepare_cfg_pp(model, x, ts, schedule, extra_args, disable, "euler_cfg_pp")
    for st in steps:
        denoised, uncond = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        x = st.alpha_next * denoised + st.sigma_next * _eps(x, uncond, st.alpha, st.sigma)
    return x


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None,
                                  generator=None, eta: float = 1.0):
    """Euler ancestral with CFG++ (ComfyUI's euler_ancestral_cfg_pp): y' = D_g + s_down eps_u + s_up z, the noise
    split of `_ancestral_levels`; eta = 1 is euler_a's, eta = 0 is euler_cfg_pp."""
    _check_eta(eta)
    denoise, steps = _prepare_cfg_pp(model, x, ts, schedule, extra_args, disable, "euler_ancestral_cfg_pp")
    for st in steps:
        denoised, uncond = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        s_down, s_up = _ancestral_levels(*_levels(st), eta)
        y = denoised + s_down * _eps(x, uncond, st.alpha, st.sigma)
        x = st.alpha_next * (y + s_up * _noise(x, generator) if s_up > 0 else y)
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None):
    """DPM-Solver++(2M) with CFG++ (ComfyUI's dpmpp_2m_cfg_pp): the first-order step x' = alpha' D_g + sigma' eps_u
    plus 2M's correction -alpha' (e^-h - 1) h / (2 h_last) (D_g - D_u,last) (Lu et al. 2022b, Alg. 2; ComfyUI takes
    the difference against the last step's unconditional D), first order on the first step and the last."""
    denoise, steps = _prepare_cfg_pp(model, x, ts, schedule, extra_args, disable, "dpmpp_2m_cfg_pp")
    n_steps = len(steps)
    old_uncond, h_last = None, None
    for st in steps:
        denoised, uncond = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        h = _half_logsnr(st.alpha_next, st.sigma_next) - _half_logsnr(st.alpha, st.sigma)
        x_next = st.alpha_next * denoised + st.sigma_next * _eps(x, uncond, st.alpha, st.sigma)
        if old_uncond is not None and st.i < n_steps - 1:
            x_next = x_next - st.alpha_next * math.expm1(-h) * h / (2 * h_last) * (denoised - old_uncond)
        x, old_uncond, h_last = x_next, uncond, h
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None,
                                     generator=None, eta: float = 1.0):
    """Ancestral DPM-Solver++(2S) with CFG++ (ComfyUI's dpmpp_2s_ancestral_cfg_pp): to the log-s midpoint u of
    s -> s_down by y_u = D_g + s_u eps_u, then y' = D_g(u) + s_down eps_u + (s_down / s)(D_g - D_g(u)), then fresh
    noise s_up; eta = 0: deterministic. From alpha = 0 (no midpoint in log s) and on the last step: first order."""
    _check_eta(eta)
    denoise, steps = _prepare_cfg_pp(model, x, ts, schedule, extra_args, disable, "dpmpp_2s_ancestral_cfg_pp")
    for st in steps:
        denoised, uncond = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        s, s_next = _levels(st)
        s_down, s_up = _ancestral_levels(s, s_next, eta)
        noise = _noise(x, generator) if s_up > 0 else None       # drawn before the midpoint, as dpmpp_2s_ancestral
        eps = _eps(x, uncond, st.alpha, st.sigma)
        if st.alpha == 0 or s_down == 0:
            y = denoised + s_down * eps
        else:
            t_mid, alpha_mid, s_mid = _midpoint(schedule, s, s_down)
            denoised_mid = denoise(alpha_mid * (denoised + s_mid * eps), t_mid)[0]
            y = denoised_mid + s_down * eps + (s_down / s) * (denoised - denoised_mid)
        x = st.alpha_next * (y if noise is None else y + s_up * noise)
    return x
