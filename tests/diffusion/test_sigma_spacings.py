"""The exponential and beta time grids (laid out in s = sigma / alpha like Karras') against diffusers'
EulerDiscreteScheduler(use_exponential_sigmas / use_beta_sigmas), and our Beta quantiles against scipy."""
import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import EulerDiscreteScheduler

from ldm.diffusion.samplers import sample_euler
from ldm.diffusion.schedules import KARRAS_SIGMAS, beta_ppf, make_schedule
from tests.diffusion.test_samplers_vs_diffusers import BETAS, _euler_reference, _noise, _ours


@pytest.mark.parametrize("a, b", [(0.6, 0.6), (0.5, 0.5), (2.0, 5.0)])
def test_beta_quantiles_match_scipy(a, b):
    q = np.linspace(0.0, 1.0, 2001)
    np.testing.assert_allclose(beta_ppf(q, a, b), scipy.stats.beta.ppf(q, a, b), atol=5e-7, rtol=0)
    with pytest.raises(ValueError, match=">= 0.5"):
        beta_ppf(q, 0.3, 1.0)


@pytest.mark.parametrize("spacing, flag", [("exponential", "use_exponential_sigmas"), ("beta", "use_beta_sigmas")])
@pytest.mark.parametrize("n", [2, 8, 25])
def test_sigma_grids_match_diffusers(spacing, flag, n):
    """On SD's schedule (s from 0.029 to 14.6, inside the [0.002, 80] cut) the grid is diffusers' own over the
    same range ("linspace" ends at t = 0 and T-1), and Euler on it takes diffusers' steps."""
    name = "scaled_linear"
    beta_schedule, kw = BETAS[name]
    ref = EulerDiscreteScheduler(beta_schedule=beta_schedule, timestep_spacing="linspace", **{flag: True}, **kw)
    ref.set_timesteps(n)
    sched = make_schedule(name)
    ts = sched.timesteps(n, spacing=spacing)
    alpha, sigma = sched.alpha_sigma(ts)
    # diffusers builds sigma = sqrt((1 - a) / a) in float32 (as for the karras grid: a few 1e-4 relative)
    torch.testing.assert_close(sigma / alpha, ref.sigmas.double(), atol=0, rtol=1e-3)
    torch.testing.assert_close(ts[:-1], ref.timesteps.double(), atol=0.05, rtol=0)
    for i, (x, y) in enumerate(zip(_ours(sample_euler, name, ts, _noise()), _euler_reference(ref))):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=5e-4, msg=lambda m: f"step {i}: {m}")


def test_grids_are_what_they_say_on_a_wide_schedule():
    """cosine_logsnr (s up to 22026) is cut to [0.002, 80] as for karras; exponential: equal steps in log s;
    beta: in s, symmetric steps crowded at both ends, the middle ones the widest."""
    sched = make_schedule("cosine_logsnr")
    for spacing in ("exponential", "beta"):
        ts = sched.timesteps(9, spacing=spacing)
        alpha, sigma = sched.alpha_sigma(ts[:-1])
        s = (sigma / alpha).numpy()
        np.testing.assert_allclose([s[0], s[-1]], KARRAS_SIGMAS[::-1], rtol=1e-4)
        assert (np.diff(s) < 0).all()
        if spacing == "exponential":
            np.testing.assert_allclose(np.diff(np.log(s)), np.log(KARRAS_SIGMAS[0] / KARRAS_SIGMAS[1]) / 8, rtol=1e-4)
        else:
            gaps = -np.diff(s)
            np.testing.assert_allclose(gaps, gaps[::-1], rtol=1e-6)
            assert gaps[0] < gaps[4] / 2.5 and gaps[4] == pytest.approx(gaps.max())
