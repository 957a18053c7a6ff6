"""Distribution matching (ldm/distill/dmd.py) against closed forms: Gaussian data has exact denoisers."""
import torch

from ldm.diffusion.samplers import sample_ddim
from ldm.diffusion.schedules import schedule_from_config
from ldm.distill.dmd import dmd_direction, dmd_loss, unrolled_ddim

SCHEDULE = schedule_from_config({"name": "cosine_logsnr"})


def gaussian_x0(mean: float, var: float):
    """Tweedie's E[x0 | x_t] for x0 ~ N(mean, var) per element: mean + a var (x_t - a mean) / (a^2 var + s^2)."""
    def x0(x_t, t):
        a, s = (c.view(-1, 1, 1, 1).to(x_t) for c in SCHEDULE.alpha_sigma(t))
        return mean + a * var * (x_t - a * mean) / (a ** 2 * var + s ** 2)
    return x0


def test_unrolled_ddim_is_ddim_and_carries_gradients():
    torch.manual_seed(0)
    p = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    model = lambda x, t, scale: torch.tanh(x * p * scale.view(-1, 1, 1, 1))   # noqa: E731
    z, scale = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    for steps in (1, 2, 4):
        ts = SCHEDULE.timesteps(steps)
        out = unrolled_ddim(model, z, ts, SCHEDULE, {"scale": scale})
        torch.testing.assert_close(out, sample_ddim(model, z, ts, SCHEDULE, extra_args={"scale": scale},
                                                    disable=True), rtol=1e-6, atol=1e-6)
        (grad,) = torch.autograd.grad(out.sum(), p)
        with torch.no_grad():                  # central difference in p
            eps, p0 = 1e-6, p.item()
            p.fill_(p0 + eps)
            hi = unrolled_ddim(model, z, ts, SCHEDULE, {"scale": scale}).sum()
            p.fill_(p0 - eps)
            lo = unrolled_ddim(model, z, ts, SCHEDULE, {"scale": scale}).sum()
            p.fill_(p0)
        assert abs(grad.item() - (hi - lo).item() / (2 * eps)) < 1e-5 * max(1.0, abs(grad.item()))


def test_direction_is_the_closed_form_score_gap_of_two_gaussians():
    torch.manual_seed(1)
    x, noise, t = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3), torch.tensor([0.1, 0.4, 0.7, 0.95])
    real, fake = gaussian_x0(1.0, 0.5), gaussian_x0(-0.5, 0.5)
    got = dmd_direction(real, fake, x, t, noise, SCHEDULE, {})
    a, s = (c.view(-1, 1, 1, 1).float() for c in SCHEDULE.alpha_sigma(t))
    x_t = a * x + s * noise
    norm = (x - real(x_t, t)).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    expected = (-0.5 - 1.0) * s ** 2 / (a ** 2 * 0.5 + s ** 2) / norm     # (m_f - m_r) s^2 / (a^2 v + s^2)
    torch.testing.assert_close(got, expected.expand_as(got), rtol=1e-5, atol=1e-6)
    assert torch.equal(dmd_direction(real, real, x, t, noise, SCHEDULE, {}), torch.zeros_like(x))


def test_a_descent_step_moves_a_gaussian_generator_towards_the_real_mean():
    # G(z) = theta + z; the fake denoiser is exact for G's distribution N(theta, 1); real is N(m, 1).
    torch.manual_seed(2)
    for theta0, m in ((2.0, -1.0), (-3.0, 0.5)):
        theta = torch.tensor(theta0, requires_grad=True)
        opt = torch.optim.SGD([theta], lr=0.5)
        for _ in range(60):
            x = theta + torch.randn(64, 1, 2, 2)
            t = 0.02 + 0.96 * torch.rand(64)
            direction = dmd_direction(gaussian_x0(m, 1.0), gaussian_x0(theta.item(), 1.0), x, t,
                                      torch.randn_like(x), SCHEDULE, {})
            opt.zero_grad()
            dmd_loss(x, direction).backward()
            assert torch.isclose(theta.grad, direction.mean(), rtol=1e-4)   # d loss / d x = direction / numel
            opt.step()
        assert abs(theta.item() - m) < 0.2 * abs(theta0 - m), (theta0, m, theta.item())
