"""The Restart sampler (Xu et al. 2023, "Restart Sampling for Improving Generative Processes", NeurIPS 2023), the
A1111 web UI's "Restart", as a sampler of ldm.diffusion.samplers (registered there).

Heun's method on the probability-flow ODE along the main grid `ts`, as `sample_heun`, in y = x / alpha and the VE
level s = sigma / alpha (Karras et al. 2022, eq. 4), so it runs on any schedule. When the main solve reaches the grid
level s_lo nearest s_min (in log s), a restart interval [s_lo, s_hi] (s_hi: s_max) is run K times: forward noise
back up, y <- y + sqrt(s_hi^2 - s_lo^2) z, the exact transition kernel of the VE SDE dy = sqrt(d(s^2)/ds) dW (the
paper's "Restart forward process"), then N Heun steps back down to s_lo on a Karras grid (rho = 7, Karras et al.
2022, eq. 5) (its "Restart backward process"). The added noise contracts the error the solve accumulated above s_lo;
the ODE keeps the discretization error small (the paper's argument). Each restart costs 2N net calls: K restarts
add 2KN to Heun's 2n - 1 on n main steps (2n - 2 from pure noise, alpha = 0, whose first step is the one-call DDIM
limit as `sample_heun`'s).

Settings (`Restart`: s_min, s_max, K, N):
  default  `default_restart(n)`, the A1111 web UI's rule (modules/sd_samplers_extra.py, restart_sampler): no
           restart below 20 steps, [0.1, 2] with K = 1, N = 9 from 20 steps, K = 2, N = n // 4 from 36. A1111 shrinks
           its main Karras grid by K N steps so that the total is the step count; here the main grid is the `ts`
           given (the pipeline's --steps and --spacing) and the restarts come on top: nfe says what a run cost.
  paper    their Stable Diffusion v1.5 code (github.com/Newbeeer/diffusion_restart_sampling, diffuser/diffusers/
           pipelines/stable_diffusion/pipeline_stable_diffusion.py, `restart_list` by guidance scale): [0.1, 2] with
           K = 2, N = 10 at scale 5 and 8, [0.1, 3] at 3, two intervals ([1, 9] and [5, 10], K = 2, N = 5) at 2.
           Their scale is diffusers' (uncond + scale (cond - uncond)): 1 + our w. We run one interval per sample.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .samplers import Step, _noise, _prepare, heun_step

RESTART_RHO = 7.0            # the restart grid's Karras rho (Karras et al. 2022, eq. 5), as A1111's restart grid
RESTART_USAGE = "S_MIN:S_MAX:K:N (0 < S_MIN < S_MAX noise levels sigma/alpha, K >= 0 restarts of N >= 1 Heun steps)"


class Restart(NamedTuple):
    """One restart interval [s_min, s_max] in s = sigma / alpha, run k times with n Heun steps each."""
    s_min: float
    s_max: float
    k: int
    n: int


def default_restart(steps: int) -> Restart | None:
    """The A1111 web UI's restart for `steps` main steps: none below 20, [0.1, 2] x 1 of 9 steps, from 36 x 2 of n/4."""
    if steps < 20:
        return None
    return Restart(0.1, 2.0, 2, steps // 4) if steps >= 36 else Restart(0.1, 2.0, 1, 9)


def check_restart(restart: Restart) -> Restart:
    """`restart` as floats and ints, or ValueError naming the bad field."""
    s_min, s_max, k, n = restart
    if not (0 < s_min < s_max < math.inf):
        raise ValueError(f"restart interval needs 0 < s_min < s_max < inf, got [{s_min}, {s_max}]")
    if int(k) != k or k < 0 or int(n) != n or n < 1:
        raise ValueError(f"restart needs K >= 0 restarts of N >= 1 steps (integers), got K = {k}, N = {n}")
    return Restart(float(s_min), float(s_max), int(k), int(n))


def parse_restart(text: str) -> Restart:
    """"S_MIN:S_MAX:K:N" -> Restart, e.g. "0.1:2:2:10" (the paper's SD setting); ValueError with the usage."""
    parts = text.split(":")
    try:
        if len(parts) != 4:
            raise ValueError(f"{len(parts)} fields")
        return check_restart(Restart(float(parts[0]), float(parts[1]), float(parts[2]), float(parts[3])))
    except ValueError as e:
        raise ValueError(f"--restart {text!r}: expected {RESTART_USAGE} ({e})") from None


def format_restart(restart: Restart) -> str:
    """Restart -> "S_MIN:S_MAX:K:N", what `parse_restart` reads back exactly."""
    return f"{restart.s_min!r}:{restart.s_max!r}:{restart.k}:{restart.n}"


def restart_levels(s_lo: float, s_hi: float, n: int, rho: float = RESTART_RHO) -> list[float]:
    """n + 1 levels from s_hi down to s_lo, evenly spaced in s^(1/rho) (Karras et al. 2022, eq. 5); ends exact."""
    a, b = s_hi ** (1 / rho), s_lo ** (1 / rho)
    return [s_hi] + [(a + j / n * (b - a)) ** rho for j in range(1, n)] + [s_lo]


def _point(schedule, t: float) -> tuple[float, float, float]:
    """(t, alpha, sigma) of the schedule at time t, as host floats."""
    alpha, sigma = (float(c) for c in schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
    return t, alpha, sigma


def _time_at(schedule, s: float) -> float:
    """The time whose level sigma / alpha is s (log-SNR -2 log s)."""
    return float(schedule.t_from_logsnr(np.float64(-2.0 * math.log(s))))


def restart_noise(x, lo: tuple[float, float, float], hi: tuple[float, float, float], generator):
    """x at level s_lo -> a draw at s_hi: y + sqrt(s_hi^2 - s_lo^2) z in y = x / alpha (the VE forward kernel);
    lo, hi: (t, alpha, sigma)."""
    s_lo, s_hi = lo[2] / lo[1], hi[2] / hi[1]
    y = x / lo[1] + math.sqrt(s_hi ** 2 - s_lo ** 2) * _noise(x, generator)
    return hi[1] * y


def _restart_start(steps: list[Step], s_min: float) -> int | None:
    """The step whose end level (nearest s_min in log s, among the noisy ones) the restarts leave from; None if none."""
    ends = [(abs(math.log(st.sigma_next / st.alpha_next) - math.log(s_min)), st.i)
            for st in steps if st.sigma_next > 0 and st.alpha_next > 0]
    return min(ends)[1] if ends else None


@torch.no_grad()
def sample_restart(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None,
                   restart: Restart | None = None):
    """Restart sampling (Xu et al. 2023): Heun on `ts`; at the grid level s_lo nearest s_min, K times: noise up
    to s_max by the VE kernel, N Heun steps back down. restart: None = `default_restart(len(ts) - 1)`; K = 0: heun."""
    denoise, bar = _prepare(model, x, ts, schedule, extra_args, disable)
    steps = bar.iterable
    plan = default_restart(len(steps)) if restart is None else check_restart(restart)
    start = None if plan is None or plan.k == 0 else _restart_start(steps, plan.s_min)
    for st in bar:
        x = heun_step(denoise, x, st, callback)
        if st.i != start:
            continue
        lo, hi = _point(schedule, st.t_next), _point(schedule, _time_at(schedule, plan.s_max))
        s_lo, s_hi = lo[2] / lo[1], hi[2] / hi[1]
        if not s_hi > s_lo:
            raise ValueError(f"restart: s_max = {plan.s_max} (s = {s_hi:.4g} on this schedule) must lie above the "
                             f"grid level {s_lo:.4g} the restart leaves from (nearest s_min = {plan.s_min})")
        # the restart grid's points; its ends are the exact lo and hi, the inner times from their levels
        points = [hi] + [_point(schedule, _time_at(schedule, s)) for s in restart_levels(s_lo, s_hi, plan.n)[1:-1]] + [lo]
        for _ in range(plan.k):
            x = restart_noise(x, lo, hi, generator)
            for a, b in zip(points[:-1], points[1:]):
                x = heun_step(denoise, x, Step(st.i, a[0], b[0], a[1], a[2], b[1], b[2]), callback)
    return x
