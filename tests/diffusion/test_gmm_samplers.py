"""Every sampler recovers a 2-D Gaussian mixture when driven by its exact denoiser."""
import pytest
import torch

from ldm.diffusion.gmm import default_mixture
from ldm.diffusion.samplers import SAMPLERS, initial_noise
from ldm.diffusion.schedules import make_schedule

N = 4000
CASES = {  # id: (sampler, schedule, schedule options, steps, spacing, sampler options)
    "ddim_eta0_50": ("ddim", "cosine", {}, 50, "trailing", {}),
    "ddpm_1000": ("ddpm", "cosine", {}, 1000, "trailing", {}),
    "heun_18_ve": ("heun", "ve", {"sigma_min": 0.002, "sigma_max": 80.0}, 18, "linspace", {}),
    "heun_18_cosine_logsnr": ("heun", "cosine_logsnr", {}, 18, "leading", {}),
    "dpmpp_2m_20": ("dpmpp_2m", "cosine", {}, 20, "trailing", {}),
    "dpmpp_2m_20_cosine_logsnr": ("dpmpp_2m", "cosine_logsnr", {}, 20, "trailing", {}),
    "pc_50": ("pc", "cosine", {}, 50, "trailing", {"snr": 0.16}),
    "langevin_ve": ("langevin", "ve", {"sigma_min": 0.01, "sigma_max": 5.0}, 30, "linspace",
                    {"n_steps": 20, "step_lr": 1e-5}),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # (4000, 2) tensors: threads only contend


@pytest.mark.parametrize("case", CASES)
def test_sampler_recovers_mixture(case):
    sampler, name, options, steps, spacing, kwargs = CASES[case]
    mixture, schedule = default_mixture(), make_schedule(name, **options)
    ts = schedule.timesteps(steps, spacing=spacing)
    gen = torch.Generator().manual_seed(0)
    x = initial_noise(schedule, ts, (N, 2), generator=gen, dtype=torch.float64)
    x = SAMPLERS[sampler](mixture.model(schedule), x, ts, schedule, disable=True, generator=gen, **kwargs)
    weight_err, mean_err = mixture.errors(x)
    assert weight_err < 0.03 and mean_err < 0.1, (weight_err, mean_err)


def test_exact_denoiser_is_tweedie_of_the_mixture_density():
    # E[x0|x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha, with log p_t by autograd of the mixture.
    m = default_mixture()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    for alpha, sigma in [(0.9, 0.3), (0.5, 0.8), (1.0, 2.0)]:
        xr = x.clone().requires_grad_(True)
        var = alpha ** 2 * m.stds ** 2 + sigma ** 2                               # (K,)
        d2 = (xr[:, None] - alpha * m.means).pow(2).sum(-1)                        # (B, K)
        log_p = torch.logsumexp(torch.log(m.weights) - d2 / (2 * var) - torch.log(2 * torch.pi * var), dim=1)
        score, = torch.autograd.grad(log_p.sum(), xr)
        torch.testing.assert_close(m.denoise(x, alpha, sigma), (x + sigma ** 2 * score) / alpha)


def test_ode_solvers_converge_to_the_probability_flow_solution():
    # Reference: Euler with 3000 steps. Second-order solvers (Heun, DPM-Solver++(2M)) must beat
    # Euler clearly at equal steps, and Heun's error must shrink faster than first order.
    mixture, schedule = default_mixture(), make_schedule("ve", sigma_min=0.002, sigma_max=80.0)
    x = initial_noise(schedule, schedule.timesteps(1), (500, 2), generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64)
    model = mixture.model(schedule)

    def mean_error(name, n):
        out = SAMPLERS[name](model, x, schedule.timesteps(n, spacing="linspace"), schedule, disable=True)
        return (out - ref).norm(dim=1).mean().item()

    ref = SAMPLERS["euler"](model, x, schedule.timesteps(3000, spacing="linspace"), schedule, disable=True)
    euler = mean_error("euler", 36)
    assert mean_error("heun", 36) < euler / 4 and mean_error("dpmpp_2m", 36) < euler / 4
    assert mean_error("heun", 36) < mean_error("heun", 18) / 3


def test_demo_writes_a_plot_and_reports_errors(tmp_path, capsys):
    from ldm.demo_gmm import main
    main(["--out", str(tmp_path / "gmm.png"), "--n", "400"])
    assert (tmp_path / "gmm.png").stat().st_size > 10_000
    report = capsys.readouterr().out
    assert "DPM-Solver++(2M) 20" in report and "Langevin (VE)" in report
