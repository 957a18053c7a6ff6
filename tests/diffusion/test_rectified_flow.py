"""Rectified flow: the schedule, the flow-velocity parameterization, logit-normal times, and sampling,
against closed forms, diffusers' FlowMatchEulerDiscreteScheduler and an exactly known data density."""
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ldm.diffusion import param
from ldm.diffusion.gmm import default_mixture
from ldm.diffusion.losses import DiffusionLoss, loss_weight, sample_times
from ldm.diffusion.samplers import SAMPLERS, initial_noise
from ldm.diffusion.schedules import CLEAN, make_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedule_is_the_straight_path():
    rf = make_schedule("rectified_flow")
    t = torch.tensor([0.0, 0.1, 0.5, 0.93, 1.0], dtype=torch.float64)
    alpha, sigma = rf.alpha_sigma(t)
    torch.testing.assert_close(alpha, 1 - t)
    torch.testing.assert_close(sigma, t)
    assert rf.alpha_sigma(CLEAN) == (1.0, 0.0) and rf.zero_terminal_snr
    lam = rf.logsnr(t)
    assert lam[0] == math.inf and lam[-1] == -math.inf
    torch.testing.assert_close(lam[1:-1], 2 * torch.log((1 - t[1:-1]) / t[1:-1]))
    np.testing.assert_allclose(rf.t_from_logsnr(lam[1:-1].numpy()), t[1:-1].numpy(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="shift must be > 0"):
        make_schedule("rectified_flow", shift=0.0)


def test_flow_velocity_closed_forms():
    # u = eps - x0 = dx_t/dt on x_t = (1 - t) x0 + t eps, and x0 = x_t - t u on that path.
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    t = torch.rand(5, 1, generator=g, dtype=torch.float64)
    x_t = param.q_sample(x0, eps, 1 - t, t)
    u = param.training_target("flow", x0, eps, 1 - t, t)
    dt = 1e-6
    torch.testing.assert_close(u, (param.q_sample(x0, eps, 1 - t - dt, t + dt) - x_t) / dt, rtol=0, atol=1e-8)
    torch.testing.assert_close(param.to_x0("flow", u, x_t, 1 - t, t), x_t - t * u)
    # SD3's sampling step x_s = x_t + (s - t) u is DDIM's step on this path.
    s = t / 2
    torch.testing.assert_close(param.ddim_step(x_t, x_t - t * u, 1 - t, t, 1 - s, s), x_t + (s - t) * u)


def test_flow_error_is_x0_error_over_t_squared():
    g = torch.Generator().manual_seed(1)
    x0, eps, noise = torch.randn(3, 6, 8, generator=g, dtype=torch.float64)
    t = torch.rand(6, 1, generator=g, dtype=torch.float64) * 0.9 + 0.05
    alpha, sigma = 1 - t, t
    x = param.q_sample(x0, eps, alpha, sigma)
    x0_hat = x0 + 0.1 * noise
    du = param.from_x0("flow", x0_hat, x, alpha, sigma) - param.from_x0("flow", x0, x, alpha, sigma)
    torch.testing.assert_close(du.pow(2).sum(1), (x0_hat - x0).pow(2).sum(1) / t[:, 0] ** 2)
    # so min-SNR's x0 weight min(SNR, 5) is min(SNR, 5) t^2 in flow space
    a, s = alpha[:, 0], sigma[:, 0]
    torch.testing.assert_close(loss_weight("min_snr", "flow", a, s), (a ** 2 / s ** 2).clamp(max=5) * s ** 2)


def test_diffusion_loss_regresses_onto_eps_minus_x0():
    rf = make_schedule("rectified_flow")
    x0 = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4).repeat(4, 1, 1, 1)
    seen = {}

    def net(x_t, t):
        seen.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t)

    loss = DiffusionLoss(rf, "flow", time="logit_normal", time_scale=1000.0)(
        net, x0, generator=torch.Generator().manual_seed(0))
    t = (seen["t"] / 1000).double()
    tt = param.append_dims(t, 4)
    eps = (seen["x_t"].double() - (1 - tt) * x0) / tt                     # what x_t was made with
    expected = (eps - x0).pow(2).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_logit_normal_times_follow_their_distribution():
    # Esser et al. 2024, eq. 19: logit(t) ~ N(m, s^2); CDF Phi((logit t - m) / s). Kolmogorov-Smirnov at n = 20000.
    rf, n, m, s = make_schedule("rectified_flow"), 20_000, 0.5, 0.8
    t = sample_times(rf, n, time="logit_normal", logit_mean=m, logit_std=s,
                     generator=torch.Generator().manual_seed(0)).double().sort().values
    cdf = 0.5 * (1 + torch.erf((torch.log(t / (1 - t)) - m) / (s * math.sqrt(2))))
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert float((cdf - empirical).abs().max()) < 1.36 / math.sqrt(n)     # 5% critical value
    # time_shift on top: SD3's t' = a t / (1 + (a - 1) t) of the same draws (eq. 23)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    plain = sample_times(rf, 500, time="logit_normal", generator=gen()).double()
    shifted = sample_times(rf, 500, time="logit_normal", shift=3.0, generator=gen()).double()
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="logit_std"):
        DiffusionLoss(rf, "flow", time="logit_normal", logit_std=0.0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_sampling_equals_diffusers_flow_match_euler(sampler, shift):
    # Same toy velocity net, same start, same grid: our DDIM / Euler on the rectified-flow schedule
    # with a flow-predicting Denoiser against FlowMatchEulerDiscreteScheduler's step loop (SD3, Flux).
    n = 7
    rf = make_schedule("rectified_flow", shift=shift)
    ts = rf.timesteps(n)                                                  # trailing: 1 - i/n, shifted
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=list(1 - np.arange(n) / n))                # diffusers shifts them itself
    torch.testing.assert_close(sched.sigmas.double(), torch.cat([ts[:-1], ts.new_zeros(1)]), rtol=0, atol=1e-6)

    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 2

    def velocity(x, timestep):                                            # timestep = 1000 sigma
        return torch.tanh(x @ w) - x * (timestep / 1000).reshape(-1, 1, 1)

    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = SAMPLERS[sampler](param.Denoiser(velocity, rf, "flow", time_scale=1000.0), x, ts, rf, disable=True)
    theirs = x.clone()
    for timestep in sched.timesteps:
        theirs = sched.step(velocity(theirs, timestep.double().expand(2)), timestep, theirs).prev_sample
    torch.testing.assert_close(ours, theirs.double(), rtol=0, atol=1e-5)


CASES = {  # sampler, schedule options, steps, spacing
    "euler_50": ("euler", {}, 50, "trailing"),
    "ddim_50_shift3": ("ddim", {"shift": 3.0}, 50, "trailing"),
    "heun_18_karras": ("heun", {}, 18, "karras"),
    "dpmpp_2m_20": ("dpmpp_2m", {}, 20, "trailing"),
    "euler_a_50": ("euler_a", {}, 50, "trailing"),
}


@pytest.mark.parametrize("case", CASES)
def test_samplers_recover_a_mixture_on_the_straight_path(case):
    sampler, options, steps, spacing = CASES[case]
    mixture, rf = default_mixture(), make_schedule("rectified_flow", **options)
    ts = rf.timesteps(steps, spacing=spacing)
    gen = torch.Generator().manual_seed(0)
    x = initial_noise(rf, ts, (4000, 2), generator=gen, dtype=torch.float64)
    x = SAMPLERS[sampler](mixture.model(rf), x, ts, rf, disable=True, generator=gen)
    weight_err, mean_err = mixture.errors(x)
    assert weight_err < 0.03 and mean_err < 0.1, (weight_err, mean_err)


def test_flow_matching_learns_a_mixture():
    # A small MLP trained by DiffusionLoss(rectified_flow, flow, logit_normal), sampled by 32 Euler steps,
    # draws the mixture's three components in their proportions; the same net untrained does not.
    torch.manual_seed(0)
    mixture, rf = default_mixture(), make_schedule("rectified_flow")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(2 + 16, 128), torch.nn.SiLU(),
                                            torch.nn.Linear(128, 128), torch.nn.SiLU(), torch.nn.Linear(128, 2))

        def forward(self, x, t):
            freqs = torch.arange(8, dtype=x.dtype) + 1
            emb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1)
            return self.body(torch.cat([x, emb], 1))

    def errors(net):
        with torch.no_grad():
            ts = rf.timesteps(32)
            x = initial_noise(rf, ts, (4000, 2), generator=torch.Generator().manual_seed(1))
            return mixture.errors(SAMPLERS["euler"](param.Denoiser(net, rf, "flow"), x, ts, rf, disable=True))

    net = Net()
    untrained = errors(net)
    loss_fn = DiffusionLoss(rf, "flow", time="logit_normal")
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(2)
    for _ in range(1500):
        loss = loss_fn(net, mixture.sample(512, generator=gen).float(), generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    weight_err, mean_err = errors(net)
    assert weight_err < 0.05 and mean_err < 0.15, (weight_err, mean_err)
    assert untrained[0] > 0.1 or untrained[1] > 0.5, untrained


@pytest.mark.parametrize("tokens", [256, 1024, 4096, 6400])
def test_resolution_shift_is_fluxs_dynamic_shift(tokens):
    """FLUX.1's grid for an image of `tokens` patches: diffusers' calculate_shift (mu linear in the token count)
    and its exponential time shift on sigmas linspace(1, 1/n, n) = our trailing grid shifted by exp(mu)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from ldm.diffusion.schedules import resolution_shift, shifted
    n = 6
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    sched.set_timesteps(sigmas=list(np.linspace(1.0, 1 / n, n)), mu=calculate_shift(tokens))
    ours = shifted(make_schedule("rectified_flow"), resolution_shift(tokens)).timesteps(n)
    torch.testing.assert_close(sched.sigmas.double(), torch.cat([ours[:-1], ours.new_zeros(1)]), rtol=0, atol=1e-6)
    assert resolution_shift(256) == pytest.approx(math.exp(0.5)) and resolution_shift(4096) == pytest.approx(math.exp(1.15))
