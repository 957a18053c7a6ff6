"""Parameterization conversions, the Denoiser wrapper and loss weightings against closed forms."""
import math
import pytest
import torch

from ldm.diffusion import param
from ldm.diffusion.losses import DiffusionLoss, loss_weight, sample_times, time_of_logsnr
from ldm.diffusion.schedules import make_schedule


def _batch(seed=0, vp=True):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    alpha = torch.rand(6, 1, 1, 1, generator=g, dtype=torch.float64) * 0.9 + 0.05
    sigma = (1 - alpha ** 2).sqrt() if vp else torch.rand(6, 1, 1, 1, generator=g, dtype=torch.float64) * 3 + 0.1
    return x0, eps, alpha, sigma


@pytest.mark.parametrize("vp", [True, False], ids=["vp", "general"])
@pytest.mark.parametrize("prediction", param.PREDICTIONS)
def test_conversions_round_trip(prediction, vp):
    x0, eps, alpha, sigma = _batch(vp=vp)
    x = param.q_sample(x0, eps, alpha, sigma)
    target = param.training_target(prediction, x0, eps, alpha, sigma)
    torch.testing.assert_close(param.to_x0(prediction, target, x, alpha, sigma), x0)
    torch.testing.assert_close(param.from_x0(prediction, x0, x, alpha, sigma), target)


def test_v_definition_and_score():
    x0, eps, alpha, sigma = _batch()
    x = alpha * x0 + sigma * eps
    torch.testing.assert_close(param.x0_to_v(x, x0, alpha, sigma), alpha * eps - sigma * x0)
    # For x0 ~ N(0, I): x_t ~ N(0, (alpha^2 + sigma^2) I), E[x0|x_t] = alpha x_t / (alpha^2 + sigma^2).
    var = alpha ** 2 + sigma ** 2
    xr = x.clone().requires_grad_(True)
    (-(xr ** 2) / (2 * var)).sum().backward()
    torch.testing.assert_close(param.score_from_x0(x, alpha * x / var, alpha, sigma), xr.grad)


@pytest.mark.parametrize("prediction", param.PREDICTIONS)
def test_denoiser_recovers_x0_from_an_oracle_net(prediction):
    sched = make_schedule("scaled_linear")
    x0, eps, _, _ = _batch()
    t = torch.tensor([0, 10, 250, 500, 750, 999])
    alpha, sigma = (param.append_dims(c, 4) for c in sched.alpha_sigma(t))
    x = param.q_sample(x0, eps, alpha, sigma)
    oracle = lambda x_in, t_in: param.training_target(prediction, x0, eps, alpha, sigma)  # noqa: E731
    torch.testing.assert_close(param.Denoiser(oracle, sched, prediction)(x, t), x0)


def test_loss_weights_equal_their_formulas():
    alpha = torch.linspace(0.02, 0.99, 50, dtype=torch.float64)
    sigma = (1 - alpha ** 2).sqrt()
    snr = alpha ** 2 / sigma ** 2
    one = torch.ones_like(snr)
    expected = {  # Hang et al. 2023 (min-SNR) and Salimans & Ho 2022 (truncated SNR) per space
        ("min_snr", "eps"): snr.clamp(max=5) / snr,
        ("min_snr", "x0"): snr.clamp(max=5),
        ("min_snr", "v"): snr.clamp(max=5) / (snr + 1),
        ("truncated_snr", "eps"): torch.maximum(snr, one) / snr,
        ("truncated_snr", "x0"): torch.maximum(snr, one),
        ("truncated_snr", "v"): torch.maximum(snr, one) / (snr + 1),
        ("uniform", "eps"): one, ("uniform", "x0"): one, ("uniform", "v"): one,
    }
    for (weighting, prediction), ref in expected.items():
        torch.testing.assert_close(loss_weight(weighting, prediction, alpha, sigma, gamma=5.0), ref)


def test_v_error_is_snr_plus_one_times_x0_error():
    x0, eps, alpha, sigma = _batch()
    x = alpha * x0 + sigma * eps
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    dv = param.x0_to_v(x, x0_hat, alpha, sigma) - param.x0_to_v(x, x0, alpha, sigma)
    deps = param.x0_to_eps(x, x0_hat, alpha, sigma) - param.x0_to_eps(x, x0, alpha, sigma)
    snr = alpha ** 2 / sigma ** 2
    torch.testing.assert_close(dv.pow(2).flatten(1).sum(1), ((1 + snr) * (x0_hat - x0) ** 2).flatten(1).sum(1))
    torch.testing.assert_close(deps.pow(2).flatten(1).sum(1), (snr * (x0_hat - x0) ** 2).flatten(1).sum(1))


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
def test_diffusion_loss_with_zero_data(prediction, weighting):
    # With x0 = 0, x_t = sigma * eps, so the target is recoverable from what the net sees.
    sched = make_schedule("linear")
    seen = {}

    def net(x_t, t):
        seen.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t)

    loss = DiffusionLoss(sched, prediction, weighting, gamma=5.0)(net, torch.zeros(8, 2, 3, 3),
                                                                  generator=torch.Generator().manual_seed(0))
    alpha, sigma = sched.alpha_sigma(seen["t"])
    eps = seen["x_t"].double() / param.append_dims(sigma, 4)
    target = eps if prediction == "eps" else param.append_dims(alpha, 4) * eps
    snr = alpha ** 2 / sigma ** 2
    w = torch.ones_like(snr) if weighting == "uniform" else snr.clamp(max=5) / (snr if prediction == "eps" else snr + 1)
    expected = (w * target.pow(2).flatten(1).mean(1)).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_sample_times_ranges():
    g = torch.Generator().manual_seed(0)
    t = sample_times(make_schedule("cosine", T=100), 1000, time="discrete", generator=g)
    assert t.min() >= 0 and t.max() <= 99 and bool((t == t.round()).all()) and len(t.unique()) > 90
    u = sample_times(make_schedule("cosine_logsnr"), 1000, time="continuous", generator=g)
    assert u.min() >= 0 and u.max() <= 1 and 0.45 < u.mean() < 0.55
    with pytest.raises(ValueError, match="discrete schedule"):
        sample_times(make_schedule("cosine_logsnr"), 4, time="discrete")


def test_time_shift_moves_log_snr_by_minus_two_log_s():
    # cosine log-SNR has the closed-form inverse t = (2/pi) atan(exp(-lambda / 2)), so the shifted
    # time of u is (2/pi) atan(s tan(pi u / 2)); the code finds it by bisection
    sched, s = make_schedule("cosine_logsnr"), 8.0
    u = sample_times(sched, 4096, time="continuous", generator=torch.Generator().manual_seed(3))
    t = sample_times(sched, 4096, time="continuous", shift=s, generator=torch.Generator().manual_seed(3))
    expect = (2 / math.pi) * torch.atan(s * torch.tan(math.pi / 2 * u.double()))
    torch.testing.assert_close(t.double(), expect, atol=1e-6, rtol=0)
    inside = (u > 0.01) & (u < 0.99)  # away from the +-20 clip
    torch.testing.assert_close(sched.logsnr(t)[inside], sched.logsnr(u)[inside] - 2 * math.log(s), atol=1e-4, rtol=0)
    assert (t >= u).all() and (t > 0.9).float().mean() > 0.4  # 6.4% of u is above 0.9


def test_time_shift_share_mixes_shifted_and_plain_times():
    # u is drawn first, so every mixed time is either u itself or u's shifted time; the shifted
    # count is Binomial(4096, 0.3): mean 1229, sd 29
    sched, s, n = make_schedule("cosine_logsnr"), 8.0, 4096
    draw = lambda **kw: sample_times(sched, n, time="continuous", generator=torch.Generator().manual_seed(5), **kw)  # noqa: E731
    u, full, mixed = draw(), draw(shift=s), draw(shift=s, shift_share=0.3)
    plain, shifted = torch.isclose(mixed, u, atol=1e-7, rtol=0), torch.isclose(mixed, full, atol=1e-7, rtol=0)
    assert bool((plain | shifted).all())
    moved = (shifted & ~plain).sum().item()
    assert 1229 - 5 * 29 < moved < 1229 + 5 * 29
    torch.testing.assert_close(draw(shift=s, shift_share=0.0), u, atol=0, rtol=0)
    with pytest.raises(ValueError, match="time_shift_share"):
        DiffusionLoss(sched, "v", time="continuous", time_shift=s, time_shift_share=1.5)


def test_time_shift_on_a_discrete_table_and_bad_values():
    sched = make_schedule("scaled_linear", T=1000)  # any decreasing log-SNR inverts, not only the closed form
    lam = torch.linspace(-5, 6.5, 17, dtype=torch.float64)  # inside its range, -5.4 to 7.1
    torch.testing.assert_close(sched.logsnr(time_of_logsnr(sched, lam)), lam, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="continuous"):
        sample_times(sched, 4, time="discrete", shift=2.0)
    with pytest.raises(ValueError, match="time_shift"):
        DiffusionLoss(make_schedule("cosine_logsnr"), "v", time="continuous", time_shift=0.0)


def test_offset_noise_and_input_perturbation():
    """Closed forms: offset noise adds a per-(sample, channel) constant of std `offset` to eps; input
    perturbation noises x_t with eps + gamma xi while the target stays eps, so a net that returns the
    noise of its input scores gamma^2 on average; neither changes the default draw."""
    from ldm.diffusion.losses import DiffusionLoss
    from ldm.diffusion.schedules import make_schedule
    sched = make_schedule("scaled_linear")
    x0 = torch.zeros(512, 4, 8, 8)
    plain = DiffusionLoss(sched, "eps", time="discrete")
    eps, noisy = plain.noise(x0, torch.Generator().manual_seed(0))
    assert noisy is eps and torch.equal(eps, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
    eps, _ = DiffusionLoss(sched, "eps", time="discrete", noise_offset=0.5).noise(x0, torch.Generator().manual_seed(0))
    means = eps.mean(dim=(2, 3))
    assert abs(float(means.var()) - (0.25 + 1 / 64)) < 0.03 and abs(float(eps.var()) - 1.25) < 0.03
    perturbed = DiffusionLoss(sched, "eps", time="discrete", input_perturbation=0.1)
    eps, noisy = perturbed.noise(x0, torch.Generator().manual_seed(0))
    assert abs(float((noisy - eps).std()) - 0.1) < 0.003 and abs(float(torch.corrcoef(
        torch.stack([(noisy - eps).flatten(), eps.flatten()]))[0, 1])) < 0.01

    def returns_its_noise(x, t):                  # x0 = 0: x_t = sigma_t * (input noise)
        sigma = sched.alpha_sigma(t)[1].float()
        return x / sigma.view(-1, 1, 1, 1)

    loss = perturbed(returns_its_noise, x0, generator=torch.Generator().manual_seed(1))
    assert abs(float(loss) - 0.01) < 5e-4
    assert float(plain(returns_its_noise, x0, generator=torch.Generator().manual_seed(1))) < 1e-10
    with pytest.raises(ValueError, match="must be >= 0"):
        DiffusionLoss(sched, "eps", noise_offset=-0.1)
