"""Guided distillation targets and loss (Meng et al. 2023 on progressive distillation, Salimans & Ho 2022).

Stage one (Meng sec. 4.1): the w-conditioned student learns the teacher's guided x-prediction
    x_hat^w(z_t) = (1 + w) x_hat(z_t, c) - w x_hat(z_t, empty).
Stage two (Meng sec. 4.2, Salimans & Ho Alg. 2): a student of N/2 steps learns two DDIM steps
t -> t' -> t'' of its N-step teacher; its target x_tilde is the x0 from which ONE DDIM step
t -> t'' lands on the teacher's z_t''.

The loss is MSE in x space with the truncated-SNR weight max(SNR, 1) (Salimans & Ho sec. 4):
for a v-predicting net ||v_hat - v||^2 = (1 + SNR) ||x_hat - x||^2 (VP), so max(SNR, 1) is the
v-space MSE up to a factor in [1/2, 1]. Unlike the plain x-space MSE it does not vanish as
SNR -> infinity (small steps must still be learnt), and unlike eps-space MSE it stays finite
at SNR -> 0, where a few-step student takes its largest and most important step.
"""
from __future__ import annotations

import torch

from ldm.diffusion.guidance import cfg
from ldm.diffusion.losses import loss_weight
from ldm.diffusion.param import append_dims, ddim_step


def two_step_target(z_t, z_tpp, alpha_t, sigma_t, alpha_tpp, sigma_tpp):
    """Salimans & Ho Alg. 2: x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t).

    Solving ddim_step(z_t, x_tilde, t -> t'') = z_t'' for x_tilde. At t'' = 0 (sigma_t'' = 0) this is z_t''.
    """
    ratio = sigma_tpp / sigma_t
    return (z_tpp - ratio * z_t) / (alpha_tpp - ratio * alpha_t)


def truncated_snr_weight(alpha, sigma, cap: float | None = None):
    """max(SNR, 1) with SNR = alpha^2 / sigma^2 (Salimans & Ho 2022, sec. 4, 'truncated SNR').

    `cap` also bounds it from above, min(max(SNR, 1), cap): the low-noise end, where SNR runs to
    thousands, then no longer outweighs the high-noise steps that lay a picture out (cap = 1 is
    the plain x-space MSE).
    """
    weight = loss_weight("truncated_snr", "x0", alpha, sigma)   # the core losses' max(SNR, 1)
    return weight if cap is None else weight.clamp(max=cap)


def x_space_loss(x_hat, target, alpha, sigma, snr_cap: float | None = None) -> torch.Tensor:
    """Per-sample min(max(SNR, 1), snr_cap) * mean ||x_hat - target||^2, (B,); alpha, sigma (B,)."""
    dtype = torch.promote_types(x_hat.dtype, torch.float32)               # fp16 squares overflow
    mse = (x_hat.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1)  # (B,)
    return truncated_snr_weight(alpha, sigma, snr_cap).to(mse) * mse


def coefficients(schedule, t: torch.Tensor, like: torch.Tensor):
    """(alpha, sigma) at times t (B,), shaped (B, 1, ..., 1) like `like`, in its dtype (>= fp32)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    return tuple(append_dims(c.to(device=like.device, dtype=dtype), like.ndim) for c in schedule.alpha_sigma(t))


@torch.no_grad()
def stage_one_target(teacher, z_t, t, w, cond: dict, uncond: dict) -> torch.Tensor:
    """Meng eq. (5) in x space: the teacher x0-model under CFG at weight w (float or (B,)), one batch of 2B."""
    return cfg(teacher, w, uncond)(z_t, t, **cond)


@torch.no_grad()
def stage_two_target(teacher, z_t, t, t_mid, t_end, schedule, extra: dict) -> torch.Tensor:
    """x_tilde from two teacher DDIM steps t -> t' -> t'' (Salimans & Ho Alg. 2); teacher is an x0-model."""
    a_t, s_t = coefficients(schedule, t, z_t)
    a_m, s_m = coefficients(schedule, t_mid, z_t)
    a_e, s_e = coefficients(schedule, t_end, z_t)
    z_mid = ddim_step(z_t, teacher(z_t, t, **extra).to(a_t), a_t, s_t, a_m, s_m)
    z_end = ddim_step(z_mid, teacher(z_mid, t_mid, **extra).to(a_t), a_m, s_m, a_e, s_e)
    return two_step_target(z_t.to(a_t), z_end, a_t, s_t, a_e, s_e)


def student_grid(schedule, n_teacher: int) -> torch.Tensor:
    """(N/2, 3) rows (t, t', t'') from the sampling grid `schedule.timesteps(N)` (trailing, last = clean)."""
    if n_teacher < 2 or n_teacher % 2:
        raise ValueError(f"a halving round needs an even teacher step count >= 2, got {n_teacher}")
    ts = schedule.timesteps(n_teacher)                                       # (N + 1,) descending
    return torch.stack([ts[0:-1:2], ts[1::2], ts[2::2]], dim=1)             # (N/2, 3)


@torch.no_grad()
def teacher_states(teacher, noise, rows, schedule, n_teacher: int, extra: dict) -> torch.Tensor:
    """z at the start of student step `rows` (B,) on the teacher's own sampling path.

    The teacher's DDIM on `schedule.timesteps(n_teacher)` from `noise` (the sampler's start), 2 * row
    steps for each sample: the states a student that follows its teacher meets when it samples,
    where noised data (Salimans & Ho) holds states of data the guided teacher would not draw.
    """
    ts = schedule.timesteps(n_teacher).to(noise.device)                    # (N + 1,) descending
    z, need = noise.clone(), 2 * rows                                       # teacher steps per sample
    for k in range(int(need.max()) if len(rows) else 0):
        on = (need > k).nonzero().squeeze(1)                                # samples still on their way
        sub = {key: v[on] for key, v in extra.items()}                      # (B, ...) tensors
        t, t_next = ts[k].expand(len(on)), ts[k + 1].expand(len(on))
        a, s = coefficients(schedule, t, z)
        a_next, s_next = coefficients(schedule, t_next, z)
        z_on = z[on].to(a)
        z[on] = ddim_step(z_on, teacher(z_on, t, **sub).to(a), a, s, a_next, s_next).to(z)
    return z


def grid_rows(grid: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B,) indices i of the `student_grid` rows (t_i, t_i', t_i'') with t_i'' < t <= t_i (ends clamp)."""
    ends = grid[:, 2].to(t)                                                  # descending, last = 0
    rows = (ends.unsqueeze(0) >= t.unsqueeze(1)).sum(1)                      # rows that end at or above t
    return rows.clamp(max=len(grid) - 1)
