"""The Restart sampler (Xu et al. 2023) against closed forms: Gaussian and mixture data with their exact denoisers,
the VE forward kernel's variance, plain Heun when nothing restarts, and the net calls it documents."""
import math

import pytest
import torch

from ldm.diffusion.gmm import GaussianMixture, default_mixture
from ldm.diffusion.restart import Restart, default_restart, parse_restart, restart_levels, restart_noise
from ldm.diffusion.samplers import SAMPLERS, initial_noise, sample_heun
from ldm.diffusion.schedules import make_schedule

pytestmark = pytest.mark.usefixtures("one_thread")   # small tensors: threads only contend

SCHEDULES = {  # id: (schedule, options, spacing); rectified_flow starts at alpha = 0 (s = inf)
    "ve": ("ve", {"sigma_min": 0.002, "sigma_max": 80.0}, "linspace"),
    "cosine_logsnr_karras": ("cosine_logsnr", {}, "karras"),
    "scaled_linear_trailing": ("scaled_linear", {}, "trailing"),
    "rectified_flow": ("rectified_flow", {}, "trailing"),
}


def gaussian(mean: float, std: float, dim: int) -> GaussianMixture:
    """N(mean, std^2 I) in `dim` dimensions as a one-component mixture (its exact denoiser: ldm.diffusion.gmm)."""
    return GaussianMixture(weights=torch.ones(1, dtype=torch.float64),
                           means=torch.full((1, dim), mean, dtype=torch.float64),
                           stds=torch.tensor([std], dtype=torch.float64))


def counting(model):
    """`model` that also records the times it is called at."""
    calls = []

    def counted(x, t):
        calls.append(float(t[0]))
        return model(x, t)
    return counted, calls


def draw(schedule, ts, n, dim, seed, model, **options):
    gen = torch.Generator().manual_seed(seed)
    x = initial_noise(schedule, ts, (n, dim), generator=gen, dtype=torch.float64)
    return SAMPLERS["restart"](model, x, ts, schedule, disable=True, generator=gen, **options)


@pytest.mark.parametrize("case", SCHEDULES)
@pytest.mark.parametrize("steps, restart", [(12, None), (24, Restart(0.1, 2.0, 0, 9))],
                         ids=["default_below_20_steps", "k0"])
def test_without_restarts_it_is_heun(case, steps, restart):
    name, options, spacing = SCHEDULES[case]
    schedule = make_schedule(name, **options)
    ts = schedule.timesteps(steps, spacing=spacing)
    model = default_mixture().model(schedule)
    x = initial_noise(schedule, ts, (64, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    heun = sample_heun(model, x, ts, schedule, disable=True)
    out = SAMPLERS["restart"](model, x, ts, schedule, disable=True, generator=torch.Generator().manual_seed(2),
                              restart=restart)
    assert torch.equal(out, heun)


@pytest.mark.parametrize("name, spacing", [("ve", "karras"), ("cosine_logsnr", "karras"), ("scaled_linear", "karras"),
                                           ("rectified_flow", "trailing")])
def test_gaussian_data_mean_and_variance(name, spacing):
    # N(0.7, 0.5^2) in 4 dims: the samples' mean and variance against the closed form, within sampling error and a
    # 1.6% allowance for Heun's discretization (N = 6 restart steps over [0.1, 2] leave var 4.7% high at d = 0.5).
    options = {"sigma_min": 0.002, "sigma_max": 80.0} if name == "ve" else {}
    schedule, data = make_schedule(name, **options), gaussian(0.7, 0.5, 4)
    ts = schedule.timesteps(40, spacing=spacing)
    n = 20000
    x = draw(schedule, ts, n, 4, 0, data.model(schedule), restart=Restart(0.1, 2.0, 2, 12))
    values = x.flatten()                                 # 4n draws; dims independent
    se_mean, se_var = 0.5 / math.sqrt(4 * n), 0.25 * math.sqrt(2 / (4 * n))
    assert abs(values.mean().item() - 0.7) < 5 * se_mean
    assert abs(values.var().item() - 0.25) < 5 * se_var + 0.004


def test_mixture_is_recovered_with_its_mean_and_variance():
    mixture, schedule = default_mixture(), make_schedule("cosine_logsnr")
    ts = schedule.timesteps(20, spacing="karras")
    x = draw(schedule, ts, 8000, 2, 0, mixture.model(schedule))          # the default: [0.1, 2], K = 1, N = 9
    weight_err, mean_err = mixture.errors(x)
    assert weight_err < 0.03 and mean_err < 0.1, (weight_err, mean_err)
    w, mu, s = mixture.weights, mixture.means, mixture.stds
    mean = w @ mu                                                          # E[x] = sum_k w_k mu_k
    var = w @ (s[:, None] ** 2 + mu ** 2) - mean ** 2                      # E[x^2] - E[x]^2, per dim
    torch.testing.assert_close(x.mean(0), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(x.var(0), var, atol=0, rtol=0.05)


@pytest.mark.parametrize("name", ["ve", "cosine", "rectified_flow"])
def test_renoising_maps_exact_samples_at_s_min_to_exact_samples_at_s_max(name):
    # x0 ~ N(mu, d^2): exact draws x = alpha (x0 + s eps) at s_lo go to var alpha_hi^2 d^2 + sigma_hi^2 at s_hi,
    # q(x_hi | x0)'s marginal (Kingma et al. 2021, eq. 2), mean alpha_hi mu.
    schedule = make_schedule(name)
    lo, hi = ((t, *(float(c) for c in schedule.alpha_sigma(torch.tensor(t)))) for t in (0.2, 0.6))
    n, mu, d = 200000, 0.7, 0.5
    gen = torch.Generator().manual_seed(0)
    x0 = mu + d * torch.randn(n, generator=gen, dtype=torch.float64)
    x = lo[1] * x0 + lo[2] * torch.randn(n, generator=gen, dtype=torch.float64)
    out = restart_noise(x, lo, hi, gen)
    var = hi[1] ** 2 * d ** 2 + hi[2] ** 2
    assert abs(out.mean().item() - hi[1] * mu) < 5 * math.sqrt(var / n)
    assert abs(out.var().item() / var - 1) < 5 * math.sqrt(2 / n)


def test_restarts_keep_exact_gaussian_samples_exact():
    # A one-step grid 0.3 -> s_lo = 0.1 (VE), then twice: noise up to 3 and 20 Heun steps back down to s_lo. With
    # Gaussian data the ODE is linear (y - mu scales as sqrt(d^2 + s^2)), so the law at s_lo, var d^2 + s_lo^2,
    # is kept up to Heun's discretization error (0.5% allowed; 4% with 8 steps) and sampling error.
    schedule, d, n = make_schedule("ve", sigma_min=0.002, sigma_max=80.0), 0.5, 100000
    ts = torch.tensor([float(schedule.t_from_logsnr(-2 * math.log(s))) for s in (0.3, 0.1)], dtype=torch.float64)
    s_hi, s_lo = (float(schedule.alpha_sigma(t)[1]) for t in ts)
    gen = torch.Generator().manual_seed(0)
    x = math.sqrt(d ** 2 + s_hi ** 2) * torch.randn(n, 1, generator=gen, dtype=torch.float64)    # exact at 0.3
    model, calls = counting(gaussian(0.0, d, 1).model(schedule))
    out = SAMPLERS["restart"](model, x, ts, schedule, disable=True, generator=gen, restart=Restart(0.1, 3.0, 2, 20))
    assert len(calls) == 2 + 2 * 2 * 20
    assert abs(out.mean().item()) < 5 * math.sqrt((d ** 2 + s_lo ** 2) / n)
    assert abs(out.var().item() / (d ** 2 + s_lo ** 2) - 1) < 5 * math.sqrt(2 / n) + 5e-3


@pytest.mark.parametrize("case", SCHEDULES)
def test_net_calls_and_the_levels_it_visits(case):
    # Heun: 2 calls a step, 1 on the last (to s = 0) and on a first step from pure noise; each restart 2N more.
    name, options, spacing = SCHEDULES[case]
    schedule = make_schedule(name, **options)
    steps, restart = 10, Restart(0.1, 2.0, 3, 4)
    ts = schedule.timesteps(steps, spacing=spacing)
    model, calls = counting(default_mixture().model(schedule))
    draw(schedule, ts, 16, 2, 0, model, restart=restart)
    from_noise = float(schedule.alpha_sigma(ts[0])[0]) == 0
    assert len(calls) == 2 * steps - 1 - from_noise + 2 * restart.k * restart.n
    # after the main solve reaches the grid level nearest 0.1, the next call is at s_max = 2, then down Karras' grid
    level = [float(s / a) if a > 0 else math.inf for a, s in (schedule.alpha_sigma(torch.tensor(t)) for t in calls)]
    up = [i for i in range(1, len(level)) if level[i] > level[i - 1] * 1.5]
    assert len(up) == restart.k and all(abs(level[i] / 2.0 - 1) < 1e-3 for i in up)
    first = up[0]
    s_lo = level[first - 1]                       # Heun's second call of the step that ends at s_lo is at s_lo
    expected = restart_levels(s_lo, level[first], restart.n)   # each step: its start, then its end (Heun)
    got = level[first:first + 2 * restart.n]
    want = [s for a, b in zip(expected[:-1], expected[1:]) for s in (a, b)]
    assert all(abs(g / w - 1) < 1e-3 for g, w in zip(got, want)), (got, want)


def test_karras_restart_grid_is_eq5():
    s = restart_levels(0.1, 2.0, 4)
    ramp = [j / 4 for j in range(5)]
    want = [(2.0 ** (1 / 7) + r * (0.1 ** (1 / 7) - 2.0 ** (1 / 7))) ** 7 for r in ramp]
    assert s[0] == 2.0 and s[-1] == 0.1 and all(abs(a - b) < 1e-12 for a, b in zip(s, want))


def test_seeded_generator_reproduces_and_another_seed_differs():
    mixture, schedule = default_mixture(), make_schedule("cosine")
    ts = schedule.timesteps(20, spacing="karras")
    a, b, c = (draw(schedule, ts, 32, 2, seed, mixture.model(schedule)) for seed in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the same starting noise, another generator for the restart noise: a different sample
    x = initial_noise(schedule, ts, (32, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d, e = (SAMPLERS["restart"](mixture.model(schedule), x, ts, schedule, disable=True,
                                generator=torch.Generator().manual_seed(g)) for g in (5, 6))
    assert not torch.equal(d, e)


def test_default_is_a1111s_rule():
    assert default_restart(19) is None
    assert default_restart(20) == Restart(0.1, 2.0, 1, 9) and default_restart(35) == Restart(0.1, 2.0, 1, 9)
    assert default_restart(36) == Restart(0.1, 2.0, 2, 9) and default_restart(50) == Restart(0.1, 2.0, 2, 12)


def test_parse_restart():
    assert parse_restart("0.1:2:2:10") == Restart(0.1, 2.0, 2, 10)
    assert parse_restart("0.5:3:0:1") == Restart(0.5, 3.0, 0, 1)
    for bad in ["0.1:2:2", "2:0.1:2:10", "0:2:2:10", "0.1:2:-1:10", "0.1:2:2:0", "0.1:2:1.5:10", "a:2:2:10",
                "0.1:inf:2:10"]:
        with pytest.raises(ValueError, match="S_MIN:S_MAX:K:N"):
            parse_restart(bad)


def test_s_max_below_the_restart_level_is_refused():
    mixture, schedule = default_mixture(), make_schedule("cosine")
    ts = schedule.timesteps(10, spacing="karras")
    alpha, sigma = schedule.alpha_sigma(ts[5])
    level = float(sigma / alpha)                 # the restart leaves from this grid level, above s_max
    with pytest.raises(ValueError, match="must lie above"):
        draw(schedule, ts, 4, 2, 0, mixture.model(schedule), restart=Restart(0.999 * level, 0.9995 * level, 1, 2))
