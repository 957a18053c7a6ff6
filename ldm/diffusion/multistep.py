"""Higher-order multistep solvers of the probability-flow ODE (and one SDE) in the data prediction D = x0-hat:
DPM-Solver++(3M) and its SDE form (Lu et al. 2022b, "DPM-Solver++", app. B), and UniPC (Zhao et al. 2023,
"UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models", Alg. 1-3).

Both step in the half-log-SNR lambda = log(alpha / sigma), h = lambda' - lambda, and reuse the denoised
outputs of earlier steps, so order p costs one network call a step like Euler. They follow the same
grids and conventions as ldm.diffusion.samplers (imported there, into SAMPLERS); a zero-terminal-SNR
start (lambda = -inf) is stepped at first order and dropped from the history of later steps.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# ldm.diffusion's __init__ imports .samplers first, which imports this module at its end: these exist by then.
from .samplers import _half_logsnr, _noise, _notify, _prepare


def _lambdas(steps) -> list[float]:
    """lambda at every grid point (`steps`: _prepare's bar over the Steps): the evaluation times, then the last."""
    steps = steps.iterable
    return [_half_logsnr(st.alpha, st.sigma) for st in steps] + [_half_logsnr(steps[-1].alpha_next,
                                                                            steps[-1].sigma_next)]


def _history(lams: list[float], k: int) -> int:
    """How many grid points up to k (k included) carry a finite lambda, at least 1: the usable history."""
    return max(k + 1 - (lams[0] == -math.inf), 1)


# ----------------------------------------------------------------------------- DPM-Solver++(3M)

def _dpmpp_3m_loop(model, x, ts, schedule, extra_args, callback, disable, generator, sde: bool):
    """Lu et al. 2022b's multistep solver of order 3 (app. B, Alg. 3 with the SDE's variant of sec. 4): D
    extrapolated with the first and second divided differences of the last three outputs in lambda. First
    order on the first step and the last (it lands on sigma = 0), second order on the second step and, with
    fewer than 15 steps, the one before the last ("lower order final", their sec. 5)."""
    denoise, steps = _prepare(model, x, ts, schedule, extra_args, disable)
    n = len(steps)
    lams = _lambdas(steps)
    outs = []
    for st in steps:
        k = st.i
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        outs.append(denoised)
        noise = _noise(x, generator) if sde else None      # drawn every step, the last too, as diffusers does
        order = 1 if k == n - 1 else min(3, _history(lams, k), 2 if k == n - 2 and n < 15 else 3)
        h = lams[k + 1] - lams[k]
        d0, d1, d2 = denoised, 0.0, 0.0
        if order >= 2:                                  # divided differences, scaled to the step h
            r0 = (lams[k] - lams[k - 1]) / h
            d1_0 = (outs[-1] - outs[-2]) / r0
            d1 = d1_0
            if order == 3:
                r1 = (lams[k - 1] - lams[k - 2]) / h
                d1_1 = (outs[-2] - outs[-3]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
        if order < 3:
            d1 = 0.5 * d1                               # second order: the midpoint form, as the 2M solver
        if sde:
            if st.sigma_next == 0:                      # h = inf: land on D
                x = st.alpha_next * d0
            else:
                decay = 0.0 if st.alpha == 0 else (st.sigma_next / st.sigma) * math.exp(-h)
                e2 = -math.expm1(-2 * h)                # 1 - e^-2h
                c1 = e2 / (-2 * h) + 1 if order == 3 else e2
                c2 = (e2 - 2 * h) / (2 * h) ** 2 - 0.5 if order == 3 else 0.0
                x = decay * x + st.alpha_next * (e2 * d0 + c1 * d1 + c2 * d2) + st.sigma_next * math.sqrt(e2) * noise
        else:
            e1 = math.expm1(-h)                         # e^-h - 1
            c1 = e1 / h + 1 if order == 3 else -e1
            c2 = (e1 + h) / h ** 2 - 0.5 if order == 3 else 0.0
            x = (st.sigma_next / st.sigma) * x - st.alpha_next * (e1 * d0 - c1 * d1 + c2 * d2)
        outs = outs[-3:]
    return x


@torch.no_grad()
def sample_dpmpp_3m(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None):
    """DPM-Solver++(3M): x' = (sigma'/sigma) x - alpha' (e^-h - 1) D0 + alpha' ((e^-h - 1)/h + 1) D1
    - alpha' ((e^-h - 1 + h)/h^2 - 1/2) D2 (Lu et al. 2022b, app. B)."""
    return _dpmpp_3m_loop(model, x, ts, schedule, extra_args, callback, disable, generator, sde=False)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None):
    """SDE-DPM-Solver++(3M): the 3M extrapolation in the SDE's step x' = (sigma'/sigma) e^-h x + alpha' (1 - e^-2h)
    D + sigma' sqrt(1 - e^-2h) z, fresh noise z each step (ComfyUI's and the A1111 web UI's "DPM++ 3M SDE")."""
    return _dpmpp_3m_loop(model, x, ts, schedule, extra_args, callback, disable, generator, sde=True)


# ----------------------------------------------------------------------------- UniPC

def _unipc_terms(h: float, rks: list[float], order: int, variant: str):
    """h phi_1(h) = e^-h - 1, B(h) and the right-hand side b of UniPC's order conditions (Zhao et al. 2023,
    Alg. 2-3, data prediction: hh = -h); R[i][j] = rks[j]^i. B(h) = hh ("bh1") or e^hh - 1 ("bh2")."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1                      # phi_2-type term, then the next orders by recursion
    b_h = hh if variant == "bh1" else math.expm1(hh)
    factorial, b = 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = np.array([[r ** i for r in rks] for i in range(order)], dtype=np.float64)
    return h_phi_1, b_h, R, np.array(b, dtype=np.float64)


def _unipc_update(x, m0, earlier, lam_s0: float, lam_t: float, alpha_t: float, sigma_t: float, sigma_s0: float,
                  order: int, variant: str, model_t=None):
    """One UniPC update from (x, lambda_s0) to lambda_t with data predictions m0 at s0 and `earlier`
    [(lambda_i, m_i), ...] before it, newest first. model_t None: the predictor UniP (order `order`);
    else the corrector UniC, which adds the output at the new point (Alg. 2 and 3)."""
    h = lam_t - lam_s0
    rks = [(lam_i - lam_s0) / h for lam_i, _ in earlier[:order - 1]] + [1.0]
    d1s = [(m_i - m0) / rk for (_, m_i), rk in zip(earlier[:order - 1], rks)]
    h_phi_1, b_h, R, b = _unipc_terms(h, rks, order, variant)
    x_t = (sigma_t / sigma_s0) * x - alpha_t * h_phi_1 * m0
    if model_t is None:
        if order == 1:
            return x_t
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        return x_t - alpha_t * b_h * sum(float(r) * d for r, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b)
    res = sum((float(r) * d for r, d in zip(rhos[:-1], d1s)), torch.zeros_like(m0))
    return x_t - alpha_t * b_h * (res + float(rhos[-1]) * (model_t - m0))


@torch.no_grad()
def sample_unipc(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None,
                 order: int = 2, variant: str = "bh2"):
    """UniPC (Zhao et al. 2023): the multistep predictor UniP-p, then, once the network has been called at the
    new point, the corrector UniC refits the step with that output (no extra call: the output is the next
    step's anyway, taken at the uncorrected point). Order ramps up over the first steps and down to 1 on the
    last ones; variant "bh2" (B(h) = e^h - 1, their choice for guided sampling) or "bh1" (B(h) = h)."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    denoise, steps = _prepare(model, x, ts, schedule, extra_args, disable)
    n = len(steps)
    lams = _lambdas(steps)
    outs: list[torch.Tensor] = []        # the outputs at each grid point, newest last
    x_last, prev, prev_order = None, None, 0   # the point the last prediction left from, that step, its order
    for st in steps:
        k = st.i
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        if prev is not None:             # UniC: correct the step prev -> st with the output at st
            earlier = [(lams[k - 1 - i], outs[-1 - i]) for i in range(1, prev_order)]
            x = _unipc_update(x_last, outs[-1], earlier, lams[k - 1], lams[k], st.alpha, st.sigma, prev.sigma,
                              prev_order, variant, model_t=denoised)
        outs = (outs + [denoised])[-order:]
        p = min(order, n - k, _history(lams, k))
        earlier = [(lams[k - i], outs[-1 - i]) for i in range(1, p)]
        x_last, prev, prev_order = x, st, p
        x = _unipc_update(x, denoised, earlier, lams[k], lams[k + 1], st.alpha_next, st.sigma_next, st.sigma,
                          p, variant)
    return x
