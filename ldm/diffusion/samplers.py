"""Samplers: each one pure function with one signature,

    sample_x(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None,
             generator=None, **options) -> x0 sample

model(x_t, t, **extra_args) -> x0-hat with t a (B,) tensor; x is the initial x_{ts[0]} (see
`initial_noise`); ts is a grid from `schedule.timesteps(n)`: n evaluation times then the final
entry (t < 0: clean data). callback receives dict(i, t, x, denoised) once per step.
Any model function works with any sampler: a `Denoiser`, a `cfg(...)` wrapper, a distilled student.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .param import append_dims, ddim_step, score_from_x0
from .schedules import CLEAN


class Step(NamedTuple):
    """One grid step t -> t_next with the schedule coefficients at both ends (host floats)."""
    i: int
    t: float
    t_next: float
    alpha: float
    sigma: float
    alpha_next: float
    sigma_next: float


def initial_noise(schedule, ts, shape, *, generator=None, device=None, dtype=torch.float32):
    """x at ts[0] for unit-variance data: randn * sqrt(alpha^2 + sigma^2) (1 for VP)."""
    alpha, sigma = (float(c) for c in schedule.alpha_sigma(torch.as_tensor(ts)[0]))
    return torch.randn(shape, generator=generator, device=device, dtype=dtype) * math.hypot(alpha, sigma)


def _prepare(model, x, ts, schedule, extra_args, disable):
    """Shared preamble: the model bound to extra_args, and the grid as `Step`s behind a tqdm bar."""
    ts = [float(t) for t in torch.as_tensor(ts).flatten()]   # host floats: no device sync per step
    if len(ts) < 2:
        raise ValueError(f"ts needs at least 2 entries (one step), got {len(ts)}")
    coeffs = [tuple(float(c) for c in schedule.alpha_sigma(t)) for t in ts]
    steps = [Step(i, ts[i], ts[i + 1], *coeffs[i], *coeffs[i + 1]) for i in range(len(ts) - 1)]
    extra_args = extra_args or {}
    t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # bf16 cannot hold t = 999

    def denoise(x, t):
        return model(x, torch.full((x.shape[0],), t, dtype=t_dtype, device=x.device), **extra_args)

    return denoise, tqdm(steps, disable=disable)


def _noise(x, generator):
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _ddpm_step(x, denoised, st: Step, generator):
    """Ancestral step: draw from the posterior q(x_next | x_t, x0 = denoised) (Ho et al. 2020, eqs. 6-7)."""
    a_ts = st.alpha / st.alpha_next                           # x_t = a_ts * x_next + s_ts * noise
    var_ts = st.sigma ** 2 - a_ts ** 2 * st.sigma_next ** 2
    mean = (a_ts * st.sigma_next ** 2 * x + st.alpha_next * var_ts * denoised) / st.sigma ** 2
    if st.sigma_next == 0:
        return mean
    std = math.sqrt(max(var_ts, 0.0)) * st.sigma_next / st.sigma   # "fixed_small" variance
    return mean + std * _noise(x, generator)


def _langevin_step(x, score, step_size, z):
    """Langevin dynamics x + step/2 * score + sqrt(step) * z; step_size a float or per-sample (B,)."""
    step_size = append_dims(torch.as_tensor(step_size, dtype=x.dtype, device=x.device), x.ndim)
    return x + step_size / 2 * score + step_size.sqrt() * z


def _notify(callback, st: Step, x, denoised):
    if callback is not None:
        callback({"i": st.i, "t": st.t, "x": x, "denoised": denoised})


@torch.no_grad()
def sample_ddpm(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) over any descending subset of times."""
    denoise, steps = _prepare(model, x, ts, schedule, extra_args, disable)
    for st in steps:
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        x = _ddpm_step(x, denoised, st, generator)
    return x


@torch.no_grad()
def sample_ddim(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None,
                eta=0.0):
    """DDIM (Song, Meng & Ermon 2021, eq. 12): eta = 0 deterministic, eta = 1 equals DDPM."""
    denoise, steps = _prepare(model, x, ts, schedule, extra_args, disable)
    for st in steps:
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        eps = (x - st.alpha * denoised) / st.sigma
        # eq. 16: sigma_eta = eta * sqrt(posterior variance of q(x_next | x_t, x0)).
        var_ts = st.sigma ** 2 - (st.alpha / st.alpha_next) ** 2 * st.sigma_next ** 2
        std = eta * st.sigma_next / st.sigma * math.sqrt(max(var_ts, 0.0))
        x = st.alpha_next * denoised + math.sqrt(max(st.sigma_next ** 2 - std ** 2, 0.0)) * eps
        if std > 0:
            x = x + std * _noise(x, generator)
    return x


def _step_from_pure_noise(x, denoised, st: Step):
    """The Euler step's limit as s = sigma/alpha -> inf (zero terminal SNR, alpha = 0 at t):
    y + (s_next - s)(y - D)/s with y = x/alpha -> D + s_next x/sigma, i.e. the DDIM step."""
    return st.alpha_next * denoised + (st.sigma_next / st.sigma) * x


@torch.no_grad()
def sample_euler(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None):
    """Euler on the probability-flow ODE dy/ds = (y - D(y)) / s in y = x/alpha, s = sigma/alpha (Karras et al. 2022)."""
    denoise, steps = _prepare(model, x, ts, schedule, extra_args, disable)
    for st in steps:
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        if st.alpha == 0:
            x = _step_from_pure_noise(x, denoised, st)
            continue
        s, s_next = st.sigma / st.alpha, st.sigma_next / st.alpha_next
        y = x / st.alpha
        y = y + (s_next - s) * (y - denoised) / s
        x = st.alpha_next * y
    return x


def heun_step(denoise, x, st: Step, callback):
    """One Heun step st.t -> st.t_next in (y, s) (Karras et al. 2022, Alg. 1, no churn); the Restart sampler's too."""
    denoised = denoise(x, st.t)
    _notify(callback, st, x, denoised)
    if st.alpha == 0:  # s = inf: no slope to average there; the first-order limit step
        return _step_from_pure_noise(x, denoised, st)
    s, s_next = st.sigma / st.alpha, st.sigma_next / st.alpha_next
    y = x / st.alpha
    slope = (y - denoised) / s
    y_next = y + (s_next - s) * slope
    if s_next > 0:  # the corrector needs D at s_next; at s_next = 0 Euler is exact (y = D)
        denoised_next = denoise(st.alpha_next * y_next, st.t_next)
        slope_next = (y_next - denoised_next) / s_next
        y_next = y + (s_next - s) * (slope + slope_next) / 2
    return st.alpha_next * y_next


@torch.no_grad()
def sample_heun(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1, no churn)."""
    denoise, steps = _prepare(model, x, ts, schedule, extra_args, disable)
    for st in steps:
        x = heun_step(denoise, x, st, callback)
    return x


@torch.no_grad()
def sample_euler_a(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None):
    """Euler ancestral ("Euler a"): each step goes down to s_down by Euler, then adds fresh noise of size s_up,
    with s_up^2 = s_next^2 (s^2 - s_next^2) / s^2 and s_down^2 = s_next^2 - s_up^2 (s = sigma / alpha): the
    ancestral step's noise split (Ho et al. 2020) on the probability-flow ODE of Karras et al. 2022."""
    denoise, steps = _prepare(model, x, ts, schedule, extra_args, disable)
    for st in steps:
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        noise = _noise(x, generator)
        if st.alpha == 0:                        # s = inf: s_up -> s_next, s_down -> 0
            x = st.alpha_next * denoised + st.sigma_next * noise
            continue
        s, s_next = st.sigma / st.alpha, st.sigma_next / st.alpha_next
        s_up = math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
        s_down = math.sqrt(s_next ** 2 - s_up ** 2)
        y = x / st.alpha
        y = y + (s_down - s) * (y - denoised) / s + s_up * noise
        x = st.alpha_next * y
    return x


def _half_logsnr(alpha: float, sigma: float) -> float:
    if sigma == 0 or alpha == 0:   # clean data, or pure noise (zero terminal SNR): h = inf, a DDIM step
        return math.inf if sigma == 0 else -math.inf
    return math.log(alpha / sigma)


def _dpmpp_2m_loop(model, x, ts, schedule, extra_args, callback, disable, update):
    """DPM-Solver++(2M)'s multistep loop (Lu et al. 2022b, Alg. 2): the data prediction D extrapolated by half
    its last change per unit of half-log-SNR, D + h / (2 h_last) (D - D_last), first order on the first
    step and the last (it lands on sigma = 0, h = inf, where the correction is unstable with few steps:
    their sec. 5, "lower order final"); `update(x, step, h, d)` takes the step."""
    denoise, steps = _prepare(model, x, ts, schedule, extra_args, disable)
    n_steps = len(steps)
    old_denoised, h_last = None, None
    for st in steps:
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        h = _half_logsnr(st.alpha_next, st.sigma_next) - _half_logsnr(st.alpha, st.sigma)
        d = denoised
        if old_denoised is not None and st.i < n_steps - 1:
            d = denoised + h / (2 * h_last) * (denoised - old_denoised)
        x = update(x, st, h, d)
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None):
    """DPM-Solver++(2M): x' = (sigma' / sigma) x - alpha' (e^-h - 1) D, h the step in half-log-SNR."""
    def update(x, st, h, d):
        return (st.sigma_next / st.sigma) * x - st.alpha_next * math.expm1(-h) * d
    return _dpmpp_2m_loop(model, x, ts, schedule, extra_args, callback, disable, update)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, sec. 4 / app. B; the midpoint form):
    x' = (sigma' / sigma) e^-h x + alpha' (1 - e^-2h) D + sigma' sqrt(1 - e^-2h) z, fresh noise z each step."""
    def update(x, st, h, d):
        noise = _noise(x, generator)             # drawn on the last step too, as diffusers does
        if st.sigma_next == 0:                   # h = inf: the last step lands on D
            return st.alpha_next * d
        decay = 0.0 if st.alpha == 0 else (st.sigma_next / st.sigma) * math.exp(-h)
        return decay * x - st.alpha_next * math.expm1(-2 * h) * d + st.sigma_next * math.sqrt(-math.expm1(-2 * h)) * noise
    return _dpmpp_2m_loop(model, x, ts, schedule, extra_args, callback, disable, update)


@torch.no_grad()
def sample_pc(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None,
              snr=0.16, n_corrector=1):
    """Predictor-corrector (Song et al. 2021, Alg. 2-5): Langevin corrector, then an ancestral predictor."""
    denoise, steps = _prepare(model, x, ts, schedule, extra_args, disable)
    for st in steps:
        for _ in range(n_corrector):
            z = _noise(x, generator)
            score = score_from_x0(x, denoise(x, st.t), st.alpha, st.sigma)
            # Alg. 4 (alpha_i = 1): eps = 2 (snr ||z|| / ||score||)^2, x += eps*score + sqrt(2 eps) z. Norms are
            # batch means: a per-sample ||score|| -> 0 at a mode would blow the step up in low dimension.
            z_norm, score_norm = (v.flatten(1).norm(dim=1).mean() for v in (z, score))
            eps = 2 * (snr * z_norm / score_norm) ** 2
            x = _langevin_step(x, score, 2 * eps, z)
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        x = _ddpm_step(x, denoised, st, generator)
    return x


@torch.no_grad()
def sample_langevin(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None,
                    n_steps=100, step_lr=2e-5):
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1); a final denoise when ts ends clean.

    At each level step = step_lr * sigma_i^2 / sigma_L^2 (sigma_L: the last noise level), with the
    score from the model: works with VE sigmas as in NCSN and with any other schedule.
    """
    denoise, steps = _prepare(model, x, ts, schedule, extra_args, disable)
    sigma_last = float(schedule.alpha_sigma(torch.as_tensor(ts)[-2])[1])
    for st in steps:
        step_size = step_lr * (st.sigma / sigma_last) ** 2
        for _ in range(n_steps):
            score = score_from_x0(x, denoise(x, st.t), st.alpha, st.sigma)
            x = _langevin_step(x, score, step_size, _noise(x, generator))
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        if st.sigma_next == 0:  # Tweedie denoising of the last level (Song & Ermon 2020, sec. 3.4)
            x = denoised
    return x


LCM_TIMESTEPS = 1000   # the discrete timesteps LCM's boundary scalings are written for (diffusers' LCMScheduler)


def lcm_scalings(t, schedule, timestep_scaling: float = 10.0):
    """(c_skip, c_out) of the consistency function f = c_skip x_t + c_out D, which is x_t at t = 0 whatever D is
    (Song et al. 2023's parameterisation, with Luo et al. 2023's scalings, diffusers' LCMScheduler):
    c_skip = s^2 / (u^2 + s^2), c_out = u / sqrt(u^2 + s^2), s = sigma_data = 0.5, u = timestep_scaling x timestep.
    The timestep is that of a 1000-step discrete schedule (0..999), what the scalings were written for: a discrete
    schedule's t as it is, a continuous schedule's t in [0, 1] as 1000 t. Either way one step of LCM's 50-step grid
    away from t = 0 (u = 190 or 200) c_skip is below 7e-6. t: a float or a tensor, the same type back; the sampler
    and LCM training (ldm.distill.lcm) both use this."""
    u = timestep_scaling * (t if hasattr(schedule, "num_timesteps") else LCM_TIMESTEPS * t)
    root = u * u + 0.25
    root = root.sqrt() if torch.is_tensor(root) else math.sqrt(root)
    return 0.25 / (u * u + 0.25), u / root


@torch.no_grad()
def sample_lcm(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None,
               timestep_scaling=10.0):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1) as latent consistency models use it (Luo et
    al. 2023): each step maps x_t to the clean estimate f = c_out(t) D + c_skip(t) x_t (`lcm_scalings`: far from
    t = 0 they are 0 and 1) and noises it afresh to the next grid time; the last step returns f."""
    denoise, steps = _prepare(model, x, ts, schedule, extra_args, disable)
    for st in steps:
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        c_skip, c_out = lcm_scalings(st.t, schedule, timestep_scaling)
        d = c_out * denoised + c_skip * x
        if st.sigma_next == 0:
            x = st.alpha_next * d
        else:
            x = st.alpha_next * d + st.sigma_next * _noise(x, generator)
    return x


def _forward_diffuse(x, alpha_u, sigma_u, alpha_s, sigma_s, generator):
    """A draw of z_s ~ q(z_s | z_u) for s later in time than u: mean (alpha_s/alpha_u) z_u (Kingma et al. 2021, eq. 4)."""
    a = alpha_s / alpha_u
    var = max(sigma_s ** 2 - a ** 2 * sigma_u ** 2, 0.0)
    return a * x + math.sqrt(var) * _noise(x, generator)


@torch.no_grad()
def sample_stochastic(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None):
    """Meng et al. 2023, sec. 4.3: DDIM over two steps, then noise back over one; last step deterministic.

    The N-step stochastic sampler of guided distillation: each step at t_i jumps deterministically
    two grid steps down to t_{i+2}, then goes one grid step back up by forward diffusion
    q(z_{t_{i+1}} | z_{t_{i+2}}): N model evaluations, like DDIM, with fresh noise at every step.
    """
    denoise, bar = _prepare(model, x, ts, schedule, extra_args, disable)
    steps = bar.iterable                      # the list of `Step`s behind the progress bar
    coeffs = [(st.alpha, st.sigma) for st in steps] + [(steps[-1].alpha_next, steps[-1].sigma_next)]
    for st in bar:
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        if st.i + 2 >= len(coeffs):           # the last step: deterministic DDIM to the final entry
            x = ddim_step(x, denoised, st.alpha, st.sigma, st.alpha_next, st.sigma_next)
            continue
        alpha_2, sigma_2 = coeffs[st.i + 2]   # twice the step length (Meng: "same as an N/2-step sampler")
        x = ddim_step(x, denoised, st.alpha, st.sigma, alpha_2, sigma_2)
        x = _forward_diffuse(x, alpha_2, sigma_2, st.alpha_next, st.sigma_next, generator)
    return x


TCD_GAMMA = 0.3   # the TCD authors' recommended gamma ("often yields good results"; more with more steps)


def tcd_time(s: float, gamma: float, schedule) -> float:
    """Strategic stochastic sampling's intermediate time s' = (1 - gamma) s (Zheng et al. 2024, Alg. 4).

    The paper's time 0 is the data. Ours is CLEAN: on a discrete schedule it lies one step below timestep 0
    (alpha-bar, a product over no steps, is 1; SD's timestep 0 has sigma / alpha = 0.029), so gamma = 1 and a clean
    s give CLEAN, and gamma = 1 is the multistep consistency sampler exactly. diffusers' TCDScheduler takes timestep 0
    for the data instead. A discrete schedule's s' is rounded down to a timestep, the times its models know, as
    diffusers' TCDScheduler rounds it; gamma = 0 keeps s whatever it is."""
    if s < 0 or gamma == 1:
        return CLEAN
    if gamma == 0:
        return s
    s_mid = (1 - gamma) * s
    return float(math.floor(s_mid)) if hasattr(schedule, "num_timesteps") else s_mid


@torch.no_grad()
def sample_tcd(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None,
               gamma=TCD_GAMMA, timestep_scaling=10.0):
    """Strategic stochastic sampling of trajectory consistency distillation (Zheng et al. 2024, Alg. 4): each step
    t -> s takes the consistency function's clean estimate f (as `sample_lcm`) by DDIM to s' = (1 - gamma) s
    (`tcd_time`), then diffuses it forward to s with fresh noise. gamma = 0: deterministic, DDIM on f; gamma = 1:
    to the data and back, multistep consistency sampling (`sample_lcm`, the same noise draws)."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    denoise, steps = _prepare(model, x, ts, schedule, extra_args, disable)
    for st in steps:
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        # f = c_skip x_t + c_out D: LCM's boundary scalings, which LCM-LoRAs are trained with. TCD's trajectory
        # consistency function (semi-linear, first order: DDIM on D) meets its boundary without them, and diffusers'
        # TCDScheduler applies none; on LCM's grid (t >= 19) f and D differ by under 7e-6 of each.
        c_skip, c_out = lcm_scalings(st.t, schedule, timestep_scaling)
        d = c_out * denoised + c_skip * x
        s_mid = tcd_time(st.t_next, gamma, schedule)
        if s_mid == st.t_next:       # gamma = 0, or a last step that ends where s' does: no noise drawn
            x = ddim_step(x, d, st.alpha, st.sigma, st.alpha_next, st.sigma_next)
            continue
        alpha_mid, sigma_mid = (float(c) for c in schedule.alpha_sigma(s_mid))
        x = ddim_step(x, d, st.alpha, st.sigma, alpha_mid, sigma_mid)               # denoise: t -> s'
        x = _forward_diffuse(x, alpha_mid, sigma_mid, st.alpha_next, st.sigma_next, generator)   # diffuse: s' -> s
    return x


SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "euler_a": sample_euler_a,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "pc": sample_pc,
    "langevin": sample_langevin,
    "stochastic": sample_stochastic,
    "lcm": sample_lcm,
    "tcd": sample_tcd,
}

# The samplers with a noise knob in [0, 1] and its keyword: what the pipeline's `eta` (the CLI's --eta) sets.
# DDIM's eta (Song et al. 2021, eq. 16); TCD's gamma; k-diffusion's ancestral samplers' eta (1: the full
# ancestral noise, 0: their deterministic solver; the A1111 web UI's "Eta for ancestral samplers")
ETA_OPTIONS = {"ddim": "eta", "tcd": "gamma", "dpm_2_ancestral": "eta", "dpmpp_2s_ancestral": "eta",
               "dpmpp_sde": "eta"}


def check_eta(sampler: str, eta: float | None, flag: str = "--eta", sampler_flag: str = "--sampler") -> None:
    """ValueError, naming the CLI's `flag` and `sampler_flag`, unless eta is None or a noise in [0, 1] of a sampler
    that takes one (ETA_OPTIONS); the pipeline, ldm.cli and ldm.eval's report check with it."""
    if eta is None:
        return
    if sampler not in ETA_OPTIONS:
        names = list(ETA_OPTIONS)
        raise ValueError(f"{flag} is the noise of {sampler_flag} {', '.join(names[:-1])} and {names[-1]} (DDIM's "
                         f"eta, TCD's gamma, the ancestral samplers' eta); {sampler_flag} {sampler} has no such option")
    if not 0.0 <= eta <= 1.0:                      # also refuses NaN
        raise ValueError(f"{flag} must be in [0, 1], got {eta}")

# The higher-order multistep solvers live in their own file; it imports this module's helpers above.
from .multistep import sample_dpmpp_3m, sample_dpmpp_3m_sde, sample_unipc  # noqa: E402

SAMPLERS.update({"dpmpp_3m": sample_dpmpp_3m, "dpmpp_3m_sde": sample_dpmpp_3m_sde, "unipc": sample_unipc})

# k-diffusion's other samplers (the A1111 web UI's LMS, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE) and DEIS, in a file too.
from .kdiffusion import (sample_deis, sample_dpm_2, sample_dpm_2_ancestral,  # noqa: E402
                         sample_dpmpp_2s_ancestral, sample_dpmpp_sde, sample_lms)

SAMPLERS.update({"lms": sample_lms, "dpm_2": sample_dpm_2, "dpm_2_ancestral": sample_dpm_2_ancestral,
                 "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral, "dpmpp_sde": sample_dpmpp_sde, "deis": sample_deis})

# Restart sampling (Xu et al. 2023; the A1111 web UI's "Restart"), in its own file too.
from .restart import sample_restart  # noqa: E402

SAMPLERS["restart"] = sample_restart

# CFG++ (Chung et al. 2024): the samplers above that take the unconditional x0-hat too, from cfg's wrapper.
from .cfgpp import (sample_dpmpp_2m_cfg_pp, sample_dpmpp_2s_ancestral_cfg_pp,  # noqa: E402
                    sample_euler_ancestral_cfg_pp, sample_euler_cfg_pp)

CFG_PP_SAMPLERS = {"euler_cfg_pp": sample_euler_cfg_pp, "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
                   "dpmpp_2m_cfg_pp": sample_dpmpp_2m_cfg_pp,
                   "dpmpp_2s_ancestral_cfg_pp": sample_dpmpp_2s_ancestral_cfg_pp}
SAMPLERS.update(CFG_PP_SAMPLERS)
ETA_OPTIONS.update({"euler_ancestral_cfg_pp": "eta", "dpmpp_2s_ancestral_cfg_pp": "eta"})
