"""Schedules against diffusers' DDPMScheduler / DDIMScheduler and against closed forms."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ldm.diffusion.schedules import CLEAN, make_schedule, schedule_from_config, shifted

# our name -> (diffusers beta_schedule, its config kwargs)
DISCRETE = {
    "linear": ("linear", {}),
    "scaled_linear": ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
    "cosine": ("squaredcos_cap_v2", {}),
}


@pytest.mark.parametrize("name", DISCRETE)
def test_alphas_cumprod_match_diffusers(name):
    beta_schedule, kw = DISCRETE[name]
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, **kw).alphas_cumprod.double()
    ours = make_schedule(name, T=1000)
    torch.testing.assert_close(ours.alphas_cumprod, ref, atol=1e-6, rtol=0)
    alpha, sigma = ours.alpha_sigma(torch.arange(1000))
    torch.testing.assert_close(alpha ** 2, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(sigma ** 2, 1 - ref, atol=1e-6, rtol=0)


SPACING_CASES = [(spacing, offset, n) for spacing, offset in [("leading", 0), ("leading", 1), ("trailing", 0),
                                                                ("linspace", 0)]
                 for n in (1, 7, 30, 50, 1000) if not (offset and n == 1000)]  # 1..1000 leaves [0, 999]


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DDPMScheduler])
@pytest.mark.parametrize("spacing, offset, n", SPACING_CASES)
def test_timestep_spacing_matches_diffusers(scheduler_cls, spacing, offset, n):
    ref = scheduler_cls(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(n)
    ts = make_schedule("linear").timesteps(n, spacing=spacing, steps_offset=offset)
    assert ts.shape == (n + 1,)
    torch.testing.assert_close(ts[:-1], ref.timesteps.double(), atol=1e-6, rtol=0)
    assert ts[-1] == CLEAN


def test_final_entry_options():
    sched = make_schedule("scaled_linear")
    clean = sched.timesteps(10, final="clean")
    alpha, sigma = sched.alpha_sigma(clean[-1])
    assert (alpha.item(), sigma.item()) == (1.0, 0.0)            # diffusers' set_alpha_to_one=True
    first = sched.timesteps(10, final="t_min")
    assert first[-1] == 0                                          # set_alpha_to_one=False: alphas_cumprod[0]
    assert sched.alpha_sigma(first[-1])[0] ** 2 == pytest.approx(sched.alphas_cumprod[0].item())


def test_fractional_time_interpolates_logsnr():
    sched = make_schedule("cosine")
    ac = sched.alphas_cumprod
    lam = torch.log(ac / (1 - ac))
    t = torch.tensor([10.25, 500.5, 998.75])
    lo = t.floor().long()
    expected = lam[lo] + (t - lo).double() * (lam[lo + 1] - lam[lo])
    torch.testing.assert_close(sched.logsnr(t), expected)
    alpha, sigma = sched.alpha_sigma(t)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones(3, dtype=torch.float64))


def test_cosine_logsnr_closed_form():
    sched = make_schedule("cosine_logsnr")
    t = torch.tensor([0.1, 0.3, 0.5, 0.9])
    expected = -2 * torch.log(torch.tan(math.pi * t.double() / 2))
    torch.testing.assert_close(sched.logsnr(t), expected)
    alpha, sigma = sched.alpha_sigma(t)
    # lambda = -2 log tan(pi t/2) gives alpha = cos(pi t/2), sigma = sin(pi t/2) (Salimans & Ho 2022).
    torch.testing.assert_close(alpha, torch.cos(math.pi * t.double() / 2))
    torch.testing.assert_close(sigma, torch.sin(math.pi * t.double() / 2))
    assert sched.logsnr(0.0).item() == 20.0 and sched.logsnr(1.0).item() == -20.0   # clipped
    ts = sched.timesteps(4, spacing="trailing")
    torch.testing.assert_close(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, CLEAN], dtype=torch.float64))


def test_ve_sigmas_geometric():
    sched = make_schedule("ve", sigma_min=0.01, sigma_max=50.0)
    ts = sched.timesteps(10, spacing="linspace")
    alpha, sigma = sched.alpha_sigma(ts[:-1])
    expected = torch.exp(torch.linspace(math.log(50.0), math.log(0.01), 10, dtype=torch.float64))
    torch.testing.assert_close(sigma, expected)
    assert bool((alpha == 1).all())
    assert sched.alpha_sigma(ts[-1])[1].item() == 0.0


def test_bad_options_name_the_culprit():
    with pytest.raises(ValueError, match="'cosinus'"):
        make_schedule("cosinus")
    with pytest.raises(ValueError, match="'beta_max'"):
        schedule_from_config({"name": "linear", "beta_max": 0.02})
    with pytest.raises(ValueError, match="'middle'"):
        make_schedule("linear").timesteps(10, spacing="middle")
    with pytest.raises(ValueError, match="name"):
        schedule_from_config({"T": 1000})
    with pytest.raises(ValueError, match="steps_offset=1"):
        make_schedule("linear").timesteps(1000, spacing="leading", steps_offset=1)


@pytest.mark.parametrize("name, options", [("scaled_linear", {}), ("cosine", {}), ("cosine_logsnr", {}),
                                           ("ve", {}), ("scaled_linear", {"zero_snr": True})])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_a_grid_shift_lowers_each_grid_times_logsnr_by_2_log_s(name, options, spacing):
    """SD3's shift (eq. 23) for any schedule: lambda(t') = lambda(t) - 2 log s wherever that stays inside the
    schedule's range (the noisiest end stays the end); the schedule itself is left as it was."""
    schedule = make_schedule(name, **options)
    plain = schedule.timesteps(10, spacing=spacing)[:-1]
    moved = shifted(schedule, 3.0).timesteps(10, spacing=spacing)[:-1]
    assert torch.equal(schedule.timesteps(10, spacing=spacing)[:-1], plain)          # the original is untouched
    assert (moved >= plain - 1e-12).all() and (moved[1:] > plain[1:]).all()           # noisier, except the top end
    lam_min = float(schedule.logsnr(torch.tensor(schedule.t_max, dtype=torch.float64)))
    target = schedule.logsnr(plain) - 2 * math.log(3.0)
    inside = target > lam_min + 1e-6
    assert inside.sum() >= 7
    assert torch.allclose(schedule.logsnr(moved)[inside], target[inside], atol=1e-6)
    assert torch.allclose(moved[~inside], torch.full_like(moved[~inside], schedule.t_max))


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_a_grid_step_at_rectified_flows_data_end_is_refused(spacing):
    """Rectified flow's t = 0 is the data (sigma = 0): leading and linspace grids end their steps there, where every
    sampler divides by sigma; refused by name. VP's continuous t = 0 keeps some noise and stays allowed."""
    with pytest.raises(ValueError, match=f"the {spacing} spacing puts a step at t = 0, where this schedule has no"):
        make_schedule("rectified_flow").timesteps(4, spacing=spacing)
    assert make_schedule("cosine_logsnr").timesteps(4, spacing=spacing)[-2] == 0.0


def test_grid_shift_closed_forms():
    """cosine log-SNR: tan(pi t' / 2) = s tan(pi t / 2) (lambda = -2 log tan(pi t / 2)); rectified flow:
    s t / (1 + (s - 1) t); a shift replaces the schedule's own, and karras / lcm grids keep theirs."""
    cosine, s = make_schedule("cosine_logsnr"), 2.5
    t = cosine.timesteps(8)[1:-1]                              # inside the log-SNR clip
    moved = shifted(cosine, s).timesteps(8)[1:-1]
    assert torch.allclose(torch.tan(math.pi * moved / 2), s * torch.tan(math.pi * t / 2), rtol=1e-9)
    flow = make_schedule("rectified_flow", shift=3.0)
    t = make_schedule("rectified_flow").timesteps(6)
    assert torch.allclose(shifted(flow, 2.0).timesteps(6)[:-1], (2 * t / (1 + t))[:-1])
    assert torch.allclose(shifted(flow, 1.0).timesteps(6), make_schedule("rectified_flow").timesteps(6))
    assert shifted(flow, 2.0).shift == 2.0 and flow.shift == 3.0
    for spacing in ("karras", "lcm"):
        sd = make_schedule("scaled_linear")
        assert torch.equal(shifted(sd, 3.0).timesteps(4, spacing=spacing), sd.timesteps(4, spacing=spacing))
    with pytest.raises(ValueError, match="grid shift must be > 0"):
        shifted(cosine, 0.0)


@pytest.mark.parametrize("name, t", [("cosine_logsnr", 0.7871234567891), ("scaled_linear", 787.1234567891),
                                     ("rectified_flow", 0.7871234567891)])
def test_a_python_float_time_is_read_in_float64(name, t):
    """The samplers hand the schedule host floats (karras grids' fractional times): read at full precision, as a
    float64 tensor of the same time is, not rounded through float32 first (1.5e-7 in log-SNR before)."""
    schedule = make_schedule(name)
    assert float(schedule.logsnr(t)) == float(schedule.logsnr(torch.tensor(t, dtype=torch.float64)))
    assert [float(c) for c in schedule.alpha_sigma(t)] == \
        [float(c) for c in schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64))]
