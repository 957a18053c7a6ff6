"""Distillation math: targets against closed form, and the stochastic sampler on an exact GMM denoiser."""
import math

import pytest
import torch

from ldm.diffusion.gmm import default_mixture
from ldm.diffusion.samplers import initial_noise, sample_ddim
from ldm.diffusion.schedules import make_schedule
from ldm.diffusion.samplers import sample_stochastic
from ldm.diffusion.param import ddim_step
from ldm.diffusion.losses import shift_times
from ldm.distill.targets import (grid_rows, stage_one_target, stage_two_target, student_grid, teacher_states,
                                 truncated_snr_weight, two_step_target, x_space_loss)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_stochastic_sampler_recovers_mixture_weights():
    mixture, schedule = default_mixture(), make_schedule("cosine_logsnr")
    ts = schedule.timesteps(64)
    gen = torch.Generator().manual_seed(0)
    x = initial_noise(schedule, ts, (4000, 2), generator=gen, dtype=torch.float64)
    x = sample_stochastic(mixture.model(schedule), x, ts, schedule, disable=True, generator=gen)
    weight_err, mean_err = mixture.errors(x)
    assert weight_err < 0.05 and mean_err < 0.1, (weight_err, mean_err)


def test_stochastic_sampler_step_by_hand():
    # Three steps with a linear x0-model, against Meng sec. 4.3 written out by hand.
    schedule = make_schedule("cosine_logsnr")
    ts = schedule.timesteps(3)                                   # 1, 2/3, 1/3, clean
    (a0, s0), (a1, s1), (a2, s2) = [tuple(float(c) for c in schedule.alpha_sigma(t)) for t in ts[:3]]
    model = lambda x, t: 0.5 * x                                 # noqa: E731
    z = torch.tensor([[1.1, 0.4]], dtype=torch.float64)
    out = sample_stochastic(model, z, ts, schedule, disable=True, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    n0, n1 = (torch.randn(1, 2, generator=g, dtype=torch.float64) for _ in range(2))
    d = 0.5 * z                                                  # step 0 at t = 1:
    z = a2 * d + s2 * (z - a0 * d) / s0                          #   DDIM two steps down, to 1/3
    z = (a1 / a2) * z + math.sqrt(s1 ** 2 - (a1 / a2) ** 2 * s2 ** 2) * n0   # q(z_2/3 | z_1/3)
    d = 0.5 * z                                                  # step 1 at t = 2/3: DDIM to clean is d,
    z = a2 * d + s2 * n1                                         #   then q(z_1/3 | clean)
    expected = 0.5 * z                                           # step 2 at t = 1/3: deterministic to clean
    torch.testing.assert_close(out, expected)


def test_one_student_step_lands_on_the_teachers_two_steps():
    # Salimans & Ho Alg. 2: DDIM t -> t'' with x_tilde must reproduce the teacher's z_t'' exactly.
    schedule = make_schedule("cosine_logsnr")
    grid = student_grid(schedule, 8)                             # (4, 3)
    g = torch.Generator().manual_seed(0)
    for t, tm, te in grid.tolist():
        (a, s), (am, sm), (ae, se) = [tuple(float(c) for c in schedule.alpha_sigma(torch.tensor(x)))
                                      for x in (t, tm, te)]
        z = torch.randn(2, 3, generator=g, dtype=torch.float64)
        x1, x2 = torch.randn(2, 2, 3, generator=g, dtype=torch.float64)   # two arbitrary teacher x0s
        z_mid = ddim_step(z, x1, a, s, am, sm)
        z_end = ddim_step(z_mid, x2, am, sm, ae, se)
        x_tilde = two_step_target(z, z_end, a, s, ae, se)
        torch.testing.assert_close(ddim_step(z, x_tilde, a, s, ae, se), z_end, rtol=1e-9, atol=1e-9)
        if te < 0:                                               # t'' = clean: the target is z_t''
            torch.testing.assert_close(x_tilde, z_end)


def test_student_grid_is_the_sampling_grid():
    schedule = make_schedule("cosine_logsnr")
    grid = student_grid(schedule, 8)
    expected = [[1.0, 7 / 8, 6 / 8], [6 / 8, 5 / 8, 4 / 8], [4 / 8, 3 / 8, 2 / 8], [2 / 8, 1 / 8, -1.0]]
    torch.testing.assert_close(grid, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(grid[:, 0], schedule.timesteps(4)[:-1])   # student steps on its own grid
    with pytest.raises(ValueError, match="even"):
        student_grid(schedule, 3)


def test_grid_rows_cover_their_steps():
    grid = student_grid(make_schedule("cosine_logsnr"), 8)                  # rows start at 1, 3/4, 1/2, 1/4
    t = torch.tensor([1.0, 0.9, 0.75, 0.7, 0.5, 0.26, 0.25, 0.1, 0.0, 1.5, -0.5], dtype=torch.float64)
    assert grid_rows(grid, t).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3, 0, 3]


def test_shifted_rows_follow_the_shifted_time_mass():
    # cosine log-SNR: lambda(t) = -2 log tan(pi t / 2), so lambda - 2 log s is tan(pi t' / 2) =
    # s tan(pi t / 2), and a shifted time falls below x with probability (2/pi) atan(tan(pi x / 2) / s).
    # With a share p shifted: F(x) = p (2/pi) atan(tan(pi x / 2) / s) + (1 - p) x; a row gets F(t) - F(t'').
    schedule, s, p = make_schedule("cosine_logsnr"), 8.0, 0.5
    grid = student_grid(schedule, 8)
    torch.manual_seed(0)
    u = torch.rand(400_000, dtype=torch.float64)
    counts = torch.bincount(grid_rows(grid, shift_times(schedule, u, s, p)), minlength=len(grid))

    def cdf(x):
        x = min(max(x, 0.0), 1.0)
        return p * 2 / math.pi * math.atan(math.tan(math.pi * x / 2) / s) + (1 - p) * x
    expected = torch.tensor([cdf(a) - cdf(c) for a, _, c in grid.tolist()], dtype=torch.float64)
    torch.testing.assert_close(counts.double() / counts.sum(), expected, atol=4e-3, rtol=0)
    assert expected[0] > 0.45                                                # the layout step: ~half the samples
    uniform = (4 - (u * 4).ceil().long()).clamp(0, 3)                         # no shift: t's quarter
    assert torch.equal(grid_rows(grid, shift_times(schedule, u, 1.0)), uniform)


class LinearTeacher:
    """A toy analytic x0-model: x0_hat = a(t) * z + b * context_mean, so every target has a closed form."""

    def __call__(self, z, t, context, context_mask=None):
        a = (0.5 + t).reshape(-1, 1)
        return a * z + 0.25 * context.mean(dim=(1, 2)).reshape(-1, 1)


def test_stage_one_target_by_hand():
    teacher = LinearTeacher()
    z, t = torch.randn(3, 4), torch.tensor([0.2, 0.5, 0.9])
    cond = {"context": torch.randn(3, 5, 2), "context_mask": torch.ones(3, 5, dtype=torch.bool)}
    uncond = {"context": torch.randn(1, 5, 2), "context_mask": torch.ones(1, 5, dtype=torch.bool)}
    w = torch.tensor([0.0, 1.0, 3.0])
    target = stage_one_target(teacher, z, t, w, cond, uncond)
    a = (0.5 + t)[:, None]
    mc, mu = 0.25 * cond["context"].mean((1, 2))[:, None], 0.25 * uncond["context"].mean()
    expected = (1 + w[:, None]) * (a * z + mc) - w[:, None] * (a * z + mu)   # = a z + mc + w (mc - mu)
    torch.testing.assert_close(target, expected)


def test_stage_two_target_by_hand():
    teacher = LinearTeacher()
    schedule = make_schedule("cosine_logsnr")
    grid = student_grid(schedule, 4)                             # t = 1 and t = 1/2 rows
    t, tm, te = grid[:, 0], grid[:, 1], grid[:, 2]
    z = torch.randn(2, 4, dtype=torch.float64)
    ctx = {"context": torch.randn(2, 5, 2, dtype=torch.float64)}
    target = stage_two_target(teacher, z, t, tm, te, schedule, ctx)
    for i in range(2):
        (a, s), (am, sm), (ae, se) = [[float(c) for c in schedule.alpha_sigma(x[i])] for x in (t, tm, te)]
        b = 0.25 * float(ctx["context"][i].mean())
        x1 = (0.5 + float(t[i])) * z[i] + b
        z_mid = am * x1 + sm * (z[i] - a * x1) / s
        x2 = (0.5 + float(tm[i])) * z_mid + b
        z_end = ae * x2 + se * (z_mid - am * x2) / sm
        expected = (z_end - se / s * z[i]) / (ae - se / s * a)
        torch.testing.assert_close(target[i], expected)
    assert float(te[1]) < 0                                      # the last row ends clean: target = z_t''


def test_truncated_snr_loss_matches_v_space_mse_scale():
    # ||v_hat - v||^2 = (1 + SNR) ||x_hat - x||^2 for VP; max(SNR, 1) is within a factor 2 of it.
    alpha = torch.tensor([0.1, 0.6, 0.99], dtype=torch.float64)
    sigma = (1 - alpha ** 2).sqrt()
    x, x_hat, eps = (torch.randn(3, 8, dtype=torch.float64) for _ in range(3))
    z = alpha[:, None] * x + sigma[:, None] * eps
    v = alpha[:, None] * eps - sigma[:, None] * x
    v_hat = (alpha[:, None] * z - x_hat) / sigma[:, None]        # the v implied by x_hat at z
    v_mse = (v_hat - v).pow(2).mean(1)
    loss = x_space_loss(x_hat, x, alpha, sigma).double()
    snr = alpha ** 2 / sigma ** 2
    torch.testing.assert_close(v_mse, (1 + snr) * (x_hat - x).pow(2).mean(1))
    torch.testing.assert_close(loss, torch.maximum(snr, torch.ones_like(snr)) * (x_hat - x).pow(2).mean(1))
    assert bool(((loss <= v_mse + 1e-12) & (2 * loss >= v_mse - 1e-12)).all())
    torch.testing.assert_close(truncated_snr_weight(alpha, sigma), snr.clamp(min=1))


def test_snr_cap_bounds_the_weight_from_above():
    # alpha = 0.1, 0.6, 0.99: SNR ~ 0.0101, 0.5625, 49.25; cap 4 leaves the first two at 1.
    alpha = torch.tensor([0.1, 0.6, 0.99], dtype=torch.float64)
    sigma = (1 - alpha ** 2).sqrt()
    x, x_hat = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    mse = (x_hat - x).pow(2).mean(1)
    torch.testing.assert_close(truncated_snr_weight(alpha, sigma, 4.0),
                               torch.tensor([1.0, 1.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(x_space_loss(x_hat, x, alpha, sigma, snr_cap=1.0).double(), mse)   # plain x MSE
    torch.testing.assert_close(x_space_loss(x_hat, x, alpha, sigma, snr_cap=1e6).double(),
                               x_space_loss(x_hat, x, alpha, sigma).double())


def test_ddim_deterministic_student_sampler_uses_w():
    # The core DDIM sampler drives a w-taking model through extra_args unchanged.
    schedule = make_schedule("cosine_logsnr")
    seen = []
    model = lambda x, t, w: (seen.append(w), torch.zeros_like(x))[1]   # noqa: E731
    sample_ddim(model, torch.randn(2, 3), schedule.timesteps(2), schedule, extra_args={"w": 1.5}, disable=True)
    assert seen == [1.5, 1.5]


def test_teacher_states_are_the_ddim_samplers_states():
    # Row i of an 8-step teacher's grid starts at ts[2 i]: the sampler run on ts[:2 i + 1] lands there.
    teacher, schedule = LinearTeacher(), make_schedule("cosine_logsnr")
    ts = schedule.timesteps(8)
    noise = torch.randn(5, 4, dtype=torch.float64)
    rows = torch.tensor([0, 1, 2, 3, 1])
    context = torch.randn(5, 3, 2, dtype=torch.float64)
    states = teacher_states(teacher, noise, rows, schedule, 8, {"context": context})
    torch.testing.assert_close(states[0], noise[0])                          # row 0: the noise itself
    for i in range(1, 5):
        expected = sample_ddim(teacher, noise[i:i + 1], ts[:2 * int(rows[i]) + 1], schedule,
                               extra_args={"context": context[i:i + 1]}, disable=True)
        torch.testing.assert_close(states[i:i + 1], expected)
