"""Noise schedules: a time t maps to (alpha_t, sigma_t) with x_t = alpha_t * x0 + sigma_t * eps.

Four families share one small interface (`Schedule`):
  * discrete VP schedules over integer timesteps 0..T-1 (DDPM linear, Stable Diffusion's
    scaled_linear, Nichol & Dhariwal's cosine), defined by their betas;
  * the continuous-time VP schedule with cosine log-SNR (Salimans & Ho 2022), t in [0, 1];
  * the VE schedule of NCSN (Song & Ermon 2019): alpha = 1, sigma geometric in t, t in [0, 1];
  * rectified flow (Liu et al. 2023; Esser et al. 2024): alpha = 1 - t, sigma = t, t in [0, 1].

Time grids for sampling hold N+1 values: N model-evaluation times, descending, then a final
entry. Any t < 0 (the constant `CLEAN`) means clean data, alpha = 1 and sigma = 0; this is
diffusers' `prev_timestep < 0` with `set_alpha_to_one=True`.
"""
from __future__ import annotations

import inspect
import math

import numpy as np
import torch

CLEAN = -1.0                                  # any t < 0: alpha = 1, sigma = 0
SPACINGS = ("leading", "trailing", "linspace", "karras", "exponential", "beta", "lcm", "ays", "kl_optimal")
SIGMA_SPACINGS = ("karras", "exponential", "kl_optimal", "ays")   # laid out in s = sigma / alpha, mapped to times
SHIFTED_SPACINGS = ("leading", "trailing", "linspace", "beta")   # the grids a grid shift moves (`Schedule._shift`)
LCM_ORIGINAL_STEPS = 50                       # Luo et al. 2023: LCMs learn consistency on a 50-step DDIM grid
KARRAS_RHO = 7.0                              # Karras et al. 2022, eq. 5 (their choice for every model)
KARRAS_SIGMAS = (0.002, 80.0)                 # their Table 1 range of sigma / alpha; SD's 0.029-14.6 lies inside
BETA_SPACING = (0.6, 0.6)                     # Lee et al. 2024 ("Beta Sampling is All You Need"): Beta(a, b) in time
FINALS = ("clean", "t_min")                   # last grid entry: clean data, or the schedule's t_min
# Align Your Steps (Sabour, Fidler & Kreis 2024): NVIDIA's optimized 10-step schedules, published as the timesteps
# [999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0] (SD 1.5) and [999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0]
# (SDXL) of SD's scaled_linear schedule (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html; diffusers'
# AysSchedules). These are the noise levels s = sigma / alpha at those timesteps, as ComfyUI's AlignYourStepsScheduler
# lists them (its SD1 / SDXL NOISE_LEVELS); diffusers' 3-decimal sigma lists (the levels before NVIDIA rounded them to
# integer timesteps, also the A1111 web UI's) differ from them by at most 0.0035.
AYS_LEVELS = {
    "sd15": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
             0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
}


def _as_time(t) -> torch.Tensor:
    """t in float64 (schedule arithmetic in float64): a tensor cast where it lies, a Python float or numpy array read
    at full precision (torch.as_tensor would round a float to float32 first: 1.5e-7 in log-SNR at t = 0.787)."""
    return t.to(torch.float64) if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=torch.float64)


def _lcm_pick(origin: np.ndarray, n: int) -> np.ndarray:
    """n of the 50 LCM grid times `origin` (ascending), from the noisiest, evenly by index (diffusers' LCMScheduler)."""
    if n > LCM_ORIGINAL_STEPS:
        raise ValueError(f"the lcm spacing takes at most {LCM_ORIGINAL_STEPS} steps, got {n}")
    return origin[::-1][np.floor(np.linspace(0, LCM_ORIGINAL_STEPS, n, endpoint=False)).astype(np.int64)]


def _check_option(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def beta_ppf(q: np.ndarray, a: float, b: float) -> np.ndarray:
    """Quantiles of the Beta(a, b) distribution (scipy.stats.beta.ppf without scipy): its CDF integrated in
    x = sin^2(theta), where the density x^(a-1) (1-x)^(b-1) dx = 2 sin^(2a-1) cos^(2b-1) dtheta stays bounded for
    a, b >= 1/2, then inverted by interpolation; accurate to ~1e-7 on [0, 1]."""
    if min(a, b) < 0.5:
        raise ValueError(f"beta_ppf needs a, b >= 0.5, got {a}, {b}")
    theta = np.linspace(0.0, math.pi / 2, 200_001)
    f = 2.0 * np.sin(theta) ** (2 * a - 1) * np.cos(theta) ** (2 * b - 1)
    cdf = np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) / 2 * np.diff(theta))])
    return np.interp(np.asarray(q, dtype=np.float64), cdf / cdf[-1], np.sin(theta) ** 2)


def ays_levels(n: int, model: str = "sd15") -> np.ndarray:
    """n + 1 descending noise levels s of Align Your Steps for n steps: the published 10-step list of `model`
    ("sd15", "sdxl"), else that list interpolated linearly in log s at n + 1 evenly spaced positions (NVIDIA's
    how-to `loglinear_interp`, ComfyUI's AlignYourStepsScheduler). The last level is the one a sampler steps to."""
    _check_option("AYS model", model, tuple(AYS_LEVELS))
    levels = np.asarray(AYS_LEVELS[model], dtype=np.float64)
    if n + 1 == len(levels):
        return levels
    return np.exp(np.interp(np.linspace(0.0, 1.0, n + 1), np.linspace(0.0, 1.0, len(levels)), np.log(levels)))


class Schedule:
    """Interface every sampler uses: `alpha_sigma(t)`, `logsnr(t)`, `timesteps(n, ...)`."""

    t_min: float
    t_max: float
    zero_terminal_snr: bool = False           # alpha(t_max) = 0 exactly (Lin et al. 2024)
    grid_shift: float = 1.0                   # s: leading/trailing/linspace grids at log-SNR - 2 log s (`shifted`)
    ays_model: str = "sd15"                   # which AYS_LEVELS list the ays spacing takes (the pipeline: "sdxl"
                                              # for an SDXL U-Net); every other model takes SD 1.5's

    def logsnr(self, t) -> torch.Tensor:
        """lambda(t) = log(alpha^2 / sigma^2), float64, same shape as t; +inf for t < 0."""
        raise NotImplementedError

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) as float64 tensors shaped like t; VP: alpha^2 = sigmoid(lambda)."""
        lam = self.logsnr(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def timesteps(self, n: int, *, spacing: str = "trailing", final: str = "clean",
                  steps_offset: int = 0) -> torch.Tensor:
        """N+1 float64 times: n evaluation times (descending) then the final entry."""
        _check_option("spacing", spacing, SPACINGS)
        _check_option("final", final, FINALS)
        if n < 1:
            raise ValueError(f"number of steps must be >= 1, got {n}")
        if spacing in (*SIGMA_SPACINGS, "lcm", "beta") and steps_offset:
            raise ValueError(f"steps_offset does not apply to the {spacing} spacing, got {steps_offset}")
        if spacing in SIGMA_SPACINGS:
            grid = self._sigma_grid(n, spacing)
        elif spacing == "lcm":
            grid = self._lcm_grid(n)
        elif spacing == "beta":
            grid = self._shift(self._beta_grid(n))
        else:
            grid = self._shift(self._grid(n, spacing, steps_offset))
        ts = torch.as_tensor(grid, dtype=torch.float64)
        if torch.isposinf(self.logsnr(ts)).any():       # rectified flow's t = 0 is the data: nothing to denoise
            t = float(ts[torch.isposinf(self.logsnr(ts))][0])
            raise ValueError(f"the {spacing} spacing puts a step at t = {t:g}, where this schedule has no noise left "
                             "(rectified flow's data end); pick trailing, karras, exponential, beta or lcm")
        last = CLEAN if final == "clean" else self.t_min
        return torch.cat([ts, ts.new_tensor([last])])

    def _shift(self, grid: np.ndarray) -> np.ndarray:
        """Each grid time moved to log-SNR lambda - 2 log s: SD3's timestep shift (Esser et al. 2024, eq. 23)
        for any schedule; on rectified flow's path it is t' = s t / (1 + (s - 1) t). Ends stay ends."""
        if self.grid_shift == 1.0:
            return grid
        lam = self.logsnr(torch.as_tensor(grid, dtype=torch.float64)).numpy()
        moved = self.t_from_logsnr(lam - 2.0 * math.log(self.grid_shift))
        # where the log-SNR is clipped (cosine_logsnr's t_max) the inverse lands short of t: keep t there
        return np.maximum(moved, grid) if self.grid_shift > 1 else np.minimum(moved, grid)

    def _sigma_grid(self, n: int, spacing: str) -> np.ndarray:
        """n noise levels s = sigma / alpha from the noisiest to the cleanest, each mapped back to the time with
        that level (log s = -lambda / 2), fractional where it falls between steps:
          karras       Karras et al. 2022, eq. 5: s_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho;
          exponential  evenly spaced in log s (the A1111 web UI's and diffusers' "exponential");
          kl_optimal   s_i = tan((1 - i/(n-1)) atan(s_max) + i/(n-1) atan(s_min)): evenly spaced in atan(s), the
                       schedule Sabour et al. 2024 (Align Your Steps) derive as KL-optimal for Gaussian data
                       (A1111 web UI PR #15608, ComfyUI's kl_optimal scheduler);
          ays          Align Your Steps' published levels (`_ays_levels`), not spread over the range below.
        s_min, s_max: the schedule's range cut to Karras et al.'s [0.002, 80]. A log-SNR range of +-20
        (cosine_logsnr) reaches s = 22026, where rho = 7 would spend half of 8 steps on pure noise: the
        shapes64 teacher drew 19.8% of prompts right at 8 DPM++(2M) steps so, 68.0% with the cut
        (docs/stage2-latent.md)."""
        lam_clean, lam_noisy = (float(self.logsnr(t)) for t in (self.t_min, self.t_max))
        if spacing == "ays":
            return self.t_from_logsnr(-2.0 * np.log(self._ays_levels(n, lam_clean, lam_noisy)))
        s_min = max(math.exp(-lam_clean / 2), KARRAS_SIGMAS[0])
        s_max = min(math.exp(-lam_noisy / 2), KARRAS_SIGMAS[1])
        ramp = np.arange(n) / max(n - 1, 1)
        if spacing == "karras":
            rho = KARRAS_RHO
            s = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        elif spacing == "kl_optimal":
            s = np.tan((1 - ramp) * math.atan(s_max) + ramp * math.atan(s_min))
        else:
            s = np.exp(np.log(s_max) + ramp * (np.log(s_min) - np.log(s_max)))
        return self.t_from_logsnr(-2.0 * np.log(s))

    def _ays_levels(self, n: int, lam_clean: float, lam_noisy: float) -> np.ndarray:
        """The n levels s a sampler evaluates at: `ays_levels`' first n (its last, SD's s_min, becomes the grid's
        final entry: clean data as in ComfyUI and diffusers; final="t_min" is NVIDIA's timestep 0 on SD). Taken as
        noise levels, the same signal-to-noise ratio 1 / s^2 on any schedule, not stretched to the schedule's range:
        a model whose range reaches further (the shapes64 teacher's cosine_logsnr, s up to 22026) starts at SD's
        s = 14.6 from pure noise, as SD does. A schedule that does not reach a level (beyond a 1e-6 rounding) is
        refused: AYS has no list for it."""
        s = ays_levels(n, self.ays_model)[:n]
        lo, hi = math.exp(-lam_clean / 2), math.exp(-lam_noisy / 2)
        if s.max() > hi * (1 + 1e-6) or s.min() < lo * (1 - 1e-6):
            raise ValueError(f"the ays spacing's {self.ays_model} levels span s = sigma / alpha in "
                             f"[{s.min():.4g}, {s.max():.4g}]; this schedule covers only [{lo:.4g}, {hi:.4g}]")
        return np.clip(s, lo, hi)

    def _beta_grid(self, n: int) -> np.ndarray:
        """Lee et al. 2024 ("Beta Sampling is All You Need", sec. 4): the trailing grid's fractions 1, 1 - 1/n, ...,
        1/n of the time range put through the Beta(0.6, 0.6) quantile function, so that steps crowd at both ends
        of time, where their analysis finds the sampling path changing most. In time, as ComfyUI's "beta"
        scheduler (which rounds a discrete schedule's times to integers and drops repeats; ours stay
        fractional); diffusers' use_beta_sigmas lays the quantiles out in sigma instead."""
        u = beta_ppf(1.0 - np.arange(n) / n, *BETA_SPACING)
        return self.t_min + u * (self.t_max - self.t_min)

    def _lcm_grid(self, n: int) -> np.ndarray:
        """Continuous time: n of the 50 times t_m = m/50 (m = 1..50) that stage LCM training learns consistency
        between (ldm.distill.lcm.lcm_grid), picked as a discrete schedule's `_lcm_grid` picks its timesteps."""
        origin = self.t_min + (self.t_max - self.t_min) * np.arange(1, LCM_ORIGINAL_STEPS + 1) / LCM_ORIGINAL_STEPS
        return _lcm_pick(origin, n)

    def t_from_logsnr(self, lam: np.ndarray) -> np.ndarray:
        """The times with log-SNR `lam` (lambda decreases in t); here by interpolation on a fine grid."""
        t = np.linspace(self.t_min, self.t_max, 100_001)
        table = self.logsnr(torch.as_tensor(t)).numpy()
        return np.interp(-np.asarray(lam, dtype=np.float64), -table, t)

    def _grid(self, n: int, spacing: str, steps_offset: int) -> np.ndarray:
        """Continuous time: the three spacings of Lin et al. 2023 (Table 2) on t in [0, 1]."""
        if steps_offset:
            raise ValueError(f"steps_offset applies to discrete schedules only, got {steps_offset}")
        i = np.arange(n)
        if spacing == "leading":                # (n-1)/n ... 0: starts below t_max
            return (n - 1 - i) / n
        if spacing == "trailing":               # 1 ... 1/n: starts at t_max
            return 1.0 - i / n
        return np.linspace(1.0, 0.0, n)         # both ends included


class DiscreteSchedule(Schedule):
    """VP schedule on integer timesteps 0..T-1 from betas; fractional t interpolates log-SNR.

    A last beta of exactly 1 gives zero terminal SNR (`zero_terminal_snr_betas`): alpha = 0 at
    t = T-1, log-SNR -inf; between T-2 and T-1 alpha_bar then falls linearly to 0.
    """

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        inner = betas[:-1] if betas.ndim == 1 else betas
        if betas.ndim != 1 or len(betas) < 2 or not bool(((inner > 0) & (inner < 1)).all()) \
                or not 0 < float(betas[-1]) <= 1:
            raise ValueError("betas must be a 1-D tensor (T >= 2) with values in (0, 1); the last may be 1 "
                             "(zero terminal SNR)")
        self.betas = betas
        # alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4); alpha_t^2 = alpha_bar_t.
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        self.zero_terminal_snr = float(betas[-1]) == 1.0
        self._table = {torch.device("cpu"): torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)}
        self.num_timesteps = len(betas)
        self.t_min, self.t_max = 0.0, float(self.num_timesteps - 1)

    def _logsnr_table(self, device: torch.device) -> torch.Tensor:
        if device not in self._table:
            self._table[device] = self._table[torch.device("cpu")].to(device)
        return self._table[device]

    def logsnr(self, t) -> torch.Tensor:
        t = _as_time(t)
        table = self._logsnr_table(t.device)
        tc = t.clamp(0.0, self.t_max)
        lo = tc.floor().long()
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        lam = torch.lerp(table[lo], table[hi], tc - lo)   # exact at integer t
        if self.zero_terminal_snr:  # lerp towards -inf gives nan at T-2: alpha_bar linear to 0 instead
            ab = float(self.alphas_cumprod[-2]) * (self.t_max - tc)
            lam = torch.where(tc >= self.t_max - 1, torch.log(ab) - torch.log1p(-ab), lam)
        return torch.where(t < 0, torch.full_like(lam, math.inf), lam)

    def t_from_logsnr(self, lam: np.ndarray) -> np.ndarray:
        """Exact inverse of `logsnr` on [0, T-1]: linear in lambda between integer steps, as diffusers'
        `_sigma_to_t` interpolates log sigma."""
        table = self._table[torch.device("cpu")].numpy()
        lam = np.asarray(lam, dtype=np.float64)
        if not self.zero_terminal_snr:
            return np.interp(-lam, -table, np.arange(self.num_timesteps, dtype=np.float64))
        t = np.interp(-lam, -table[:-1], np.arange(self.num_timesteps - 1, dtype=np.float64))
        ab = 1.0 / (1.0 + np.exp(-lam))                   # the last interval, as `logsnr` defines it
        last = self.t_max - ab / float(self.alphas_cumprod[-2])
        return np.where(lam < table[-2], last, t)

    def _lcm_grid(self, n: int) -> np.ndarray:
        """Latent consistency models' grid (Luo et al. 2023): n of the 50 DDIM timesteps their consistency was
        trained on (T/50 - 1, ..., T - 1), from the noisiest, evenly by index (diffusers' LCMScheduler)."""
        origin = np.arange(1, LCM_ORIGINAL_STEPS + 1) * (self.num_timesteps // LCM_ORIGINAL_STEPS) - 1
        return _lcm_pick(origin.astype(np.float64), n)

    def _grid(self, n: int, spacing: str, steps_offset: int) -> np.ndarray:
        """diffusers' DDIMScheduler/DDPMScheduler `timestep_spacing` (Lin et al. 2023, Table 2).

        Samplers step to the next grid entry, as DDPMScheduler does. DDIMScheduler steps to
        t - T // n instead; the two agree for "leading", and for "trailing" when n divides T.
        """
        T = self.num_timesteps
        if n > T:
            raise ValueError(f"number of steps ({n}) cannot exceed the {T} training timesteps")
        if spacing == "leading":
            ts = np.arange(n)[::-1] * (T // n) + steps_offset
        elif spacing == "trailing":
            ts = np.round(T - np.arange(n) * (T / n)) - 1 + steps_offset
        else:
            ts = np.linspace(0, T - 1, n).round()[::-1] + steps_offset
        if ts.max() > T - 1 or ts.min() < 0:
            raise ValueError(f"steps_offset={steps_offset} puts timesteps outside [0, {T - 1}]")
        return ts.astype(np.float64)


class CosineLogSNR(Schedule):
    """Continuous VP: lambda(t) = -2 log tan(pi t / 2), clipped (Salimans & Ho 2022, sec. 5)."""

    def __init__(self, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        self.logsnr_min, self.logsnr_max = logsnr_min, logsnr_max
        self.t_min, self.t_max = 0.0, 1.0

    def logsnr(self, t) -> torch.Tensor:
        t = _as_time(t)
        lam = -2.0 * torch.log(torch.tan(math.pi / 2 * t.clamp(0.0, 1.0)))  # +inf at t = 0
        lam = lam.clamp(self.logsnr_min, self.logsnr_max)
        return torch.where(t < 0, torch.full_like(lam, math.inf), lam)

    def t_from_logsnr(self, lam: np.ndarray) -> np.ndarray:
        """Exact inverse inside the clip: t = (2 / pi) atan(exp(-lambda / 2))."""
        lam = np.clip(np.asarray(lam, dtype=np.float64), self.logsnr_min, self.logsnr_max)
        return 2.0 / math.pi * np.arctan(np.exp(-lam / 2))


class GeometricVE(Schedule):
    """VE (NCSN): alpha = 1, sigma(t) = sigma_min * (sigma_max / sigma_min)^t, t in [0, 1]."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.t_min, self.t_max = 0.0, 1.0

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        s = self.sigma_min * (self.sigma_max / self.sigma_min) ** t.clamp(0.0, 1.0)
        return torch.where(t < 0, torch.zeros_like(s), s)

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        t = _as_time(t)
        return torch.ones_like(t), self._sigma(t)

    def logsnr(self, t) -> torch.Tensor:
        return -2.0 * torch.log(self._sigma(_as_time(t)))


class RectifiedFlow(Schedule):
    """The straight path x_t = (1 - t) x0 + t eps of rectified flow / flow matching (Liu et al. 2023; Lipman
    et al. 2023), t in [0, 1]: sigma = t, so a net fed t * 1000 sees SD3's and Flux's timestep. Not VP:
    alpha + sigma = 1, and alpha = 0 at t = 1 (pure noise, like a zero-terminal-SNR schedule).

    `shift` s moves the sampling grids (leading, trailing, linspace) to t' = s t / (1 + (s - 1) t), SD3's
    shift (Esser et al. 2024, sec. 5.3.2, eq. 23; diffusers' FlowMatchEulerDiscreteScheduler `shift`):
    a log-SNR lower by 2 log s at every grid time, more steps at high noise for larger images. It leaves
    training alone; training times take `time_shift` (ldm.diffusion.losses), the same map.
    """

    zero_terminal_snr = True

    def __init__(self, shift: float = 1.0):
        if not shift > 0:
            raise ValueError(f"rectified_flow: shift must be > 0, got {shift}")
        self.grid_shift = float(shift)
        self.t_min, self.t_max = 0.0, 1.0

    @property
    def shift(self) -> float:
        return self.grid_shift

    def _ays_levels(self, n: int, lam_clean: float, lam_noisy: float) -> np.ndarray:
        """Refused: AYS's lists are noise levels optimized for SD 1.5 and SDXL, and NVIDIA published none for flow
        models, whose grids start from pure noise at t = 1 (SD 1.5's list would start at t = 14.6 / 15.6 = 0.936)."""
        raise ValueError("the ays spacing holds Align Your Steps' SD 1.5 and SDXL noise levels; a rectified-flow "
                         "model has no published list: pick trailing, kl_optimal, karras, exponential or beta")

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        t = _as_time(t)
        sigma = torch.where(t < 0, torch.zeros_like(t), t.clamp(0.0, 1.0))
        return 1.0 - sigma, sigma

    def logsnr(self, t) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return 2.0 * (torch.log(alpha) - torch.log(sigma))           # +inf at t <= 0, -inf at t = 1

    def t_from_logsnr(self, lam: np.ndarray) -> np.ndarray:
        """Exact inverse: alpha / sigma = exp(lambda / 2) with alpha + sigma = 1."""
        with np.errstate(over="ignore"):                    # a huge lambda (t near 0): exp -> inf, t -> 0
            return 1.0 / (1.0 + np.exp(np.asarray(lam, dtype=np.float64) / 2))


# ---- betas of the discrete schedules ----

def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """DDPM (Ho et al. 2020, sec. 4): betas linear in t."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def scaled_linear_betas(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion (Rombach et al. 2022): sqrt(beta) linear in t."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t)/f(0), beta_t = 1 - alpha_bar_t/alpha_bar_{t-1}."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)   # clipped at 0.999 to avoid the t = T singularity


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Alg. 1: the betas with sqrt(alpha_bar) shifted to end at 0 and scaled to keep its start.

    Common schedules end at SNR > 0 (SD's scaled_linear: alpha_bar_{T-1} = 0.0047), so training
    never shows the net pure noise while sampling starts from it; with the last alpha_bar at 0 the
    two agree. Needs a net that predicts v or x0: eps says nothing about x0 at SNR 0 (their sec. 3.2).
    """
    root = torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    alphas_cumprod = ((root - last) * (first / (first - last))) ** 2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def _discrete(betas: torch.Tensor, zero_snr: bool) -> DiscreteSchedule:
    return DiscreteSchedule(zero_terminal_snr_betas(betas) if zero_snr else betas)


SCHEDULES = {
    "linear": lambda T=1000, beta_start=1e-4, beta_end=2e-2, zero_snr=False: _discrete(
        linear_betas(T, beta_start, beta_end), zero_snr),
    "scaled_linear": lambda T=1000, beta_start=0.00085, beta_end=0.012, zero_snr=False: _discrete(
        scaled_linear_betas(T, beta_start, beta_end), zero_snr),
    "cosine": lambda T=1000, s=0.008, max_beta=0.999, zero_snr=False: _discrete(
        cosine_betas(T, s, max_beta), zero_snr),
    "cosine_logsnr": CosineLogSNR,
    "ve": GeometricVE,
    "rectified_flow": RectifiedFlow,
}


def make_schedule(name: str, **kwargs) -> Schedule:
    """Build a schedule by name, e.g. make_schedule("cosine", T=1000) or make_schedule("ve", sigma_max=10)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {sorted(SCHEDULES)}")
    allowed = inspect.signature(SCHEDULES[name]).parameters
    for key in kwargs:
        if key not in allowed:
            raise ValueError(f"schedule {name!r} has no option {key!r}; options: {sorted(allowed)}")
    return SCHEDULES[name](**kwargs)


def shifted(schedule: Schedule, shift: float) -> Schedule:
    """A copy of `schedule` whose sampling grids sit at log-SNR lower by 2 log `shift` (`Schedule._shift`; it
    replaces the schedule's own shift, such as a rectified-flow model folder's). Training times and the
    net's inputs are untouched: this moves only where a sampler evaluates the model."""
    if not shift > 0:
        raise ValueError(f"grid shift must be > 0, got {shift}")
    copy = object.__new__(type(schedule))
    copy.__dict__.update(schedule.__dict__)
    copy.grid_shift = float(shift)
    return copy


def resolution_shift(tokens: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                     max_shift: float = 1.15) -> float:
    """FLUX.1's resolution-dependent grid shift: mu linear in the image's token count through (base_seq_len,
    base_shift) and (max_seq_len, max_shift), shift s = exp(mu), so larger images sample at more noise (the
    resolution-dependent shifting of Esser et al. 2024, sec. 5.3.2; diffusers' `use_dynamic_shifting`)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(base_shift + slope * (tokens - base_seq_len))


def schedule_from_config(config: dict) -> Schedule:
    """Build from a mapping like {"name": "scaled_linear", "T": 1000} (e.g. a YAML section)."""
    if "name" not in config:
        raise ValueError(f"schedule config needs a 'name' key, got keys {sorted(config)}")
    options = {k: v for k, v in config.items() if k != "name"}
    return make_schedule(config["name"], **options)


def step_index(grid, t) -> int:
    """The step (from 0) of a run whose interval [grid[i], grid[i + 1]) holds the net's time t: `grid` the run's
    descending step times (the sampler's ts without its final entry), t's first entry (a sampler gives the batch
    one time). An evaluation between grid points (DPM-Solver's midpoints) counts in the step it falls in, Heun's
    second one (at the next step's time) in the next step. Clamped to [0, len(grid) - 1]. Prompt editing,
    ControlNet ranges and T2I-Adapter factors find their step with it, so the samplers stay untouched."""
    t = float(torch.as_tensor(t).reshape(-1)[0])
    tol = 1e-5 * abs(t)                                # t reached the model as float32
    return min(len(grid) - 1, max(0, sum(float(g) >= t - tol for g in grid) - 1))
