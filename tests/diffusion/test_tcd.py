"""sample_tcd (TCD's strategic stochastic sampling) step for step against diffusers' TCDScheduler, a test-only
reference, on SD's discrete schedule; and its two ends: gamma = 0 deterministic, gamma = 1 `sample_lcm`."""

import math

import pytest
import torch
from diffusers import TCDScheduler

from ldm.diffusion.param import Denoiser, ddim_step
from ldm.diffusion.samplers import SAMPLERS, sample_ddim, sample_lcm, sample_tcd, tcd_time
from ldm.diffusion.schedules import CLEAN, make_schedule

T = 1000


def eps_fn(x, t):
    """An analytic noise predictor: nonlinear in x, depends on t."""
    t = torch.as_tensor(t, dtype=x.dtype)
    return torch.tanh(x) * 0.3 + 0.1 * t.reshape(-1, *[1] * (x.ndim - 1)) / T


def _noise(seed=0):
    return torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ours(sampler, ts, sched, seed=1, **kw):
    """Our sampler from _noise() with generator `seed`: x before every step, then the output."""
    xs = []
    out = sampler(Denoiser(eps_fn, sched, "eps"), _noise(), ts, sched, disable=True,
                  generator=torch.Generator().manual_seed(seed), callback=lambda d: xs.append(d["x"]), **kw)
    return xs + [out]


def _diffusers(n, gamma, data_at_0=False):
    """TCDScheduler's trajectory (SD's betas, its defaults) from the same noise, generator seeded 1. data_at_0:
    its timestep 0 made the data (alpha-bar 1), our CLEAN, where it takes the paper's time 0."""
    ref = TCDScheduler()
    if data_at_0:
        ref.alphas_cumprod[0] = 1.0
    ref.set_timesteps(n)
    x, gen = _noise(), torch.Generator().manual_seed(1)
    traj = [x]
    for t in ref.timesteps:
        x = ref.step(eps_fn(x, t), t, x, eta=gamma, generator=gen).prev_sample.double()
        traj.append(x)
    return traj, ref.timesteps


def _assert_close(ours, ref):
    # diffusers' float32 alpha-bar weighs in each step's fresh noise, as in test_lcm_matches_diffusers; LCM's
    # scalings move f off D by < 7e-6 of it at t = 19 (TCDScheduler has none)
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"step {i}: {m}")


def test_tcd_is_registered_and_takes_eta_as_gamma():
    from ldm.diffusion.samplers import ETA_OPTIONS
    assert SAMPLERS["tcd"] is sample_tcd and ETA_OPTIONS["ddim"] == "eta" and ETA_OPTIONS["tcd"] == "gamma"


@pytest.mark.parametrize("n", [1, 2, 4, 8, 50])
def test_lcm_spacing_is_tcds_grid(n):
    ref = TCDScheduler()
    ref.set_timesteps(n)
    assert make_schedule("scaled_linear").timesteps(n, spacing="lcm")[:-1].tolist() == ref.timesteps.double().tolist()


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 25, 50])
def test_matches_diffusers_step_by_step(gamma, n):
    """Ending at timestep 0 as TCDScheduler does (final="t_min"): the same s' (floored) and the same noise draws."""
    sched = make_schedule("scaled_linear")
    ref, _ = _diffusers(n, gamma)
    _assert_close(_ours(sample_tcd, sched.timesteps(n, spacing="lcm", final="t_min"), sched, gamma=gamma), ref)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 25])
def test_matches_diffusers_with_the_data_at_timestep_0(gamma, n):
    """On our default grid, ending clean: TCDScheduler with its timestep 0 made the data, the paper's time 0. At
    gamma = 1 it then maps to the data and back, as its unpatched self does not: there it stops at SD's timestep
    0 (sigma / alpha = 0.029), off the multistep consistency sampler by thousands of times the tolerance here."""
    sched = make_schedule("scaled_linear")
    ours = _ours(sample_tcd, sched.timesteps(n, spacing="lcm"), sched, gamma=gamma)
    _assert_close(ours, _diffusers(n, gamma, data_at_0=True)[0])
    if gamma == 1 and n > 1:
        ref = _diffusers(n, gamma)[0]
        assert max(float((a - b).abs().max()) for a, b in zip(ours[1:-1], ref[1:-1])) > 1e-3


@pytest.mark.parametrize("name", ["scaled_linear", "cosine_logsnr"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_gamma_one_is_the_multistep_consistency_sampler(name, n):
    """gamma = 1: s' is the data, so each step is `sample_lcm`'s, drawing the same noise from the same generator."""
    sched = make_schedule(name)
    ts = sched.timesteps(n, spacing="lcm")
    gens = [torch.Generator().manual_seed(1) for _ in range(2)]
    outs = []
    for sampler, gen, kw in ((sample_tcd, gens[0], {"gamma": 1.0}), (sample_lcm, gens[1], {})):
        xs = []
        out = sampler(Denoiser(eps_fn, sched, "eps"), _noise(), ts, sched, disable=True, generator=gen,
                      callback=lambda d: xs.append(d["x"]), **kw)
        outs.append(xs + [out])
    for i, (a, b) in enumerate(zip(*outs)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m: f"step {i}: {m}")
    assert torch.equal(gens[0].get_state(), gens[1].get_state())       # as many draws
    assert n == 1 or not torch.equal(gens[0].get_state(), torch.Generator().manual_seed(1).get_state())


@pytest.mark.parametrize("name", ["scaled_linear", "cosine_logsnr"])
def test_gamma_zero_is_deterministic_ddim_on_f(name):
    """gamma = 0 draws no noise (the generator is untouched) and is DDIM; with LCM's scalings off (f = D) it is
    `sample_ddim` itself. gamma = 0.3 does depend on the generator."""
    sched = make_schedule(name)
    ts = sched.timesteps(4, spacing="lcm")
    model = Denoiser(eps_fn, sched, "eps")
    gen, state = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5).get_state()
    first = sample_tcd(model, _noise(), ts, sched, disable=True, gamma=0.0, generator=gen)
    assert torch.equal(gen.get_state(), state)
    second = sample_tcd(model, _noise(), ts, sched, disable=True, gamma=0.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, second)
    plain = sample_tcd(model, _noise(), ts, sched, disable=True, gamma=0.0, timestep_scaling=1e12)
    torch.testing.assert_close(plain, sample_ddim(model, _noise(), ts, sched, disable=True), atol=1e-12, rtol=1e-12)
    noisy = [sample_tcd(model, _noise(), ts, sched, disable=True, gamma=0.3, generator=torch.Generator().manual_seed(s))
             for s in (5, 6)]
    assert (noisy[0] - noisy[1]).abs().max() > 1e-2


def test_intermediate_time():
    """s' = (1 - gamma) s; floored to a timestep on a discrete schedule (as TCDScheduler), exact on a continuous one;
    the data (CLEAN) for gamma = 1 and for a clean s; s itself for gamma = 0."""
    sd, cont = make_schedule("scaled_linear"), make_schedule("cosine_logsnr")
    assert tcd_time(499.0, 0.3, sd) == 349.0 and tcd_time(19.0, 0.3, sd) == 13.0 and tcd_time(0.0, 0.3, sd) == 0.0
    assert tcd_time(0.5, 0.3, cont) == pytest.approx(0.35, abs=1e-15)
    assert tcd_time(123.4, 0.0, sd) == 123.4 and tcd_time(0.5, 0.0, cont) == 0.5
    for sched, s in ((sd, 499.0), (sd, 0.0), (cont, 0.5)):
        assert tcd_time(s, 1.0, sched) == CLEAN and tcd_time(CLEAN, 0.3, sched) == CLEAN


def test_one_step_on_a_continuous_schedule_by_hand():
    """The shipped model's schedule (no diffusers reference): DDIM on f to s' = 0.7 s, then q(x_s | x_s')."""
    sched = make_schedule("cosine_logsnr")
    ts = sched.timesteps(2, spacing="lcm")                 # 1.0, 0.5, clean
    model = Denoiser(eps_fn, sched, "eps")
    x1 = _ours(sample_tcd, ts, sched, seed=3, gamma=0.3)[1]
    (a, s), (a_mid, s_mid), (a_next, s_next) = [(float(c) for c in sched.alpha_sigma(torch.tensor(t)))
                                                for t in (1.0, 0.35, 0.5)]
    x = _noise()
    d = model(x, torch.ones(4, dtype=torch.float64))       # c_skip(1.0) = 2.5e-9: f is D to 1e-8
    mid = ddim_step(x, d, a, s, a_mid, s_mid)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hand = a_next / a_mid * mid + math.sqrt(s_next ** 2 - (a_next / a_mid * s_mid) ** 2) * z
    torch.testing.assert_close(x1, hand, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("gamma", [-0.1, 1.5])
def test_gamma_outside_0_1_is_refused(gamma):
    sched = make_schedule("scaled_linear")
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        sample_tcd(Denoiser(eps_fn, sched, "eps"), _noise(), sched.timesteps(2, spacing="lcm"), sched, gamma=gamma)
