"""ldm/distill/lcm.py against independent references: the boundary scalings against diffusers' LCMScheduler (and
the sampler using them in the same units of t), the grid against the timesteps diffusers' LCM training and
LCMScheduler use, the teacher's guided solve against DDIMScheduler.step on guided eps, the pseudo-Huber loss against
its closed form, and the LoRA bypass against the base layers."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler
from torch import nn

from ldm.diffusion.param import Denoiser, ddim_step
from ldm.diffusion.samplers import sample_lcm
from ldm.diffusion.schedules import CLEAN, make_schedule
from ldm.distill.lcm import (consistency, consistency_loss, draw_pairs, lcm_grid, lcm_scalings, lora_bypassed,
                             teacher_solve)
from ldm.models.lora import LoRALinear, add_lora

DISCRETE = ("scaled_linear", "linear", "cosine")
CONTINUOUS = ("cosine_logsnr", "rectified_flow")


# ----------------------------------------------------------------------------- boundary scalings

@pytest.mark.parametrize("name", DISCRETE)
def test_scalings_are_lcm_schedulers_on_discrete_timesteps(name):
    theirs = LCMScheduler()                                   # timestep_scaling 10, sigma_data 0.5
    schedule = make_schedule(name)
    for t in (0, 1, 3, 19, 39, 259, 999):
        ref = theirs.get_scalings_for_boundary_condition_discrete(t)
        assert lcm_scalings(float(t), schedule) == pytest.approx(ref, rel=1e-14, abs=0)
        tensor = lcm_scalings(torch.tensor([float(t)], dtype=torch.float64), schedule)
        assert torch.allclose(torch.cat(tensor), torch.tensor(ref, dtype=torch.float64), rtol=1e-14, atol=0)
    assert lcm_scalings(0.0, schedule) == (1.0, 0.0)           # f(z, 0) = z: the boundary condition


@pytest.mark.parametrize("name", CONTINUOUS)
def test_scalings_of_continuous_time_are_those_of_1000_t(name):
    theirs, schedule = LCMScheduler(), make_schedule(name)
    for t in (0.0, 0.001, 0.02, 0.26, 1.0):
        assert lcm_scalings(t, schedule) == pytest.approx(theirs.get_scalings_for_boundary_condition_discrete(1000 * t),
                                                          rel=1e-12, abs=1e-300)
    c_skip, c_out = lcm_scalings(0.02, schedule)               # one grid step from 0: f is all but the x0-prediction
    assert c_skip < 7e-6 and c_out > 1 - 4e-6


@pytest.mark.parametrize("name", ("scaled_linear", "cosine_logsnr"))
def test_sample_lcm_steps_with_these_scalings(name):
    """One lcm step to clean data with a denoiser D = 0.3 x returns c_skip x + c_out D at the step's t, on either kind of
    schedule (before the scalings took a continuous t as 1000 t, c_skip at t = 0.02 was 0.86 instead of 6e-6)."""
    schedule = make_schedule(name)
    t = 19.0 if name == "scaled_linear" else 0.02
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample_lcm(lambda x, t: 0.3 * x, x, torch.tensor([t, CLEAN], dtype=torch.float64), schedule, disable=True)
    c_skip, c_out = lcm_scalings(t, schedule)
    torch.testing.assert_close(out, (c_skip + 0.3 * c_out) * x, rtol=1e-14, atol=0)
    assert c_skip < 7e-6


# ----------------------------------------------------------------------------- the grid

@pytest.mark.parametrize("name", DISCRETE)
def test_discrete_grid_is_diffusers_lcm_training_timesteps(name):
    """t_1..t_50: diffusers' LCM training solver timesteps (DDIM's trailing 50, T/50 apart, 999 last; also all 50 of
    LCMScheduler's timesteps); t_0 = 0, where diffusers' training clamps t_1 - T/50 = -1."""
    grid = lcm_grid(make_schedule(name), 50)
    ddim = DDIMScheduler(timestep_spacing="trailing")
    ddim.set_timesteps(50)
    lcm = LCMScheduler()
    lcm.set_timesteps(50)
    assert grid.dtype == torch.float64 and len(grid) == 51 and grid[0] == 0
    assert grid[1:].flip(0).tolist() == ddim.timesteps.tolist() == lcm.timesteps.tolist()
    assert grid[1:].tolist() == [20 * n - 1 for n in range(1, 51)]


def test_continuous_grid_is_n_over_N():
    for name in CONTINUOUS:
        grid = lcm_grid(make_schedule(name), 50)
        assert grid.tolist() == [n / 50 for n in range(51)]
    assert lcm_grid(make_schedule("cosine_logsnr"), 8).tolist() == [n / 8 for n in range(9)]


@pytest.mark.parametrize("name", ("scaled_linear", "cosine", "cosine_logsnr", "rectified_flow"))
def test_the_lcm_spacing_samples_on_the_learnt_grid(name):
    """`--spacing lcm` at 1..50 steps evaluates the model at grid points t_1..t_N only (LCMScheduler's choice of
    index), on a continuous schedule too (it refused one before)."""
    schedule = make_schedule(name)
    grid = set(lcm_grid(schedule, 50)[1:].tolist())
    for n in range(1, 51):
        ts = schedule.timesteps(n, spacing="lcm")[:-1]
        assert set(ts.tolist()) <= grid and ts.tolist() == sorted(ts.tolist(), reverse=True) and len(set(ts.tolist())) == n
    if name == "cosine_logsnr":
        assert schedule.timesteps(4, spacing="lcm")[:-1].tolist() == [1.0, 0.76, 0.5, 0.26]
    if name == "scaled_linear":                               # the same indices as diffusers' 4 LCM steps
        lcm = LCMScheduler()
        lcm.set_timesteps(4)
        assert schedule.timesteps(4, spacing="lcm")[:-1].tolist() == lcm.timesteps.tolist() == [999, 759, 499, 259]


def test_pairs_skip_k_grid_points():
    grid = lcm_grid(make_schedule("scaled_linear"), 50)
    torch.manual_seed(0)
    s, t = draw_pairs(grid, 1, 4000)
    assert torch.equal(s - t, torch.where(s == 19, 19.0, 20.0).double())     # t_1 = 19 pairs with t_0 = 0
    assert set(s.tolist()) == set(grid[1:].tolist())                         # every start point is drawn
    s, t = draw_pairs(grid, 3, 4000)
    assert (s - t).max() == 60 and s.min() == 59 and t.max() == 939
    with pytest.raises(ValueError, match="skip"):
        draw_pairs(grid, 51, 1)


# ----------------------------------------------------------------------------- the teacher's guided solve

def eps_net(x, t, context):
    """A made-up noise predictor: nonlinear in x, depends on t and on the prompt (context (B, 1))."""
    return torch.tanh(x + context[:, :, None, None]) * 0.4 + 0.05 * (t / 1000).reshape(-1, 1, 1, 1)


def test_teacher_solve_is_ddim_scheduler_step_on_guided_eps():
    """Guiding x0 then stepping (ours) = guiding eps then DDIMScheduler.step (diffusers), per-sample w; the step from
    t_1 = 19 lands on timestep 0's alpha (set_alpha_to_one=False), the grid's t_0."""
    schedule = make_schedule("scaled_linear")
    teacher = Denoiser(eps_net, schedule, "eps")
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, timestep_spacing="trailing")
    ddim.set_timesteps(50)
    grid = lcm_grid(schedule, 50)
    gen = torch.Generator().manual_seed(0)
    cond, uncond = {"context": torch.randn(4, 1, dtype=torch.float64, generator=gen)}, {"context": torch.zeros(1, 1)}
    w = torch.tensor([0.0, 1.0, 3.5, 7.5], dtype=torch.float64)
    for n in (0, 1, 12, 49):
        s, t = grid[n + 1].expand(4), grid[n].expand(4)
        z = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=gen)
        ours = teacher_solve(teacher, z, s, t, w, cond, uncond, schedule)
        e_c, e_u = eps_net(z, s, cond["context"]), eps_net(z, s, uncond["context"].expand(4, 1))
        guided = (1 + w.view(-1, 1, 1, 1)) * e_c - w.view(-1, 1, 1, 1) * e_u      # sd_scale = 1 + w
        theirs = ddim.step(guided, int(s[0]), z).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=lambda m: f"n={n}: {m}")


def test_teacher_solve_closed_form_and_w_zero_is_the_conditional_model():
    """Continuous time (v-prediction): z_t = alpha_t x0_w + sigma_t (z_s - alpha_s x0_w) / sigma_s with
    x0_w = (1 + w) x0_c - w x0_u; w = 0 (a float, or a tensor through the 2B batch) is the conditional model's step."""
    schedule = make_schedule("cosine_logsnr")
    v_net = lambda x, t, context: torch.sin(x) * context[:, :, None, None] + (t / 1000).reshape(-1, 1, 1, 1)  # noqa: E731
    teacher = Denoiser(v_net, schedule, "v", time_scale=1000.0)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=gen)
    cond, uncond = {"context": torch.rand(3, 1, dtype=torch.float64, generator=gen) + 0.5}, {"context": torch.zeros(1, 1)}
    s, t = torch.tensor([0.5, 0.26, 0.02], dtype=torch.float64), torch.tensor([0.48, 0.24, 0.0], dtype=torch.float64)
    w = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    x_c = teacher(z, s, **cond)
    x_u = teacher(z, s, context=torch.zeros(3, 1, dtype=torch.float64))
    x_w = (1 + w.view(-1, 1, 1, 1)) * x_c - w.view(-1, 1, 1, 1) * x_u
    (a_s, s_s), (a_t, s_t) = ([c.view(-1, 1, 1, 1) for c in schedule.alpha_sigma(u)] for u in (s, t))
    expected = a_t * x_w + s_t * (z - a_s * x_w) / s_s
    torch.testing.assert_close(teacher_solve(teacher, z, s, t, w, cond, uncond, schedule), expected, rtol=1e-12, atol=1e-12)
    conditional = ddim_step(z, x_c, a_s, s_s, a_t, s_t)
    for w0 in (0.0, torch.zeros(3, dtype=torch.float64)):
        assert torch.equal(teacher_solve(teacher, z, s, t, w0, cond, uncond, schedule), conditional)
    assert not torch.allclose(teacher_solve(teacher, z, s, t, w, cond, uncond, schedule), conditional, atol=1e-3)


# ----------------------------------------------------------------------------- consistency function and loss

@pytest.mark.parametrize("name", ("scaled_linear", "cosine_logsnr"))
def test_consistency_function(name):
    """f(z, 0) = z whatever the model (the boundary condition); elsewhere c_skip z + c_out model(z, t)."""
    schedule = make_schedule(name)
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = lambda x, t, **cond: torch.full_like(x, 7.0)     # noqa: E731
    assert torch.equal(consistency(model, z, torch.zeros(2, dtype=torch.float64), schedule), z)
    t = lcm_grid(schedule, 50)[[1, 25]]
    c_skip, c_out = lcm_scalings(t, schedule)
    expected = c_skip.view(-1, 1, 1, 1) * z + c_out.view(-1, 1, 1, 1) * 7.0
    torch.testing.assert_close(consistency(model, z, t, schedule), expected, rtol=1e-14, atol=0)


def test_pseudo_huber_loss_closed_form():
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=gen)
    c = 0.001
    loss = consistency_loss(f, target, "huber", c)
    d = (f - target).detach()
    expected = ((d ** 2 + c ** 2).sqrt() - c).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)
    loss.sum().backward()                                     # d/df = d / sqrt(d^2 + c^2) / elements
    torch.testing.assert_close(f.grad, d / (d ** 2 + c ** 2).sqrt() / 32, rtol=1e-12, atol=0)
    # Its two regimes: |d| - c for |d| >> c, d^2 / (2c) for |d| << c.
    big, small = torch.full((1, 4), 3.0, dtype=torch.float64), torch.full((1, 4), 1e-6, dtype=torch.float64)
    assert consistency_loss(big, torch.zeros_like(big), "huber", c).item() == pytest.approx(3.0 - c, rel=1e-6)
    assert consistency_loss(small, torch.zeros_like(small), "huber", c).item() == pytest.approx(1e-12 / (2 * c), rel=1e-5)
    torch.testing.assert_close(consistency_loss(f, target, "l2"), (d ** 2).flatten(1).mean(1), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="huber"):
        consistency_loss(f, target, "l1")


# ----------------------------------------------------------------------------- the teacher is the base net

def test_lora_bypass_gives_the_base_layers_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 5))
    base = [m.weight.detach().clone() for m in (net[0], net[2])]
    x = torch.randn(4, 6)
    plain = net(x)
    add_lora(net, rank=2, targets=("0", "2"))
    assert torch.equal(net(x), plain)                         # B = 0: the wrapped net starts as the base
    for m in net.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B)
    adapted = net(x)
    assert not torch.allclose(adapted, plain, atol=1e-3)
    with lora_bypassed(net) as same:
        assert same is net and torch.equal(net(x), plain)
    assert torch.equal(net(x), adapted)                       # the updates are back after the block
    assert all("forward" not in m.__dict__ for m in net.modules())
    assert torch.equal(net[0].base.weight, base[0]) and torch.equal(net[2].base.weight, base[1])
    assert math.isfinite(adapted.sum().item())
