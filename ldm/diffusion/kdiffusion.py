"""The rest of k-diffusion's sampler set (Crowson's k_diffusion/sampling.py), the A1111 web UI's and ComfyUI's
"LMS", "DPM2", "DPM2 a", "DPM++ 2S a" and "DPM++ SDE", and DEIS (Zhang & Chen 2023; ComfyUI's "deis", diffusers'
DEISMultistepScheduler), as samplers of ldm.diffusion.samplers (registered there).

k-diffusion writes them for VE models, x = y + s eps with s = sigma / alpha; here they step y = x / alpha and
s exactly so (Karras et al. 2022, eq. 4) and return to x = alpha y, as `sample_euler` does, so they run on any
schedule: VP, zero terminal SNR and rectified flow. There alpha = 0 at the start (s = inf), where no slope or
midpoint exists: that step is the first-order limit (the DDIM step, with the ancestral noise split where the
sampler has one) and LMS leaves the point out of its history, as ldm.diffusion.multistep does.

The single-step second-order samplers evaluate the net twice a step, at the step's start and at a midpoint in
log s (the half-log-SNR), except on the last step to s = 0, an Euler step (k-diffusion's choice, diffusers' too).
"""
from __future__ import annotations

import math

import numpy as np
import torch

# ldm.diffusion's __init__ imports .samplers first, which imports this module at its end: these exist by then.
from .samplers import Step, _noise, _notify, _prepare


def _levels(st: Step) -> tuple[float, float]:
    """(s, s_next): the noise levels sigma / alpha at the step's ends; inf where alpha = 0 (pure noise)."""
    s = math.inf if st.alpha == 0 else st.sigma / st.alpha
    return s, st.sigma_next / st.alpha_next


def _midpoint(schedule, s: float, s_next: float) -> tuple[float, float, float]:
    """(t, alpha, s) at the midpoint of two levels in log s, s_mid = sqrt(s s_next) (the midpoint of the half-log-SNR
    step: DPM-Solver-2, Lu et al. 2022a, Alg. 1 with r = 1/2); alpha and s are the schedule's at that time, so the
    net sees a point that truly has its time's noise level (diffusers and k-diffusion interpolate the time)."""
    t = float(schedule.t_from_logsnr(np.float64(-(math.log(s) + math.log(s_next)))))   # lambda = -2 log s_mid
    alpha, sigma = (float(c) for c in schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64)))  # not float32's t
    return t, alpha, sigma / alpha


def _ancestral_levels(s: float, s_next: float, eta: float) -> tuple[float, float]:
    """(s_down, s_up) of an ancestral step s -> s_next: go down to s_down deterministically, add fresh noise of
    size s_up, s_down^2 + s_up^2 = s_next^2 (k-diffusion's get_ancestral_step): eta = 1 draws the DDPM posterior's
    noise, s_up^2 = s_next^2 (s^2 - s_next^2) / s^2 (Ho et al. 2020, eq. 7), eta = 0 none (the ODE)."""
    s_up = min(s_next, eta * s_next * math.sqrt(max(1.0 - (s_next / s) ** 2, 0.0)))
    return math.sqrt(s_next ** 2 - s_up ** 2), s_up


def _from_pure_noise(x, denoised, st: Step, s_down: float, s_up: float, noise):
    """The first-order step's limit from alpha = 0 (s = inf) down to s_down, plus noise s_up: y -> D + s_down eps
    with eps = x / sigma (the DDIM step), then x' = alpha' (y + s_up z)."""
    y = denoised + (s_down / st.sigma) * x
    return st.alpha_next * (y if noise is None else y + s_up * noise)


def _check_eta(eta: float) -> None:
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")


# ----------------------------------------------------------------------------- LMS

def _lms_coefficients(nodes: list[float], s: float, s_next: float) -> list[float]:
    """Linear multistep weights: the integral over [s, s_next] of each Lagrange basis polynomial on `nodes`
    (the levels of the stored slopes, newest first). Gauss-Legendre with len(nodes) points is exact for these
    polynomials of degree len(nodes) - 1, and the product form stays accurate where the nodes reach s ~ 1e4."""
    u, w = np.polynomial.legendre.leggauss(len(nodes))
    tau = (s + s_next) / 2 + (s_next - s) / 2 * u
    out = []
    for j, node_j in enumerate(nodes):
        basis = np.prod([(tau - node_k) / (node_j - node_k) for k, node_k in enumerate(nodes) if k != j], axis=0)
        out.append(float((s_next - s) / 2 * np.sum(w * basis)))
    return out


@torch.no_grad()
def sample_lms(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None,
               order: int = 4):
    """Linear multistep ("LMS", k-diffusion's sample_lms): y' = y + sum_j c_j d_j over the last `order` slopes
    d = (y - D) / s, c_j the integral of the Lagrange polynomial through them (Adams-Bashforth, variable steps in s)."""
    if not (isinstance(order, int) and order >= 1):
        raise ValueError(f"LMS order must be an integer >= 1, got {order!r}")
    return _multistep_in_s(model, x, ts, schedule, extra_args, callback, disable, order,
                           lambda nodes, s, s_next, i, n: _lms_coefficients(nodes, s, s_next))


def _multistep_in_s(model, x, ts, schedule, extra_args, callback, disable, order: int, coefficients):
    """The loop LMS and DEIS share: y' = y + sum_j c_j d_j over the slopes d = (y - D) / s (= eps) of the last
    `order` steps, newest first, c = coefficients(levels of those slopes, s, s_next, step i, steps n)."""
    denoise, steps = _prepare(model, x, ts, schedule, extra_args, disable)
    n = len(steps.iterable)
    slopes, nodes = [], []                        # newest first
    for st in steps:
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        if st.alpha == 0:                         # s = inf: no node to interpolate through; left out of the history
            x = _from_pure_noise(x, denoised, st, st.sigma_next / st.alpha_next, 0.0, None)
            continue
        s, s_next = _levels(st)
        y = x / st.alpha
        slopes, nodes = [(y - denoised) / s, *slopes][:order], [s, *nodes][:order]
        y = y + sum(c * d for c, d in zip(coefficients(nodes, s, s_next, st.i, n), slopes))
        x = st.alpha_next * y
    return x


# ----------------------------------------------------------------------------- DPM-Solver-2

def _dpm_2_step(denoise, schedule, y, denoised, s: float, s_to: float):
    """DPM-Solver-2 in k-diffusion's form: Euler to the log-s midpoint, the slope there over the whole step to s_to
    (Lu et al. 2022a, Alg. 1, r = 1/2; in s it is the midpoint method). s_to = 0: Euler, which lands on D."""
    d = (y - denoised) / s
    if s_to == 0:
        return y - s * d
    t_mid, alpha_mid, s_mid = _midpoint(schedule, s, s_to)
    y_mid = y + (s_mid - s) * d
    d_mid = (y_mid - denoise(alpha_mid * y_mid, t_mid)) / s_mid
    return y + (s_to - s) * d_mid


@torch.no_grad()
def sample_dpm_2(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None):
    """DPM-Solver-2 ("DPM2", k-diffusion's sample_dpm_2): second order, two net calls a step but the last."""
    denoise, steps = _prepare(model, x, ts, schedule, extra_args, disable)
    for st in steps:
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        if st.alpha == 0:
            x = _from_pure_noise(x, denoised, st, st.sigma_next / st.alpha_next, 0.0, None)
            continue
        s, s_next = _levels(st)
        x = st.alpha_next * _dpm_2_step(denoise, schedule, x / st.alpha, denoised, s, s_next)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None,
                           eta: float = 1.0):
    """Ancestral DPM-Solver-2 ("DPM2 a", k-diffusion's sample_dpm_2_ancestral): DPM-Solver-2 down to s_down, then
    fresh noise s_up (`_ancestral_levels`); eta = 0 is sample_dpm_2."""
    _check_eta(eta)
    denoise, steps = _prepare(model, x, ts, schedule, extra_args, disable)
    for st in steps:
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        s, s_next = _levels(st)
        s_down, s_up = _ancestral_levels(s, s_next, eta)
        if st.alpha == 0:
            x = _from_pure_noise(x, denoised, st, s_down, s_up, _noise(x, generator) if s_up > 0 else None)
            continue
        y = _dpm_2_step(denoise, schedule, x / st.alpha, denoised, s, s_down)
        if s_down > 0:                            # no noise on the Euler step to s = 0 (nor a draw: diffusers' too)
            y = y + s_up * _noise(x, generator)
        x = st.alpha_next * y
    return x


# ----------------------------------------------------------------------------- DPM-Solver++(2S) and DPM-Solver++ SDE

def _dpmpp_first_order(y, denoised, s: float, s_to: float):
    """DPM-Solver++'s first-order step in y: D + (s_to / s)(y - D), x' = (sigma'/sigma) x - alpha' (e^-h - 1) D
    (Lu et al. 2022b, eq. 9) with h = log(s / s_to); the DDIM step."""
    return denoised + (s_to / s) * (y - denoised)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None,
                              generator=None, eta: float = 1.0):
    """Ancestral DPM-Solver++(2S) ("DPM++ 2S a", k-diffusion's sample_dpmpp_2s_ancestral): a DDIM step to the log-s
    midpoint u of s -> s_down, then y' = D(u) + (s_down / s)(y - D(u)) (Lu et al. 2022b, Alg. 1 with r = 1/2:
    D_i = D(u)), then fresh noise s_up. eta = 0: the deterministic DPM-Solver++(2S)."""
    _check_eta(eta)
    denoise, steps = _prepare(model, x, ts, schedule, extra_args, disable)
    for st in steps:
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        s, s_next = _levels(st)
        s_down, s_up = _ancestral_levels(s, s_next, eta)
        noise = _noise(x, generator) if s_up > 0 else None
        if st.alpha == 0:
            x = _from_pure_noise(x, denoised, st, s_down, s_up, noise)
            continue
        y = x / st.alpha
        if s_down == 0:                           # the last step: Euler, which lands on D
            y = denoised
        else:
            t_mid, alpha_mid, s_mid = _midpoint(schedule, s, s_down)
            denoised_mid = denoise(alpha_mid * _dpmpp_first_order(y, denoised, s, s_mid), t_mid)
            y = _dpmpp_first_order(y, denoised_mid, s, s_down)
        x = st.alpha_next * (y if noise is None else y + s_up * noise)
    return x


def _brownian_pair(x, generator, s: float, s_mid: float, s_next: float):
    """Two unit-variance noises of one step as k-diffusion's Brownian tree gives them, in the noise level as time:
    z1 the increment of W over [s_mid, s] and z2 over [s_next, s], which holds it: corr = sqrt((s - s_mid) / (s -
    s_next)). Drawn as two independent increments (of disjoint steps, as those of different steps are)."""
    a, b = _noise(x, generator), _noise(x, generator)
    da, db = s - s_mid, s_mid - s_next
    return a, (math.sqrt(da) * a + math.sqrt(db) * b) / math.sqrt(da + db)


@torch.no_grad()
def sample_dpmpp_sde(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None,
                     eta: float = 1.0):
    """DPM-Solver++ SDE ("DPM++ SDE", k-diffusion's sample_dpmpp_sde, r = 1/2): an ancestral DPM-Solver++ step to
    the log-s midpoint, the net there, then an ancestral step over the whole step with that D, both noises parts of
    one Brownian path (`_brownian_pair`; k-diffusion draws them from a torchsde Brownian tree). eta = 0: the
    deterministic DPM-Solver++(2S), as sample_dpmpp_2s_ancestral at eta = 0."""
    _check_eta(eta)
    denoise, steps = _prepare(model, x, ts, schedule, extra_args, disable)
    for st in steps:
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        s, s_next = _levels(st)
        if st.alpha == 0:                         # one first-order ancestral step; one draw
            s_down, s_up = _ancestral_levels(s, s_next, eta)
            x = _from_pure_noise(x, denoised, st, s_down, s_up, _noise(x, generator) if s_up > 0 else None)
            continue
        y = x / st.alpha
        if s_next == 0:                           # the last step: Euler, which lands on D
            x = st.alpha_next * denoised
            continue
        t_mid, alpha_mid, s_mid = _midpoint(schedule, s, s_next)
        z1, z2 = _brownian_pair(x, generator, s, s_mid, s_next) if eta > 0 else (0.0, 0.0)
        s_down, s_up = _ancestral_levels(s, s_mid, eta)
        y_mid = _dpmpp_first_order(y, denoised, s, s_down) + s_up * z1
        denoised_mid = denoise(alpha_mid * y_mid, t_mid)
        s_down, s_up = _ancestral_levels(s, s_next, eta)
        x = st.alpha_next * (_dpmpp_first_order(y, denoised_mid, s, s_down) + s_up * z2)
    return x


# ----------------------------------------------------------------------------- DEIS

def _deis_coefficients(nodes: list[float], s: float, s_next: float) -> list[float]:
    """DEIS's weights (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator", eq. 15,
    the log-rho variant of diffusers' DEISMultistepScheduler): the integral over rho in [s, s_next] of each Lagrange
    basis polynomial in log rho on `nodes` (levels, newest first). Exact: with u = log rho, the integral of P(u) e^u
    is e^u (P - P' + P'' - ...), which tends to 0 as rho -> 0, so a step may land on s_next = 0."""
    logs = [math.log(v) for v in nodes]
    out = []
    for j, u_j in enumerate(logs):
        others = [u for k, u in enumerate(logs) if k != j]
        p = np.polynomial.Polynomial.fromroots(others) if others else np.polynomial.Polynomial([1.0])
        p = p / float(np.prod([u_j - u for u in others]))
        g = sum(((-1) ** k * p.deriv(k) for k in range(1, len(logs))), p)        # P - P' + P'' - ...
        antiderivative = lambda rho: 0.0 if rho == 0 else rho * g(math.log(rho))  # noqa: E731
        out.append(antiderivative(s_next) - antiderivative(s))
    return out


@torch.no_grad()
def sample_deis(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None,
                order: int = 2):
    """DEIS (Zhang & Chen 2023; diffusers' DEISMultistepScheduler, ComfyUI's "deis"): y' = y + sum_j c_j eps_j, the
    noise predictions eps = (y - D) / s of the last `order` steps interpolated by a polynomial in log s and integrated
    exactly over the step in s (`_deis_coefficients`). As diffusers: first order on the first step, and with fewer
    than 15 steps on the last, at most second order on the one before."""
    if order not in (1, 2, 3):
        raise ValueError(f"DEIS order must be 1, 2 or 3, got {order!r}")

    def coefficients(nodes, s, s_next, i, n):
        k = 1 if i == n - 1 and n < 15 else 2 if i == n - 2 and n < 15 else order
        return _deis_coefficients(nodes[:min(k, len(nodes))], s, s_next)
    return _multistep_in_s(model, x, ts, schedule, extra_args, callback, disable, order, coefficients)
