"""The N-step stochastic sampler of Meng et al. 2023 (sec. 4.3), with the core samplers' signature.

Each step at t_i jumps deterministically (DDIM) two grid steps down to t_{i+2}, then goes one grid
step back up by forward diffusion q(z_{t_{i+1}} | z_{t_{i+2}}): the same N model evaluations as
deterministic DDIM, with fresh noise injected at every step (in the spirit of Karras et al. 2022's
churn). The last step is a plain deterministic DDIM step to clean data.
"""
from __future__ import annotations

import math

import torch

from ldm.diffusion.samplers import _noise, _notify, _prepare


def _forward_diffuse(x, alpha_u, sigma_u, alpha_s, sigma_s, generator):
    """A draw of z_s ~ q(z_s | z_u) for s later in time than u: mean (alpha_s/alpha_u) z_u (Kingma et al. 2021, eq. 4)."""
    a = alpha_s / alpha_u
    var = max(sigma_s ** 2 - a ** 2 * sigma_u ** 2, 0.0)
    return a * x + math.sqrt(var) * _noise(x, generator)


@torch.no_grad()
def sample_stochastic(model, x, ts, schedule, *, extra_args=None, callback=None, disable=None, generator=None):
    """Meng et al. 2023, sec. 4.3: DDIM over two steps, then noise back over one; last step deterministic."""
    denoise, bar = _prepare(model, x, ts, schedule, extra_args, disable)
    steps = bar.iterable                      # the list of `Step`s behind the progress bar
    coeffs = [(st.alpha, st.sigma) for st in steps] + [(steps[-1].alpha_next, steps[-1].sigma_next)]
    for st in bar:
        denoised = denoise(x, st.t)
        _notify(callback, st, x, denoised)
        eps = (x - st.alpha * denoised) / st.sigma
        if st.i + 2 >= len(coeffs):           # the last step: deterministic DDIM to the final entry
            x = st.alpha_next * denoised + st.sigma_next * eps
            continue
        alpha_2, sigma_2 = coeffs[st.i + 2]   # twice the step length (Meng: "same as an N/2-step sampler")
        x = alpha_2 * denoised + sigma_2 * eps
        x = _forward_diffuse(x, alpha_2, sigma_2, st.alpha_next, st.sigma_next, generator)
    return x
