"""weighting="debiased" (Yu et al. 2024) against the eps-space MSE / sqrt(SNR) computed by hand for every prediction."""
import pytest
import torch

from ldm.diffusion.losses import DEBIASED_SNR_MAX, DiffusionLoss, loss_weight
from ldm.diffusion.schedules import make_schedule


def eps_from_output(prediction, out, x, alpha, sigma):
    """The eps a net output implies at x = alpha x0 + sigma eps, written out per space (VP for v, a = 1 - t for flow)."""
    if prediction == "eps":
        return out
    if prediction == "x0":
        return (x - alpha * out) / sigma
    if prediction == "v":          # v = alpha eps - sigma x0 and alpha^2 + sigma^2 = 1: eps = sigma x + alpha v
        return sigma * x + alpha * out
    if prediction == "flow":       # u = eps - x0, x = (1 - t) x0 + t eps: eps = x + (1 - t) u
        return x + alpha * out
    raise AssertionError(prediction)


CASES = [("eps", "cosine", [0, 1, 10, 250, 500, 900, 999]),   # t = 0, 1: SNR above kohya's 1000 cap
         ("v", "cosine", [0, 1, 10, 250, 500, 900, 999]),
         ("x0", "cosine", [0, 1, 10, 250, 500, 900, 999]),
         ("flow", "rectified_flow", [0.001, 0.02, 0.1, 0.5, 0.9, 0.999])]


@pytest.mark.parametrize("prediction, schedule, times", CASES)
def test_debiased_is_the_eps_mse_over_sqrt_snr(prediction, schedule, times):
    sched = make_schedule(schedule)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(times, dtype=torch.float64)
    n = len(times)
    x0, eps, out = (torch.randn(n, 4, 6, 5, generator=g) for _ in range(3))
    alpha, sigma = sched.alpha_sigma(t)
    a, s = (c.float().view(-1, 1, 1, 1) for c in (alpha, sigma))
    x = a * x0 + s * eps
    snr = (alpha ** 2 / sigma ** 2).float()
    expected = ((eps_from_output(prediction, out, x, a, s) - eps) ** 2).mean(dim=(1, 2, 3)) \
        / snr.clamp(max=DEBIASED_SNR_MAX).sqrt()
    got = DiffusionLoss(sched, prediction, weighting="debiased",
                        time="discrete" if schedule == "cosine" else "continuous").per_sample(out, x0, eps, t)
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=1e-7)
    if schedule == "cosine":
        assert snr[0] > DEBIASED_SNR_MAX    # the cap is exercised


def test_debiased_eps_weight_is_kohyas():
    """On an eps net the weight is kohya's apply_debiased_estimation: 1 / sqrt(min(SNR, 1000))."""
    alpha = torch.linspace(0.02, 0.9999, 200, dtype=torch.float64)
    sigma = (1 - alpha ** 2).sqrt()
    snr = alpha ** 2 / sigma ** 2
    torch.testing.assert_close(loss_weight("debiased", "eps", alpha, sigma),
                               1 / torch.minimum(snr, torch.full_like(snr, 1000.0)).sqrt())
    torch.testing.assert_close(loss_weight("debiased", "v", alpha, sigma),
                               snr / torch.minimum(snr, torch.full_like(snr, 1000.0)).sqrt() / (1 + snr))


@pytest.mark.parametrize("prediction", ["v", "flow"])
def test_debiased_is_zero_not_nan_at_zero_snr(prediction):
    """Zero terminal SNR (alpha = 0): the eps weight 1/sqrt(SNR) is infinite but the x0 error it weighs is
    SNR * ||eps error||^2 = 0 times it, and v/flow errors at alpha = 0 carry no x0 information: weight 0."""
    w = loss_weight("debiased", prediction, torch.tensor([0.0, 0.5]), torch.tensor([1.0, 0.5]))
    assert torch.isfinite(w).all() and float(w[0]) == 0.0
