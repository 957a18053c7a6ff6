"""Denoising losses: MSE in eps / x0 / v / flow space with a log-SNR dependent weighting.

Weightings are stated as weights on the x0-space error ||x0-hat - x0||^2 and converted to the
prediction space, since ||eps-hat - eps||^2 = SNR * ||x0-hat - x0||^2, for VP
||v-hat - v||^2 = (1 + SNR) * ||x0-hat - x0||^2, and for rectified flow ||u-hat - u||^2 =
||x0-hat - x0||^2 / t^2 at fixed x_t:
  uniform        plain MSE in the prediction space (no reweighting);
  truncated_snr  x0 weight max(SNR, 1) (Salimans & Ho 2022, sec. 4);
  min_snr        x0 weight min(SNR, gamma) (Hang et al. 2023, eq. 10);
  debiased       eps weight 1/sqrt(SNR) (Yu et al. 2024, "Debias the Training of Diffusion Models"; kohya's
                 --debiased_estimation_loss), i.e. x0 weight sqrt(SNR), with SNR capped at 1000 as kohya does.
The squared error itself can be swapped for a robust one (`loss_type`, `robust_loss`): l1, or the scheduled
pseudo-Huber losses of Khrapov et al. 2024, whose c shrinks with the noise level (`huber_c_at`); the weighting
above multiplies whichever per-sample mean it is, as diffusers' training scripts do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .param import PREDICTIONS, append_dims, check_prediction, q_sample, training_target

WEIGHTINGS = ("uniform", "truncated_snr", "min_snr", "debiased")
TIME_SAMPLING = ("discrete", "continuous", "logit_normal", "cubic")
LOSS_TYPES = ("l2", "huber", "smooth_l1", "l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
HUBER_DEFAULTS = {"huber_schedule": "snr", "huber_c": 0.1}   # diffusers' train_*_lora.py defaults
DEBIASED_SNR_MAX = 1000.0   # kohya's cap: SNR is inf at a clean t, and 1/sqrt(1000) bounds the eps weight below
MULTIRES_DISCOUNT = 0.3     # the discount kohya users run with (Whitaker's report used 0.4-0.9)


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
    if weighting == "debiased":   # eps weight 1/sqrt(min(SNR, cap)) = x0 weight SNR / sqrt(min(SNR, cap)), written
        # as below so SNR = 0 (zero terminal SNR, v or flow) gives 0, not 0 * inf
        return (snr * (snr / DEBIASED_SNR_MAX).clamp(min=1.0)).sqrt() / space_factor(prediction, alpha, sigma)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def robust_loss(loss_type: str, residual: torch.Tensor, c=None) -> torch.Tensor:
    """Element-wise loss of residual = prediction - target; c (broadcastable) is the pseudo-Huber scale.

    huber      2c (sqrt(d^2 + c^2) - c): Khrapov et al. 2024's pseudo-Huber loss as diffusers'
               `conditional_loss` scales it, d^2 for |d| << c (l2 itself) and 2c|d| - 2c^2 for |d| >> c, so an
               outlier's gradient is capped at 2c where l2's grows as 2|d|;
    smooth_l1  2 (sqrt(d^2 + c^2) - c), the same divided by c: 2|d| - 2c for |d| >> c (l1's slope, x2) and
               d^2 / c near 0 (diffusers' "smooth_l1"; torch's smooth_l1_loss(beta=c) x 2 has the same two
               asymptotic slopes but is piecewise);
    l1         |d|;  l2  d^2.
    sqrt(d^2 + c^2) - c is written d^2 / (sqrt(d^2 + c^2) + c): the difference loses every digit in float32
    once |d| < 3e-4 c, the quotient none, and its gradient is 0 at d = 0 for any c > 0.
    """
    if loss_type == "l2":
        return residual.pow(2)
    if loss_type == "l1":
        return residual.abs()
    if loss_type in ("huber", "smooth_l1"):
        d2 = residual.pow(2)
        soft = d2 / ((d2 + c ** 2).sqrt() + c)          # sqrt(d^2 + c^2) - c
        return 2 * c * soft if loss_type == "huber" else 2 * soft
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def time_fraction(schedule, t: torch.Tensor) -> torch.Tensor:
    """t as a share of the schedule: timestep / T on a discrete 0..T-1 schedule (diffusers' timestep /
    num_train_timesteps, so T-1 gives 1 - 1/T), (t - t_min) / (t_max - t_min) in continuous time."""
    if hasattr(schedule, "num_timesteps"):
        return t / schedule.num_timesteps
    return (t - schedule.t_min) / (schedule.t_max - schedule.t_min)


def huber_c_at(huber_schedule: str, huber_c: float, schedule, t, alpha, sigma) -> torch.Tensor:
    """The pseudo-Huber c (B,) at times t with coefficients (alpha, sigma), Khrapov et al. 2024's schedules as
    diffusers ships them: from c = 1 at clean data (l2 for residuals well below 1) down to huber_c at pure noise
    (robust), where a layout is decided from the prompt alone and so a wrong caption pulls hardest (our reading):
      constant     huber_c;
      exponential  huber_c ** time_fraction(t): diffusers' exp(-a * timestep), a = -ln(huber_c) / T, on the
                   time axis, so a schedule's times matter (cosine and rectified flow reach a given noise at
                   different t);
      snr          huber_c + (1 - huber_c) / (1 + s)^2 with s = sigma / alpha = SNR^-1/2 (diffusers' "sigmas",
                   sqrt((1 - abar) / abar)), written (alpha / (alpha + sigma))^2 so alpha = 0 (zero terminal SNR)
                   gives huber_c; rectified flow: huber_c + (1 - huber_c)(1 - t)^2.
    On SD's discrete 1000-step schedule both equal diffusers' at every timestep (tests/diffusion)."""
    if huber_schedule == "constant":
        return torch.full_like(torch.as_tensor(alpha), huber_c)
    if huber_schedule == "exponential":
        return huber_c ** time_fraction(schedule, torch.as_tensor(t, dtype=torch.float64))
    if huber_schedule == "snr":
        return huber_c + (1.0 - huber_c) * (alpha / (alpha + sigma)) ** 2
    raise ValueError(f"huber_schedule must be one of {HUBER_SCHEDULES}, got {huber_schedule!r}")


def check_robust_loss(loss_type: str, huber_schedule: str, huber_c: float, prefix: str = "") -> None:
    """ValueError naming the key unless the loss type and schedule are known, 0 < huber_c (<= 1 when scheduled:
    c falls from 1 to it), and the pseudo-Huber keys are left at their defaults for l2 and l1, which take no c."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"{prefix}loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if huber_schedule not in HUBER_SCHEDULES:
        raise ValueError(f"{prefix}huber_schedule must be one of {HUBER_SCHEDULES}, got {huber_schedule!r}")
    if not (0.0 < huber_c < math.inf) or (huber_schedule != "constant" and huber_c > 1.0):
        raise ValueError(f"{prefix}huber_c={huber_c}: must be > 0, and <= 1 with huber_schedule={huber_schedule!r} "
                         "(c falls from 1 at clean data to huber_c at pure noise)")
    given = {"huber_schedule": huber_schedule, "huber_c": huber_c}
    changed = [k for k, v in given.items() if v != HUBER_DEFAULTS[k]]
    if loss_type in ("l2", "l1") and changed:
        raise ValueError(f"{', '.join(prefix + k for k in changed)} set with {prefix}loss_type={loss_type!r}, which "
                         "takes no c: use loss_type 'huber' or 'smooth_l1', or leave them out")


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


def multires_sizes(h: int, w: int, iterations: int) -> list[tuple[int, int]]:
    """(h // 2^i, w // 2^i) for i = 1..iterations, stopping before a side would fall below 1."""
    return [(h >> i, w >> i) for i in range(1, iterations + 1) if min(h >> i, w >> i) >= 1]


def multires_noise(eps: torch.Tensor, iterations: int, discount: float, generator=None) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise (Whitaker 2023): eps + sum_i discount^i up(z_i), z_i ~ N(0, I) at
    1/2^i of eps's last two sides, bilinearly upsampled, then scaled to unit std per sample; eps itself for 0.

    The coarse levels are low-frequency noise that white noise lacks: at high noise the net must then move an
    image's large-scale layout and colour, which white noise leaves almost intact in x_t (the offset-noise argument,
    for every scale). Differences from kohya's pyramid_noise_like, on purpose: the factor is 2 at every level (kohya
    draws r in [2, 4) per level with Python's unseeded `random`), so the levels and the noise's covariance are fixed
    and follow the generator; level i counts from 1 (kohya's loop adds a second full-size level at i = 0, halving the
    coarse levels' share); the std is each sample's own (kohya divides by the whole batch's), so one sample's noise
    does not depend on the others in its batch.
    """
    if not iterations:
        return eps
    *lead, h, w = eps.shape
    out = eps
    for i, (hi, wi) in enumerate(multires_sizes(h, w, iterations), start=1):
        z = torch.randn((*lead, hi, wi), generator=generator, device=eps.device, dtype=eps.dtype)
        up = F.interpolate(z.reshape(1, -1, hi, wi), size=(h, w), mode="bilinear", align_corners=False)
        out = out + discount ** i * up.reshape(eps.shape)
    return out / append_dims(out.flatten(1).std(1), out.ndim)


def check_multires_noise(iterations: int, discount: float, prefix: str = "") -> None:
    """ValueError naming the key unless iterations is an int >= 0, 0 < discount <= 1, and discount is left at its
    default when iterations is 0 (off)."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"{prefix}multires_noise_iterations={iterations!r}: must be an int >= 0 (0 = off)")
    if not 0.0 < discount <= 1.0:
        raise ValueError(f"{prefix}multires_noise_discount={discount}: must be in (0, 1] (level i is scaled by "
                         "discount^i)")
    if iterations == 0 and discount != MULTIRES_DISCOUNT:
        raise ValueError(f"{prefix}multires_noise_discount set with {prefix}multires_noise_iterations=0 (off): set "
                         "the iterations too, or leave it out")


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
                 logit_mean: float = 0.0, logit_std: float = 1.0, loss_type: str = "l2",
                 huber_schedule: str = HUBER_DEFAULTS["huber_schedule"], huber_c: float = HUBER_DEFAULTS["huber_c"],
                 multires_noise_iterations: int = 0, multires_noise_discount: float = MULTIRES_DISCOUNT):
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
        check_multires_noise(multires_noise_iterations, multires_noise_discount)
        self.multires_noise_iterations = multires_noise_iterations   # eps's coarser levels (multires_noise)
        self.multires_noise_discount = multires_noise_discount
        check_robust_loss(loss_type, huber_schedule, huber_c)
        self.loss_type = loss_type                    # l2 | huber | smooth_l1 | l1 (robust_loss)
        self.huber_schedule, self.huber_c = huber_schedule, huber_c   # pseudo-Huber c over time (huber_c_at)

    def noise(self, x0, generator=None):
        """(eps of the target, the noise x_t is made with). Offset noise (Guttenberg 2023) adds a per-channel
        constant to eps, so the net learns to move an image's mean, which zero-mean noise hides from it at
        high noise; input perturbation (Ning et al. 2023, eq. 9) noises x_t with eps + gamma xi but keeps eps
        as the target, the mismatch sampling meets (exposure bias). Multi-resolution noise replaces the white eps
        before the offset is added, so noise_offset keeps its scale; eps, multires or not, is both x_t's noise and
        the target's (eps, v = alpha eps - sigma x0, flow eps - x0), and xi stays white: it stands for the sampler's
        own error, not the forward noise (kohya's ip_noise_gamma draws it the same way)."""
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        eps = multires_noise(eps, self.multires_noise_iterations, self.multires_noise_discount, generator)
        if self.noise_offset:
            offset = torch.randn(x0.shape[:2], generator=generator, device=x0.device, dtype=x0.dtype)
            eps = eps + self.noise_offset * append_dims(offset, x0.ndim)
        if not self.input_perturbation:
            return eps, eps
        xi = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return eps, eps + self.input_perturbation * xi

    def per_sample(self, out, x0, eps, t):
        """Weighted loss per sample (B,) of the net output `out` at x_t = alpha(t)*x0 + sigma(t)*eps: the mean of
        `loss_type` over the prediction-space error (MSE for l2), times the weighting's w(t)."""
        alpha, sigma = self.schedule.alpha_sigma(t.to(x0.device))              # (B,) float64
        w = loss_weight(self.weighting, self.prediction, alpha, sigma, self.gamma)
        a, s = (append_dims(c.to(torch.float32), x0.ndim) for c in (alpha, sigma))
        target = training_target(self.prediction, x0.float(), eps.float(), a, s)
        if self.loss_type == "l2":
            err = (out.float() - target).pow(2).flatten(1).mean(1)            # (B,)
        else:   # c per sample at its own t (diffusers draws one timestep per batch to share one c)
            c = huber_c_at(self.huber_schedule, self.huber_c, self.schedule, t.to(x0.device), alpha, sigma)
            err = robust_loss(self.loss_type, out.float() - target,
                              append_dims(c.to(torch.float32), x0.ndim)).flatten(1).mean(1)
        return w.to(err.dtype) * err

    def __call__(self, net, x0, extra_args=None, generator=None):
        t = sample_times(self.schedule, x0.shape[0], time=self.time, shift=self.time_shift,
                         shift_share=self.time_shift_share, logit_mean=self.logit_mean, logit_std=self.logit_std,
                         generator=generator, device=x0.device)
        eps, input_noise = self.noise(x0, generator)
        alpha, sigma = (append_dims(c.to(x0.dtype), x0.ndim) for c in self.schedule.alpha_sigma(t))
        out = net(q_sample(x0, input_noise, alpha, sigma), t * self.time_scale, **(extra_args or {}))
        return self.per_sample(out, x0, eps, t).mean()
