"""Multi-resolution noise (losses.multires_noise) against plain draws, a hand-built bilinear covariance and the
targets of every prediction type."""
import math

import pytest
import torch

from ldm.diffusion import param
from ldm.diffusion.losses import DiffusionLoss, check_multires_noise, multires_noise, multires_sizes
from ldm.diffusion.schedules import make_schedule


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def bilinear_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) 1-D linear interpolation with half-pixel centres (align_corners=False), from its formula:
    output i samples the input at (i + 1/2) n_in / n_out - 1/2, clamped at 0, between its two neighbours."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[i, i0] += 1 - lam
        m[i, i1] += lam
    return m


def pyramid_covariance(h: int, w: int, iterations: int, discount: float) -> torch.Tensor:
    """(HW, HW) covariance of eps + sum_i discount^i U_i z_i before the std: I + sum_i discount^(2i) U_i U_i^T, levels
    at floor(side / 2^i) while both sides stay >= 1 (U_i the Kronecker product of the two 1-D maps)."""
    cov = torch.eye(h * w, dtype=torch.float64)
    for i in range(1, iterations + 1):
        hi, wi = h // 2 ** i, w // 2 ** i
        if min(hi, wi) < 1:
            break
        u = torch.kron(bilinear_matrix(h, hi), bilinear_matrix(w, wi))
        cov += discount ** (2 * i) * u @ u.T
    return cov


def test_zero_iterations_is_the_plain_gaussian_draw():
    sched = make_schedule("scaled_linear")
    x0 = torch.zeros(3, 4, 12, 10)
    eps, noisy = DiffusionLoss(sched, "eps", time="discrete").noise(x0, _gen(0))
    assert noisy is eps and torch.equal(eps, torch.randn(x0.shape, generator=_gen(0)))
    base = torch.randn(3, 4, 12, 10, generator=_gen(1))
    assert multires_noise(base, 0, 0.3, _gen(2)) is base


@pytest.mark.parametrize("shape", [(3, 4, 16, 16),     # powers of two: levels down to 1x1
                                   (2, 4, 12, 10),     # non-power-of-two sides, non-square
                                   (2, 3, 7, 5),       # odd sides
                                   (2, 2, 3, 4, 6)])   # a leading frame axis
def test_unit_std_per_sample_shape_and_seed(shape):
    eps = multires_noise(torch.randn(shape, generator=_gen(0)), 6, 0.3, _gen(1))
    assert eps.shape == shape
    torch.testing.assert_close(eps.flatten(1).std(1), torch.ones(shape[0]))
    again = multires_noise(torch.randn(shape, generator=_gen(0)), 6, 0.3, _gen(1))
    other = multires_noise(torch.randn(shape, generator=_gen(0)), 6, 0.3, _gen(2))
    assert torch.equal(eps, again) and not torch.allclose(eps, other)


def test_levels_stop_before_a_side_falls_below_one():
    assert multires_sizes(16, 16, 6) == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert multires_sizes(12, 10, 6) == [(6, 5), (3, 2), (1, 1)]
    assert multires_sizes(64, 64, 2) == [(32, 32), (16, 16)]
    assert multires_sizes(1, 64, 6) == []


@pytest.mark.parametrize("h, w", [(12, 10), (8, 8)])
def test_covariance_and_mean_variance_match_the_bilinear_closed_form(h, w):
    """Per-sample std division leaves the covariance ~ Sigma / (tr Sigma / HW) with many elements per sample; the
    spatial mean's variance is then 1^T Sigma 1 / (HW)^2 over the same scale, above white noise's 1 / (HW)."""
    n, c = 4000, 8
    variances = []
    for discount in (0.3, 0.6):
        eps = multires_noise(torch.randn(n, c, h, w, generator=_gen(0), dtype=torch.float64), 6, discount, _gen(1))
        cov = pyramid_covariance(h, w, 6, discount)
        expected = cov / (cov.trace() / (h * w))
        vectors = eps.reshape(n * c, h * w)
        torch.testing.assert_close(vectors.T @ vectors / (n * c), expected, atol=0.045, rtol=0)
        mean_var = float(eps.mean(dim=(-2, -1)).var())
        expected_mean_var = float(expected.sum()) / (h * w) ** 2
        assert mean_var == pytest.approx(expected_mean_var, rel=0.05)
        variances.append(mean_var)
    assert 1 / (h * w) < variances[0] < variances[1]


@pytest.mark.parametrize("prediction, schedule", [("eps", "cosine"), ("v", "cosine"), ("x0", "cosine"),
                                                  ("flow", "rectified_flow")])
def test_every_target_uses_the_noise_that_made_x_t(prediction, schedule):
    """A net that reads eps back from x_t (x0 known) and returns its exact target scores 0: x_t's noise and the
    target's are one draw, multires included; with input perturbation the eps net misses by the white gamma xi."""
    sched = make_schedule(schedule)
    time = "discrete" if schedule == "cosine" else "continuous"
    x0 = torch.randn(64, 4, 12, 10, generator=_gen(3))

    def oracle(x, t):
        a, s = (param.append_dims(v.float(), 4) for v in sched.alpha_sigma(t))
        return param.training_target(prediction, x0, (x - a * x0) / s, a, s)

    loss = DiffusionLoss(sched, prediction, time=time, multires_noise_iterations=6, multires_noise_discount=0.5)
    assert float(loss(oracle, x0, generator=_gen(4))) < 1e-8
    if prediction == "eps":
        perturbed = DiffusionLoss(sched, prediction, time=time, input_perturbation=0.1, multires_noise_iterations=6,
                                  multires_noise_discount=0.5)
        assert float(perturbed(oracle, x0, generator=_gen(4))) == pytest.approx(0.01, rel=0.05)


@pytest.mark.parametrize("iterations, discount, match", [(-1, 0.3, "multires_noise_iterations=-1"),
                                                         (2.5, 0.3, "multires_noise_iterations=2.5"),
                                                         (True, 0.3, "multires_noise_iterations=True"),
                                                         (4, 0.0, "multires_noise_discount=0.0"),
                                                         (4, 1.5, "multires_noise_discount=1.5"),
                                                         (0, 0.5, "multires_noise_discount set with")])
def test_bad_multires_options_are_named(iterations, discount, match):
    with pytest.raises(ValueError, match=match):
        check_multires_noise(iterations, discount)
    with pytest.raises(ValueError, match=match):
        DiffusionLoss(make_schedule("cosine"), "eps", time="discrete", multires_noise_iterations=iterations,
                      multires_noise_discount=discount)
