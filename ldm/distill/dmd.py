"""Distribution-matching fine-tuning (Yin et al., CVPR 2024, "One-step Diffusion with Distribution
Matching Distillation", DMD) of an N-step student's whole sampler.

Regression on the teacher's paths (paths.py) asks a 2-step student for the teacher's exact image
from each noise; when its first evaluation, from pure noise, cannot tell the layouts apart, the
squared error is lowest for a blend of them, and the blend fails the count and shape checks
(docs/stage3-distill.md). DMD asks instead that the student's samples x = G(z) be distributed
like the teacher's: it descends KL(p_fake || p_real) between the two distributions diffused to a
random t, whose gradient with respect to x is (eq. 7) the difference of their scores,
    s_fake(x_t) - s_real(x_t) = alpha_t (x0_fake(x_t) - x0_real(x_t)) / sigma_t^2,
with s(x_t) = (alpha_t x0(x_t) - x_t) / sigma_t^2 (Tweedie): in x0 units, x0_fake - x0_real.
x0_real is the guided teacher; x0_fake a denoiser trained online on G's own samples with the
usual diffusion loss. Eq. 8 replaces alpha_t / sigma_t^2 by 1 / mean|x - x0_real| per sample. A regression term on paired (noise, teacher image) keeps G near the teacher's
map (DMD sec. 3.3; here the teacher's DDIM paths and a squared error).
"""
from __future__ import annotations

import torch

from ldm.diffusion.param import ddim_step, q_sample
from ldm.distill.targets import coefficients

T_RANGE = (0.02, 0.98)   # DMD's noise levels for the gradient: t in [0.02 T, 0.98 T] (sec. 4)


def unrolled_ddim(model, z, ts, schedule, extra_args: dict) -> torch.Tensor:
    """The N-step DDIM sample of x0-model `model` from z on the grid ts, differentiable throughout
    (the samplers run under no_grad); model(z, t, **extra_args) with t a (B,) tensor."""
    for i in range(len(ts) - 1):
        t = ts[i].to(z.device, torch.float32).expand(z.shape[0])
        a, s = coefficients(schedule, t, z)
        a_next, s_next = coefficients(schedule, ts[i + 1].to(z.device, torch.float32).expand(z.shape[0]), z)
        z = ddim_step(z, model(z, t, **extra_args).to(a), a, s, a_next, s_next)
    return z


@torch.no_grad()
def dmd_direction(real, fake, x, t, noise, schedule, extra_args: dict) -> torch.Tensor:
    """DMD eqs. 7-8 in x0 units: (x0_fake - x0_real)(x_t) / mean|x - x0_real| per sample, at
    x_t = alpha_t x + sigma_t noise; x moves against it (towards where p_real > p_fake)."""
    a, s = coefficients(schedule, t, x)
    x_t = q_sample(x, noise, a, s)
    mu_real, mu_fake = real(x_t, t, **extra_args).to(a), fake(x_t, t, **extra_args).to(a)
    norm = (x.to(a) - mu_real).abs().flatten(1).mean(1).clamp(min=1e-4).view(-1, *[1] * (x.ndim - 1))
    return torch.nan_to_num((mu_fake - mu_real) / norm)


def dmd_loss(x, direction) -> torch.Tensor:
    """0.5 * mean ||x - sg(x - direction)||^2: its gradient with respect to x is direction / x.numel()."""
    return 0.5 * (x - (x - direction).detach()).float().pow(2).mean()
