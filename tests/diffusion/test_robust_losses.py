"""Robust training losses (losses.robust_loss, huber_c_at, DiffusionLoss(loss_type=...)) against closed forms, torch's
own l1 / smooth_l1 losses and diffusers' scheduled pseudo-Huber formulas (examples/research_projects/
scheduled_huber_loss_training/text_to_image/train_text_to_image_lora.py: `conditional_loss` and the huber_c schedules
in its training loop), transcribed below."""
import math

import pytest
import torch
import torch.nn.functional as F

from ldm.diffusion import param
from ldm.diffusion.losses import (HUBER_SCHEDULES, LOSS_TYPES, DiffusionLoss, check_robust_loss, huber_c_at,
                                  robust_loss)
from ldm.diffusion.schedules import make_schedule


def _residuals(dtype=torch.float64):
    """Residuals from 1e-6 to 1e3 in magnitude, both signs, and exact zeros: (4, 64)."""
    mag = torch.logspace(-6, 3, 32, dtype=dtype)
    d = torch.cat([mag, -mag]).repeat(4, 1)
    d[:, ::9] = 0.0
    return d


def _diffusers_conditional_loss(pred, target, loss_type, huber_c):
    """diffusers' `conditional_loss(..., reduction="none")`, as written there."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "huber":
        return 2 * huber_c * (torch.sqrt((pred - target) ** 2 + huber_c ** 2) - huber_c)
    if loss_type == "smooth_l1":
        return 2 * (torch.sqrt((pred - target) ** 2 + huber_c ** 2) - huber_c)
    raise NotImplementedError(loss_type)


def _sd_alphas_cumprod():
    """SD's DDPMScheduler(beta_schedule="scaled_linear", 0.00085, 0.012, 1000) alphas_cumprod, in float64."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _diffusers_huber_c(schedule, huber_c, timestep, alphas_cumprod, num_train_timesteps=1000):
    """The training loop's huber_c for one integer timestep, as written there."""
    if schedule == "exponential":
        alpha = -math.log(huber_c) / num_train_timesteps
        return math.exp(-alpha * timestep)
    if schedule == "snr":
        sigmas = ((1.0 - alphas_cumprod[timestep]) / alphas_cumprod[timestep]) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    if schedule == "constant":
        return huber_c
    raise NotImplementedError(schedule)


# ----------------------------------------------------------------------------- element-wise losses

@pytest.mark.parametrize("c", [0.01, 0.1, 1.0, 7.5])
@pytest.mark.parametrize("loss_type", ["l2", "huber", "smooth_l1"])
def test_losses_equal_diffusers_conditional_loss(loss_type, c):
    d = _residuals()
    pred, target = d + 0.25, torch.full_like(d, 0.25)
    ours = robust_loss(loss_type, pred - target, torch.tensor(c, dtype=torch.float64))
    ref = _diffusers_conditional_loss(pred, target, loss_type, c)
    # atol: the written-out sqrt(d^2 + c^2) - c of the reference itself cancels to ~c * 1e-16 in float64
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-15 * (1 + c) ** 2)


def test_l1_is_torch_l1_loss():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    assert torch.equal(robust_loss("l1", pred - target), F.l1_loss(pred, target, reduction="none"))


@pytest.mark.parametrize("c", [0.05, 0.1, 1.0])
def test_smooth_l1_against_torch_smooth_l1_loss(c):
    # 2 (sqrt(d^2 + c^2) - c) is the pseudo-Huber form of 2 x torch's smooth_l1_loss(beta=c) (Huber / beta): at most
    # c below it and never above (their gap grows from 0 at d = 0 to c as |d| -> inf), the same d^2 / c near 0 and
    # the same slope 2 far out.
    d = _residuals()
    ours = robust_loss("smooth_l1", d, torch.tensor(c, dtype=torch.float64))
    torch_ref = 2 * F.smooth_l1_loss(d, torch.zeros_like(d), beta=c, reduction="none")
    gap = torch_ref - ours
    assert (gap >= -1e-12).all() and (gap <= c + 1e-12).all()
    near = d.abs() < 1e-3 * c
    torch.testing.assert_close(ours[near], torch_ref[near], rtol=1e-5, atol=1e-18)
    far = d.abs() > 1e3 * c
    torch.testing.assert_close(gap[far], torch.full_like(gap[far], c), rtol=1e-3, atol=0.0)
    x = d.clone().requires_grad_(True)
    robust_loss("smooth_l1", x, torch.tensor(c, dtype=torch.float64)).sum().backward()
    y = d.clone().requires_grad_(True)
    (2 * F.smooth_l1_loss(y, torch.zeros_like(y), beta=c, reduction="sum")).backward()
    torch.testing.assert_close(x.grad[far], y.grad[far], rtol=1e-3, atol=0.0)    # both 2 sign(d)
    torch.testing.assert_close(x.grad[near], y.grad[near], rtol=1e-5, atol=1e-18)   # both 2 d / c


def test_smooth_l1_with_vanishing_c_is_twice_l1():
    d = _residuals()
    ours = robust_loss("smooth_l1", d, torch.tensor(1e-12, dtype=torch.float64))
    torch.testing.assert_close(ours, 2 * F.l1_loss(d, torch.zeros_like(d), reduction="none"), rtol=1e-6, atol=1e-11)


def test_huber_limits_are_l2_and_scaled_l1():
    # 2c (sqrt(d^2 + c^2) - c) = d^2 - d^4 / (4 c^2) + ...: l2 itself, constant 1, for c >> |d|; for c << |d| it is
    # 2c (|d| - c) + O(c^3 / |d|): l1 times 2c.
    d = _residuals()
    d = d[:, d[0].abs() <= 10.0]
    big = robust_loss("huber", d, torch.tensor(1e4, dtype=torch.float64))
    torch.testing.assert_close(big, F.mse_loss(d, torch.zeros_like(d), reduction="none"), rtol=1e-6, atol=1e-20)
    c = 1e-12                                               # c^2 / |d| <= 1e-18 here
    small = robust_loss("huber", d, torch.tensor(c, dtype=torch.float64)) / (2 * c)
    torch.testing.assert_close(small, d.abs() - c * (d != 0), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huber_is_accurate_in_float32_for_tiny_residuals(dtype):
    # The written-out difference sqrt(d^2 + c^2) - c is 0 in float32 once |d| < 3e-4 c; our quotient is not.
    d = torch.logspace(-8, 0, 50, dtype=torch.float64)
    ref = 2 * 0.1 * d ** 2 / ((d ** 2 + 0.01).sqrt() + 0.1)
    ours = robust_loss("huber", d.to(dtype), torch.tensor(0.1, dtype=dtype)).double()
    torch.testing.assert_close(ours, ref, rtol=2e-6 if dtype == torch.float32 else 1e-12, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_finite_at_zero_residual(loss_type, dtype):
    d = torch.zeros(2, 3, 4, 4, dtype=dtype, requires_grad=True)
    robust_loss(loss_type, d, torch.tensor(0.1, dtype=dtype)).mean().backward()
    assert torch.isfinite(d.grad).all() and (d.grad == 0).all()


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_gradients_equal_their_closed_forms(loss_type):
    # d/dd 2c (sqrt(d^2 + c^2) - c) = 2c d / sqrt(d^2 + c^2): at most 2c in size, where l2's 2d is unbounded.
    d = _residuals().requires_grad_(True)
    c = torch.tensor(0.1, dtype=torch.float64)
    robust_loss(loss_type, d, c).sum().backward()
    slope = 2 * d.detach() / (d.detach() ** 2 + c ** 2).sqrt()
    torch.testing.assert_close(d.grad, c * slope if loss_type == "huber" else slope, rtol=1e-10, atol=1e-15)
    assert (d.grad.abs() <= (2 * c if loss_type == "huber" else 2.0) + 1e-12).all()


# ----------------------------------------------------------------------------- c over time

@pytest.mark.parametrize("huber_c", [0.1, 0.3, 1.0])
@pytest.mark.parametrize("huber_schedule", HUBER_SCHEDULES)
def test_c_schedules_equal_diffusers_on_sd_1000_steps(huber_schedule, huber_c):
    sched = make_schedule("scaled_linear")                  # SD's: T 1000, betas 0.00085 .. 0.012 scaled linear
    t = torch.arange(1000, dtype=torch.float64)
    alpha, sigma = sched.alpha_sigma(t)
    ours = huber_c_at(huber_schedule, huber_c, sched, t, alpha, sigma)
    acp = _sd_alphas_cumprod()
    ref = torch.tensor([_diffusers_huber_c(huber_schedule, huber_c, k, acp) for k in range(1000)],
                       dtype=torch.float64)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_c_schedules_in_continuous_time():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    rf = make_schedule("rectified_flow")                    # alpha = 1 - t, sigma = t: s = t / (1 - t)
    a, s = rf.alpha_sigma(t)
    torch.testing.assert_close(huber_c_at("snr", 0.1, rf, t, a, s), 0.1 + 0.9 * (1 - t) ** 2)
    torch.testing.assert_close(huber_c_at("exponential", 0.1, rf, t, a, s), torch.exp(math.log(0.1) * t))
    cos = make_schedule("cosine_logsnr")                    # c = huber_c + (1 - huber_c) / (1 + exp(-logsnr / 2))^2
    a, s = cos.alpha_sigma(t)
    ref = 0.1 + 0.9 / (1 + torch.exp(-cos.logsnr(t) / 2)) ** 2
    torch.testing.assert_close(huber_c_at("snr", 0.1, cos, t, a, s), ref)
    c = huber_c_at("snr", 0.1, cos, t, a, s)
    assert (c.diff() <= 0).all() and c[0] > 0.99 and c[-1] < 0.1 + 1e-3       # from ~1 at clean data to huber_c
    zero = make_schedule("scaled_linear", zero_snr=True)   # alpha = 0 at T-1: c = huber_c exactly, no 0/0
    a, s = zero.alpha_sigma(torch.tensor([999.0], dtype=torch.float64))
    assert float(huber_c_at("snr", 0.1, zero, torch.tensor([999.0]), a, s)) == pytest.approx(0.1, abs=1e-15)


# ----------------------------------------------------------------------------- DiffusionLoss

def _setup(prediction, seed=0):
    sched = make_schedule("rectified_flow" if prediction == "flow" else "scaled_linear")
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    out = torch.randn(6, 4, 8, 8, generator=g) * 2.0
    out[0] = 0.0                                            # a residual far from zero, wherever the target lies
    t = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.8, 0.97]) if prediction == "flow" else \
        torch.tensor([0.0, 37.0, 250.0, 500.0, 750.0, 999.0])
    return sched, x0, eps, out, t


def _target(prediction, x0, eps, a, s):
    """What each prediction type regresses onto, from its definition (eps; v = a eps - s x0; x0; u = eps - x0)."""
    return {"eps": eps, "v": a * eps - s * x0, "x0": x0, "flow": eps - x0}[prediction]


@pytest.mark.parametrize("weighting", ["uniform", "min_snr", "truncated_snr"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "flow"])
@pytest.mark.parametrize("loss_type,huber_schedule", [("huber", "snr"), ("huber", "exponential"),
                                                      ("smooth_l1", "constant"), ("l1", "snr")])
def test_loss_composes_with_weighting_and_prediction(loss_type, huber_schedule, prediction, weighting):
    sched, x0, eps, out, t = _setup(prediction)
    c0 = 0.1
    fn = DiffusionLoss(sched, prediction, weighting, gamma=5.0, loss_type=loss_type,
                       huber_schedule=huber_schedule if loss_type != "l1" else "snr")
    alpha, sigma = sched.alpha_sigma(t)
    snr = alpha ** 2 / sigma ** 2
    space = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr), "flow": 1 / sigma ** 2}[prediction]  # VP; RF
    w = {"uniform": torch.ones_like(snr), "min_snr": snr.clamp(max=5.0) / space,
         "truncated_snr": snr.clamp(min=1.0) / space}[weighting]
    a, s = (param.append_dims(v.double(), 4) for v in (alpha, sigma))
    residual = out.double() - _target(prediction, x0.double(), eps.double(), a, s)
    if loss_type == "l1":
        per = residual.abs()
    else:
        if huber_schedule == "snr":
            c = c0 + (1 - c0) / (1 + sigma / alpha) ** 2
        elif huber_schedule == "exponential":
            c = c0 ** (t.double() / 1000 if prediction != "flow" else t.double())
        else:
            c = torch.full_like(alpha, c0)
        per = _diffusers_conditional_loss(residual, torch.zeros_like(residual), loss_type, param.append_dims(c, 4))
    expected = w * per.flatten(1).mean(1)                  # diffusers: loss.mean(non-batch dims) * weights
    torch.testing.assert_close(fn.per_sample(out, x0, eps, t).double(), expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "flow"])
def test_l2_default_is_the_mse_bit_for_bit(prediction, weighting):
    sched, x0, eps, out, t = _setup(prediction, seed=1)
    default = DiffusionLoss(sched, prediction, weighting).per_sample(out, x0, eps, t)
    explicit = DiffusionLoss(sched, prediction, weighting, loss_type="l2").per_sample(out, x0, eps, t)
    alpha, sigma = sched.alpha_sigma(t)
    a, s = (param.append_dims(v.float(), 4) for v in (alpha, sigma))
    target = _target(prediction, x0, eps, a, s)
    from ldm.diffusion.losses import loss_weight
    w = loss_weight(weighting, prediction, alpha, sigma).float()
    mse = F.mse_loss(out, target, reduction="none").flatten(1).mean(1)    # diffusers' reduction="none" path
    assert torch.equal(default, explicit) and torch.equal(default, w * mse)


def test_a_training_step_with_l2_is_todays_and_huber_with_big_c_is_close():
    # One AdamW step of a small net: l2 given explicitly equals the default bit for bit; huber with a constant
    # c = 1e3 (l2 to 1e-7 relative at these residuals) moves the weights as l2 does.
    sched = make_schedule("cosine_logsnr")

    def step(**loss_args):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.SiLU(),
                                  torch.nn.Conv2d(16, 4, 3, padding=1))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        fn = DiffusionLoss(sched, "v", time="continuous", time_scale=1000.0, **loss_args)
        x0 = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        loss = fn(lambda x, t: net(x), x0, generator=torch.Generator().manual_seed(2))
        loss.backward()
        grads = [p.grad.clone() for p in net.parameters()]
        opt.step()
        return loss.detach(), grads, [p.detach().clone() for p in net.parameters()]

    base, l2, big = step(), step(loss_type="l2"), step(loss_type="huber", huber_schedule="constant", huber_c=1e3)
    assert torch.equal(base[0], l2[0]) and all(torch.equal(a, b) for a, b in zip(base[2], l2[2]))
    torch.testing.assert_close(big[0], base[0], rtol=1e-5, atol=0.0)
    for a, b in zip(base[1], big[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("args,key", [
    (dict(loss_type="huberr"), "loss_type"),
    (dict(loss_type="huber", huber_schedule="linear"), "huber_schedule"),
    (dict(loss_type="huber", huber_c=0.0), "huber_c"),
    (dict(loss_type="huber", huber_c=float("nan")), "huber_c"),
    (dict(loss_type="smooth_l1", huber_schedule="snr", huber_c=2.0), "huber_c"),
    (dict(loss_type="l2", huber_c=0.3), "huber_c"),
    (dict(loss_type="l1", huber_schedule="exponential"), "huber_schedule"),
])
def test_bad_values_are_refused_naming_the_key(args, key):
    full = dict(loss_type="l2", huber_schedule="snr", huber_c=0.1) | args
    with pytest.raises(ValueError, match=f"diffusion\\.{key}"):
        check_robust_loss(full["loss_type"], full["huber_schedule"], full["huber_c"], "diffusion.")
    with pytest.raises(ValueError, match=key):
        DiffusionLoss(make_schedule("linear"), "eps", **args)
    check_robust_loss("huber", "constant", 2.0)             # a constant c may be any size
