"""The exponential grid (laid out in s = sigma / alpha like Karras') against diffusers' EulerDiscreteScheduler(
use_exponential_sigmas), the beta grid (Lee et al. 2024, in time) against its formula computed with scipy, and
our Beta quantiles against scipy's."""
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


@pytest.mark.parametrize("n", [2, 8, 25])
def test_exponential_grid_matches_diffusers(n):
    """On SD's schedule (s from 0.029 to 14.6, inside the [0.002, 80] cut) the grid is diffusers' own over the
    same range ("linspace" ends at t = 0 and T-1), and Euler on it takes diffusers' steps."""
    name = "scaled_linear"
    beta_schedule, kw = BETAS[name]
    ref = EulerDiscreteScheduler(beta_schedule=beta_schedule, timestep_spacing="linspace", use_exponential_sigmas=True,
                                 **kw)
    ref.set_timesteps(n)
    sched = make_schedule(name)
    ts = sched.timesteps(n, spacing="exponential")
    alpha, sigma = sched.alpha_sigma(ts)
    # diffusers builds sigma = sqrt((1 - a) / a) in float32 (as for the karras grid: a few 1e-4 relative)
    torch.testing.assert_close(sigma / alpha, ref.sigmas.double(), atol=0, rtol=1e-3)
    torch.testing.assert_close(ts[:-1], ref.timesteps.double(), atol=0.05, rtol=0)
    for i, (x, y) in enumerate(zip(_ours(sample_euler, name, ts, _noise()), _euler_reference(ref))):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=5e-4, msg=lambda m: f"step {i}: {m}")


@pytest.mark.parametrize("name, span", [("scaled_linear", 999.0), ("cosine_logsnr", 1.0), ("rectified_flow", 1.0)])
@pytest.mark.parametrize("n", [1, 4, 10])
def test_beta_grid_is_lee_et_al(name, span, n):
    """t_i = F^-1(1 - i/n) (t_max - t_min) + t_min for i < n, F the Beta(0.6, 0.6) CDF (scipy here), then clean
    data; --shift moves it like the trailing grid (the noisiest end stays put)."""
    sched = make_schedule(name)
    ts = sched.timesteps(n, spacing="beta")
    expected = scipy.stats.beta.ppf(1 - np.arange(n) / n, 0.6, 0.6) * span
    np.testing.assert_allclose(ts[:-1].numpy(), expected, atol=1e-6 * span, rtol=0)
    assert float(ts[-1]) < 0
    if n >= 10:
        gaps = -np.diff(expected)
        assert gaps[0] < gaps[len(gaps) // 2] and gaps[-1] < gaps[len(gaps) // 2]    # crowded at both ends
    with pytest.raises(ValueError, match="steps_offset"):
        sched.timesteps(n, spacing="beta", steps_offset=1)


def test_exponential_grid_on_a_wide_schedule():
    """cosine_logsnr (s up to 22026) is cut to [0.002, 80] as for karras; equal steps in log s."""
    sched = make_schedule("cosine_logsnr")
    ts = sched.timesteps(9, spacing="exponential")
    alpha, sigma = sched.alpha_sigma(ts[:-1])
    s = (sigma / alpha).numpy()
    np.testing.assert_allclose([s[0], s[-1]], KARRAS_SIGMAS[::-1], rtol=1e-4)
    np.testing.assert_allclose(np.diff(np.log(s)), np.log(KARRAS_SIGMAS[0] / KARRAS_SIGMAS[1]) / 8, rtol=1e-4)
