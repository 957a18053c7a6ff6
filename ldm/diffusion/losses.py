"""Denoising losses: MSE in eps / x0 / v / flow space with a log-SNR dependent weighting.

Weightings are stated as weights on the x0-space error ||x0-hat - x0||^2 and converted to the
prediction space, since ||eps-hat - eps||^2 = SNR * ||x0-hat - x0||^2, for VP
||v-hat - v||^2 = (1 + SNR) * ||x0-hat - x0||^2, and for rectified flow ||u-hat - u||^2 =
||x0-hat - x0||^2 / t^2 at fixed x_t:
  uniform        plain MSE in the prediction space (no reweighting);
  truncated_snr  x0 weight max(SNR, 1) (Salimans & Ho 2022, sec. 4);
  min_snr        x0 weight min(SNR, gamma) (Hang et al. 2023, eq. 10).
"""
from __future__ import annotations

import math

import torch

from .param import PREDICTIONS, append_dims, check_prediction, q_sample, training_target

WEIGHTINGS = ("uniform", "truncated_snr", "min_snr")
TIME_SAMPLING = ("discrete", "continuous", "logit_normal", "cubic")


def space_factor(prediction: str, alpha, sigma):
    """c with ||pred-space error||^2 = c * ||x0 error||^2 at fixed x_t: eps SNR, x0 1, v (a^2+s^2)^2/s^2,
    flow (a+s)^2/s^2 (u = eps - x0 and x0 = (x - s u) / (a + s))."""
    if prediction == "eps":
        return alpha ** 2 / sigma ** 2
    if prediction == "v":
        return (alpha ** 2 + sigma ** 2) ** 2 / sigma ** 2
    if prediction == "flow":
        return (alpha + sigma) ** 2 / sigma ** 2
    if prediction == "x0":
        return torch.ones_like(torch.as_tensor(alpha))
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def loss_weight(weighting: str, prediction: str, alpha, sigma, gamma: float = 5.0):
    """Per-sample weight on the prediction-space MSE that realises `weighting`."""
    snr = alpha ** 2 / sigma ** 2
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting == "truncated_snr":
        return snr.clamp(min=1.0) / space_factor(prediction, alpha, sigma)
    if weighting == "min_snr":
        return snr.clamp(max=gamma) / space_factor(prediction, alpha, sigma)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def uniform_times(schedule, u: torch.Tensor) -> torch.Tensor:
    """u in [0, 1] -> t in [t_min, t_max]: the same share of the schedule for [0, 1] continuous time and
    for discrete 0..T-1 (fractional t there interpolates the log-SNR table)."""
    return schedule.t_min + (schedule.t_max - schedule.t_min) * u


def sample_times(schedule, n: int, *, time: str = "discrete", shift: float = 1.0, shift_share: float = 1.0,
                 logit_mean: float = 0.0, logit_std: float = 1.0, generator=None, device=None) -> torch.Tensor:
    """Training times (n,): integers in [0, T) for discrete, U[t_min, t_max] for continuous time, and for
    logit_normal u = sigmoid(m + s n), n ~ N(0, 1), mapped onto [t_min, t_max] as u is for continuous time:
    Esser et al. 2024, eq. 19 (their best rectified-flow setting: m = 0, s = 1, sec. 5.1), which spends the
    training on the middle of the path, where the velocity is hardest to predict.
    cubic (discrete or continuous schedules): u = 1 - v^3, v ~ U[0, 1], as T2I-Adapter training (Mou et al.
    2023, sec. 3.4): the layout an adapter or ControlNet must carry is settled at the early, noisy steps.

    `shift` s > 1 (continuous time only) draws u ~ U[t_min, t_max] and returns the time whose
    log-SNR is lambda(u) - 2 log s: the whole training distribution moved towards noise, as the
    shifted schedules of simple diffusion (Hoogeboom et al. 2023) and SD3's resolution-dependent
    shift (Esser et al. 2024), but in the training times only, so samplers and students keep the
    schedule. Layout is decided at low SNR, where x_t no longer shows it and only the prompt can.
    `shift_share` < 1 shifts only that share of the samples (each one drawn independently) and
    leaves the rest at u: a mixture that keeps the low-noise times where detail is learnt.
    """
    check_time_shift(shift, time, share=shift_share)
    if time == "discrete":
        if not hasattr(schedule, "num_timesteps"):
            raise ValueError(f"time='discrete' needs a discrete schedule, got {type(schedule).__name__}")
        return torch.randint(0, schedule.num_timesteps, (n,), generator=generator, device=device).float()
    if time in ("continuous", "logit_normal"):
        u = torch.rand(n, generator=generator, device=device) if time == "continuous" else \
            torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=device))
        return shift_times(schedule, uniform_times(schedule, u), shift, shift_share, generator)
    if time == "cubic":          # Mou et al. 2023, sec. 3.4: t = (1 - (u/T)^3) T, most draws at the noisy end
        u = 1.0 - torch.rand(n, generator=generator, device=device) ** 3
        if hasattr(schedule, "num_timesteps"):
            return (u * schedule.num_timesteps).floor().clamp(max=schedule.num_timesteps - 1)
        return uniform_times(schedule, u)
    raise ValueError(f"time must be one of {TIME_SAMPLING}, got {time!r}")


def shift_times(schedule, t: torch.Tensor, shift: float, share: float = 1.0, generator=None) -> torch.Tensor:
    """The times whose log-SNR is lambda(t) - 2 log shift, for a random `share` of t (the rest as given)."""
    if shift == 1.0:
        return t
    shifted = time_of_logsnr(schedule, schedule.logsnr(t) - 2.0 * math.log(shift)).to(t.dtype)
    if share < 1.0:
        keep = torch.rand(t.shape, generator=generator, device=t.device) >= share
        shifted = torch.where(keep, t, shifted)
    return shifted


def check_time_shift(shift: float, time: str, name: str = "time_shift", share: float = 1.0,
                     share_name: str = "time_shift_share") -> None:
    """ValueError naming the key unless shift > 0 (1 for discrete time) and 0 <= share <= 1."""
    if shift <= 0 or (shift != 1.0 and time in ("discrete", "cubic")):
        raise ValueError(f"{name}={shift}: must be > 0, and 1.0 unless time is 'continuous' or 'logit_normal' "
                         f"(time={time!r})")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"{share_name}={share}: must be in [0, 1] (the share of samples at shifted times)")


def check_logit_normal(mean: float, std: float, prefix: str = "") -> None:
    """ValueError naming the keys unless the logit-normal's mean is finite and its std > 0."""
    if not math.isfinite(mean) or not (std > 0 and math.isfinite(std)):
        raise ValueError(f"{prefix}logit_mean={mean} must be finite and {prefix}logit_std={std} finite and > 0")


def check_noise_options(noise_offset: float, input_perturbation: float, prefix: str = "") -> None:
    """ValueError naming the keys unless offset noise and input perturbation are >= 0 (`DiffusionLoss.noise`)."""
    if noise_offset < 0 or input_perturbation < 0:
        raise ValueError(f"{prefix}noise_offset={noise_offset} and {prefix}input_perturbation={input_perturbation} "
                         "must be >= 0")


def time_of_logsnr(schedule, lam: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """The t in [t_min, t_max] with logsnr(t) = lam (clipped to the schedule's range), by bisection.

    Any schedule with a decreasing log-SNR works; 60 halvings pin t to float64 precision.
    """
    lam = lam.to(torch.float64)
    lo = torch.full_like(lam, schedule.t_min)
    hi = torch.full_like(lam, schedule.t_max)
    for _ in range(iters):
        mid = (lo + hi) / 2
        above = schedule.logsnr(mid) > lam  # still too little noise: the answer is later
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2


class DiffusionLoss:
    """loss(net, x0, extra_args) -> scalar: noise x0 at random t, regress the net onto its target."""

    def __init__(self, schedule, prediction: str = "eps", weighting: str = "uniform",
                 gamma: float = 5.0, time: str = "discrete", time_scale: float = 1.0, time_shift: float = 1.0,
                 time_shift_share: float = 1.0, noise_offset: float = 0.0, input_perturbation: float = 0.0,
                 logit_mean: float = 0.0, logit_std: float = 1.0):
        for name, value, allowed in (("weighting", weighting, WEIGHTINGS), ("time", time, TIME_SAMPLING)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        check_prediction(prediction, schedule)
        self.schedule, self.prediction, self.weighting = schedule, prediction, weighting
        self.gamma, self.time = gamma, time
        self.time_scale = time_scale   # the net sees t * time_scale, as in `Denoiser`
        self.time_shift = time_shift   # training times moved towards noise (sample_times)
        self.time_shift_share = time_shift_share
        check_time_shift(time_shift, time, share=time_shift_share)
        check_logit_normal(logit_mean, logit_std)
        self.logit_mean, self.logit_std = logit_mean, logit_std     # time="logit_normal"'s m and s
        check_noise_options(noise_offset, input_perturbation)
        self.noise_offset = noise_offset              # eps += offset * n(B, C, 1, 1): images far from mid-gray
        self.input_perturbation = input_perturbation  # x_t from eps + gamma * xi, target from eps

    def noise(self, x0, generator=None):
        """(eps of the target, the noise x_t is made with). Offset noise (Guttenberg 2023) adds a per-channel
        constant to eps, so the net learns to move an image's mean, which zero-mean noise hides from it at
        high noise; input perturbation (Ning et al. 2023, eq. 9) noises x_t with eps + gamma xi but keeps eps
        as the target, the mismatch sampling meets (exposure bias)."""
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.noise_offset:
            offset = torch.randn(x0.shape[:2], generator=generator, device=x0.device, dtype=x0.dtype)
            eps = eps + self.noise_offset * append_dims(offset, x0.ndim)
        if not self.input_perturbation:
            return eps, eps
        xi = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return eps, eps + self.input_perturbation * xi

    def per_sample(self, out, x0, eps, t):
        """Weighted MSE per sample (B,) of the net output `out` at x_t = alpha(t)*x0 + sigma(t)*eps."""
        alpha, sigma = self.schedule.alpha_sigma(t.to(x0.device))              # (B,) float64
        w = loss_weight(self.weighting, self.prediction, alpha, sigma, self.gamma)
        a, s = (append_dims(c.to(torch.float32), x0.ndim) for c in (alpha, sigma))
        target = training_target(self.prediction, x0.float(), eps.float(), a, s)
        mse = (out.float() - target).pow(2).flatten(1).mean(1)                # (B,)
        return w.to(mse.dtype) * mse

    def __call__(self, net, x0, extra_args=None, generator=None):
        t = sample_times(self.schedule, x0.shape[0], time=self.time, shift=self.time_shift,
                         shift_share=self.time_shift_share, logit_mean=self.logit_mean, logit_std=self.logit_std,
                         generator=generator, device=x0.device)
        eps, input_noise = self.noise(x0, generator)
        alpha, sigma = (append_dims(c.to(x0.dtype), x0.ndim) for c in self.schedule.alpha_sigma(t))
        out = net(q_sample(x0, input_noise, alpha, sigma), t * self.time_scale, **(extra_args or {}))
        return self.per_sample(out, x0, eps, t).mean()
