"""Our samplers step for step against diffusers' schedulers, same model function, same noise."""

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LCMScheduler)

from ldm.diffusion.param import Denoiser
from ldm.diffusion.samplers import (sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_euler,
                                   sample_euler_a, sample_lcm)
from ldm.diffusion.schedules import make_schedule

T = 1000
BETAS = {"linear": ("linear", {}), "scaled_linear": ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
         "cosine": ("squaredcos_cap_v2", {})}


def eps_fn(x, t):
    """An analytic noise predictor: nonlinear in x, depends on t."""
    t = torch.as_tensor(t, dtype=x.dtype)
    return torch.tanh(x) * 0.3 + 0.1 * t.reshape(-1, *[1] * (x.ndim - 1)) / T


def _noise(seed=0):
    return torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ours(sampler, name, ts, x, **kw):
    """Run our sampler, recording x before every step."""
    sched = make_schedule(name, T=T)
    xs = []
    out = sampler(Denoiser(eps_fn, sched, "eps"), x, ts, sched, disable=True,
                  callback=lambda d: xs.append(d["x"]), **kw)
    return xs + [out]


def _assert_trajectories_close(ours, ref):
    # rtol too: diffusers keeps its tables in float32 (~1e-7 relative), and x0-hat of this
    # made-up eps reaches |x| ~ 60 after a step to clean data from alpha ~ 0.006.
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {i}: {m}")


@pytest.mark.parametrize("name", BETAS)
@pytest.mark.parametrize("n", [1, 10])
def test_ddpm_matches_diffusers(name, n):
    beta_schedule, kw = BETAS[name]
    ref = DDPMScheduler(beta_schedule=beta_schedule, variance_type="fixed_small", clip_sample=False,
                        timestep_spacing="trailing", **kw)
    ref.set_timesteps(n)
    x = _noise()
    gen = torch.Generator().manual_seed(1)
    traj = [x]
    for t in ref.timesteps:
        x = ref.step(eps_fn(x, t), t, x, generator=gen).prev_sample
        traj.append(x)
    ts = make_schedule(name).timesteps(n, spacing="trailing")
    _assert_trajectories_close(_ours(sample_ddpm, name, ts, _noise(), generator=torch.Generator().manual_seed(1)),
                               traj)


@pytest.mark.parametrize("name", BETAS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing, offset", [("leading", 1), ("trailing", 0)])
def test_ddim_matches_diffusers(name, eta, spacing, offset):
    beta_schedule, kw = BETAS[name]
    ref = DDIMScheduler(beta_schedule=beta_schedule, clip_sample=False, set_alpha_to_one=True,
                        timestep_spacing=spacing, steps_offset=offset, **kw)
    ref.set_timesteps(20)
    x = _noise()
    gen = torch.Generator().manual_seed(1)
    traj = [x]
    for t in ref.timesteps:
        x = ref.step(eps_fn(x, t), t, x, eta=eta, generator=gen).prev_sample
        traj.append(x)
    ts = make_schedule(name).timesteps(20, spacing=spacing, steps_offset=offset)
    ours = _ours(sample_ddim, name, ts, _noise(), eta=eta, generator=torch.Generator().manual_seed(1))
    _assert_trajectories_close(ours, traj)


def _euler_reference(ref):
    """diffusers' Euler trajectory; it integrates in VE coordinates y = x * sqrt(1 + sigma^2), ours in x (VP)."""
    scale = (1 + ref.sigmas.double() ** 2).sqrt()
    y = _noise() * scale[0]
    traj = [y / scale[0]]
    for i, t in enumerate(ref.timesteps):
        y = ref.step(eps_fn(ref.scale_model_input(y, t), t), t, y).prev_sample.double()
        traj.append(y / scale[i + 1])
    return traj


@pytest.mark.parametrize("name", BETAS)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler_matches_diffusers(name, spacing):
    beta_schedule, kw = BETAS[name]
    ref = EulerDiscreteScheduler(beta_schedule=beta_schedule, timestep_spacing=spacing, **kw)
    ref.set_timesteps(15)
    ts = make_schedule(name).timesteps(15, spacing=spacing)
    _assert_trajectories_close(_ours(sample_euler, name, ts, _noise()), _euler_reference(ref))


@pytest.mark.parametrize("name", BETAS)
@pytest.mark.parametrize("n", [1, 5, 20])
@pytest.mark.parametrize("algorithm,sampler,dtype,tol", [("dpmsolver++", sample_dpmpp_2m, torch.float64, 1e-5),
                                                         # the SDE's noise is drawn in float32 by diffusers
                                                         ("sde-dpmsolver++", sample_dpmpp_2m_sde, torch.float32, 2e-4)])
def test_dpmpp_2m_matches_diffusers(name, n, algorithm, sampler, dtype, tol):
    beta_schedule, kw = BETAS[name]
    ref = DPMSolverMultistepScheduler(beta_schedule=beta_schedule, algorithm_type=algorithm, solver_order=2,
                                      solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
                                      timestep_spacing="trailing", **kw)
    ref.set_timesteps(n)
    x = _noise().to(dtype)
    gen = torch.Generator().manual_seed(1)
    traj = [x]
    for t in ref.timesteps:
        x = ref.step(eps_fn(x, t), t, x, generator=gen).prev_sample.to(dtype)
        traj.append(x)
    ts = make_schedule(name).timesteps(n, spacing="trailing")
    torch.testing.assert_close(ts[:-1], ref.timesteps.double())
    ours = _ours(sampler, name, ts, _noise().to(dtype), generator=torch.Generator().manual_seed(1))
    assert len(ours) == len(traj)
    for i, (a, b) in enumerate(zip(ours, traj)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"step {i}: {m}")


@pytest.mark.parametrize("name", BETAS)
@pytest.mark.parametrize("n", [1, 6, 15])
def test_euler_ancestral_matches_diffusers(name, n):
    """Same generator: diffusers draws its noise in VE coordinates y = x / alpha once a step, as we do."""
    beta_schedule, kw = BETAS[name]
    ref = EulerAncestralDiscreteScheduler(beta_schedule=beta_schedule, timestep_spacing="trailing", **kw)
    ref.set_timesteps(n)
    scale = (1 + ref.sigmas.double() ** 2).sqrt()
    gen = torch.Generator().manual_seed(1)
    y = _noise() * scale[0]
    traj = [y / scale[0]]
    for i, t in enumerate(ref.timesteps):
        y = ref.step(eps_fn(ref.scale_model_input(y, t), t), t, y, generator=gen).prev_sample.double()
        traj.append(y / scale[i + 1])
    ts = make_schedule(name).timesteps(n, spacing="trailing")
    _assert_trajectories_close(_ours(sample_euler_a, name, ts, _noise(), generator=torch.Generator().manual_seed(1)),
                               traj)


@pytest.mark.parametrize("name", BETAS)
@pytest.mark.parametrize("n", [1, 2, 4, 8, 50])
def test_lcm_matches_diffusers(name, n):
    """The lcm grid (n of the 50 LCM-training timesteps) and multistep consistency sampling, same generator."""
    beta_schedule, kw = BETAS[name]
    # LCMScheduler's default betas are SD's: give DDPM's linear ones explicitly
    ref = LCMScheduler(beta_schedule=beta_schedule, **{"beta_start": 1e-4, "beta_end": 0.02, **kw})
    ref.set_timesteps(n)
    ts = make_schedule(name).timesteps(n, spacing="lcm")
    torch.testing.assert_close(ts[:-1], ref.timesteps.double())
    x, gen = _noise(), torch.Generator().manual_seed(1)
    traj = [x]
    for t in ref.timesteps:
        x = ref.step(eps_fn(x, t), t, x, generator=gen).prev_sample.double()
        traj.append(x)
    ours = _ours(sample_lcm, name, ts, _noise(), generator=torch.Generator().manual_seed(1))
    assert len(ours) == len(traj)
    for i, (a, b) in enumerate(zip(ours, traj)):   # each step re-noises x0-hat: float32 tables weigh more
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"step {i}: {m}")
    with pytest.raises(ValueError, match="at most 50 steps"):
        make_schedule(name).timesteps(51, spacing="lcm")
    # a continuous schedule: n of the times m/50 (stage LCM training's grid, tests/distill/test_lcm.py)
    assert make_schedule("cosine_logsnr").timesteps(4, spacing="lcm")[:-1].tolist() == [1.0, 0.76, 0.5, 0.26]


@pytest.mark.parametrize("n", [2, 8, 25])  # n = 1: diffusers' linspace grid is [0] alone
def test_karras_grid_matches_diffusers(n):
    """spacing="karras": Karras et al.'s sigmas (eq. 5, rho 7) over SD's schedule, at fractional timesteps;
    diffusers' Euler with use_karras_sigmas over the same range ("linspace" ends at 0 and T-1). SD's
    range, 0.029 to 14.6, lies inside the [0.002, 80] that the grid is cut to."""
    name = "scaled_linear"
    beta_schedule, kw = BETAS[name]
    ref = EulerDiscreteScheduler(beta_schedule=beta_schedule, timestep_spacing="linspace", use_karras_sigmas=True, **kw)
    ref.set_timesteps(n)
    sched = make_schedule(name)
    ts = sched.timesteps(n, spacing="karras")
    alpha, sigma = sched.alpha_sigma(ts)
    # diffusers builds sigma = sqrt((1 - a) / a) in float32: at a = 0.9999 (t = 0) 1 - a keeps ~3 digits
    torch.testing.assert_close(sigma / alpha, ref.sigmas.double(), atol=0, rtol=1e-3)
    # ... and inverts log sigma on that float32 table: near t = 0 its timesteps move by a few hundredths
    torch.testing.assert_close(ts[:-1], ref.timesteps.double(), atol=0.05, rtol=0)
    ours = _ours(sample_euler, name, ts, _noise())
    for i, (a, b) in enumerate(zip(ours, _euler_reference(ref))):   # diffusers' float32 sigmas (above) set the tolerance
        torch.testing.assert_close(a, b, atol=1e-4, rtol=5e-4, msg=lambda m: f"step {i}: {m}")


@pytest.mark.parametrize("name,lo,hi", [("cosine_logsnr", 0.002, 80.0),      # +-20 log-SNR: cut on both sides
                                         ("linear", None, 80.0)])               # DDPM's 157 at t = T-1: cut
def test_karras_formula_within_its_range(name, lo, hi):
    sched = make_schedule(name)
    ts = sched.timesteps(6, spacing="karras")
    alpha, sigma = sched.alpha_sigma(ts[:-1])
    s = (sigma / alpha).numpy()
    if lo is None:                                    # the schedule's own cleanest level
        a, sg = sched.alpha_sigma(torch.tensor(sched.t_min))
        lo = float(sg / a)
    ramp = np.arange(6) / 5
    expected = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    np.testing.assert_allclose(s, expected, rtol=1e-6)
    assert ts[-1] < 0 and bool((ts[:-1].diff() < 0).all())
    with pytest.raises(ValueError, match="steps_offset does not apply"):
        sched.timesteps(4, spacing="karras", steps_offset=1)
