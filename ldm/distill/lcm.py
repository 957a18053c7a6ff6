"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Alg. 1; LCM-LoRA, Luo et al.
2023b): the grid, the teacher's guided ODE step, the consistency function and the loss.

An LCM learns f(z_t, t) = c_skip(t) z_t + c_out(t) x_hat(z_t, t), which is z_t itself at t = 0 (the boundary
condition of Song et al. 2023's consistency models), to be the same at neighbouring points of one trajectory of
the teacher's guided probability-flow ODE. Alg. 1, per sample:

    n ~ U{0, ..., N - k}, w ~ U[w_min, w_max]
    z_{t_{n+k}} = alpha z + sigma eps                                         (forward process at t_{n+k})
    z^w_{t_n} = z_{t_{n+k}} + (1 + w) Phi(z, t_{n+k}, t_n, c) - w Phi(z, t_{n+k}, t_n, "")   (one guided solver step)
    loss = d(f_theta(z_{t_{n+k}}, t_{n+k}), f_theta-(z^w_{t_n}, t_n))          (theta-: the target net, no gradient)

with Phi a DDIM step (Song, Meng & Ermon 2021, eq. 12). Guidance in the project's convention, (1 + w) cond - w
uncond (ldm/diffusion/guidance.py: Luo et al.'s own eq. for the augmented ODE has the same form). A DDIM step is
affine in the x0-prediction with the coefficients of z fixed, and the guidance weights sum to one, so guiding x0
and then stepping is exactly Luo's combination of the two solver steps (`teacher_solve`).

The grid t_0 < t_1 < ... < t_N (`lcm_grid`): N = 50 points of the teacher's time and a skip of k between the two
ends of a pair (their skipping-step method; Luo et al.'s k = 20 timesteps of SD's 1000 is k = 1 here). On a discrete
schedule of T steps t_n = n T/N - 1 (19, 39, ..., 999 for T = 1000, diffusers' LCM training and LCMScheduler) and
t_0 = 0 (diffusers clamps t_1 - T/N = -1 to 0); on a continuous one t_n = n/N, t_0 = 0 the clean end. The sampler's
`--spacing lcm` picks its steps among t_1..t_N (ldm/diffusion/schedules.py), so an LCM samples where it learnt.
The boundary scalings are the sampler's own (`lcm_scalings`), in the same units of t.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ldm.diffusion.guidance import cfg
from ldm.diffusion.param import append_dims, ddim_step
from ldm.diffusion.samplers import lcm_scalings
from ldm.distill.targets import coefficients
from ldm.models.lora import lora_modules

__all__ = ["lcm_grid", "draw_pairs", "teacher_solve", "consistency", "consistency_loss", "lora_bypassed",
           "lcm_scalings"]

LOSSES = ("huber", "l2")


def lcm_grid(schedule, n: int = 50) -> torch.Tensor:
    """(N + 1,) float64 times t_0 < t_1 < ... < t_N of the teacher's schedule (module docstring)."""
    if n < 1:
        raise ValueError(f"the LCM grid needs N >= 1 points, got {n}")
    if hasattr(schedule, "num_timesteps"):                                      # discrete: T/N apart, T - 1 last
        T = schedule.num_timesteps
        if T // n < 1:
            raise ValueError(f"an LCM grid of {n} points does not fit {T} timesteps")
        grid = np.arange(1, n + 1) * (T // n) - 1.0
    else:                                                                       # continuous: n/N of the range
        grid = schedule.t_min + (schedule.t_max - schedule.t_min) * np.arange(1, n + 1) / n
    return torch.as_tensor(np.concatenate([[schedule.t_min], grid]), dtype=torch.float64)


def draw_pairs(grid: torch.Tensor, skip: int, batch: int, generator: torch.Generator | None = None):
    """(t_{n+k}, t_n), each (batch,), for n ~ U{0, ..., N - k} (Alg. 1's n ~ U[1, N - k], counted from t_0)."""
    n_max = len(grid) - 1 - skip
    if skip < 1 or n_max < 0:
        raise ValueError(f"skip k={skip} must be in 1..N ({len(grid) - 1})")
    n = torch.randint(0, n_max + 1, (batch,), generator=generator).to(grid.device)           # a CPU generator
    return grid[n + skip], grid[n]


@torch.no_grad()
def teacher_solve(teacher, z_s, s, t, w, cond: dict, uncond: dict, schedule) -> torch.Tensor:
    """z^w_{t}: one DDIM step s -> t from z_s with the teacher's guided x0 (1 + w) x(z_s, c) - w x(z_s, "").

    teacher: the x0-model (x, t, **cond) of the frozen base; w a float or (B,); uncond: the empty prompt's
    conditioning, batch 1 or B (`cfg` runs cond and uncond as one batch of 2B); s, t (B,), s later than t."""
    x0 = cfg(teacher, w, uncond)(z_s, s, **cond)
    alpha_s, sigma_s = coefficients(schedule, s, z_s)
    alpha_t, sigma_t = coefficients(schedule, t, z_s)
    return ddim_step(z_s.to(alpha_s.dtype), x0.to(alpha_s.dtype), alpha_s, sigma_s, alpha_t, sigma_t).to(z_s.dtype)


def consistency(model, z, t, schedule, **cond) -> torch.Tensor:
    """f(z, t) = c_skip(t) z + c_out(t) model(z, t) for the x0-model `model`; t (B,) in the schedule's time."""
    c_skip, c_out = (append_dims(c.to(device=z.device, dtype=torch.promote_types(z.dtype, torch.float32)), z.ndim)
                     for c in lcm_scalings(t, schedule))
    return c_skip * z + c_out * model(z, t, **cond)


def consistency_loss(f, target, kind: str = "huber", c: float = 0.001) -> torch.Tensor:
    """Per-sample distance d(f, target), (B,): the mean over elements of the pseudo-Huber sqrt(d^2 + c^2) - c
    (LCM-LoRA, as diffusers' scripts: elementwise, c an absolute scale), or of d^2 ("l2")."""
    if kind not in LOSSES:
        raise ValueError(f"consistency loss must be one of {LOSSES}, got {kind!r}")
    dtype = torch.promote_types(f.dtype, torch.float32)                        # fp16 squares overflow
    d2 = (f.to(dtype) - target.to(dtype)).pow(2)
    per_element = d2 if kind == "l2" else torch.sqrt(d2 + c * c) - c
    return per_element.flatten(1).mean(1)


@contextmanager
def lora_bypassed(net: nn.Module):
    """The frozen base net inside the block: each LoRALinear's forward is its base layer's (an instance attribute
    over the class's method), so the teacher needs no second copy of the weights (an SD 1.5 U-Net: 3.4 GB in fp32)
    and computes exactly base(x), with none of the updates' arithmetic."""
    wrapped = list(lora_modules(net).values())
    for m in wrapped:
        m.forward = m.base.forward
    try:
        yield net
    finally:
        for m in wrapped:
            del m.forward
