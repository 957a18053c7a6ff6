"""Optimizer groups and the learning-rate schedule against closed form; Adafactor against transformers' own."""
import copy
import math

import pytest
import torch
from torch import nn

from ldm.training import TrainConfig, build_optimizer, build_scheduler, lr_multiplier


def lrs_seen_by_updates(cfg: TrainConfig) -> list[float]:
    opt = build_optimizer(nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg)
    out = []
    for _ in range(cfg.max_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_warmup_then_schedule(schedule):
    cfg = TrainConfig(lr=2.0, warmup_steps=4, max_steps=14, lr_schedule=schedule, lr_min_ratio=0.1)
    got = lrs_seen_by_updates(cfg)
    for k, lr in enumerate(got):
        if k < 4:
            expected = 2.0 * (k + 1) / 4          # linear warmup, first update already nonzero
        else:
            t = (k - 4) / 10                      # progress through the decay
            shape = {"constant": 1.0, "cosine": (1 + math.cos(math.pi * t)) / 2, "linear": 1 - t}[schedule]
            expected = 2.0 if schedule == "constant" else 2.0 * (0.1 + 0.9 * shape)
        assert lr == pytest.approx(expected, rel=1e-12), k


def test_weight_decay_only_on_matrices():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    cfg = TrainConfig(weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6, lr=3e-4)
    opt = build_optimizer(model, cfg)
    decayed, plain = opt.param_groups
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in plain["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    assert decayed["betas"] == (0.8, 0.95) and decayed["eps"] == 1e-6 and decayed["lr"] == 3e-4
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), cfg)


def _adafactor_run(model, cfg, steps, opt=None, start=0):
    """`steps` updates of a fixed regression from update `start`, with build_optimizer's (or `opt`'s) Adafactor."""
    opt = opt or build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    for _ in range(start):
        sched.step()
    g = torch.Generator().manual_seed(start)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        (model(x) - x[:, :3]).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return opt


def test_adafactor_is_transformers_adafactor_under_our_schedule_and_groups():
    """train.optimizer=adafactor: transformers' Adafactor with our lr (warmup + decay), decay on matrices only,
    relative step and parameter scaling off; its factored state is (rows + columns) floats per matrix."""
    from transformers.optimization import Adafactor
    cfg = TrainConfig(optimizer="adafactor", lr=1e-2, weight_decay=0.1, warmup_steps=2, max_steps=6,
                      lr_schedule="cosine")
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(6, 32), nn.SiLU(), nn.Linear(32, 3))
    ref = copy.deepcopy(ours)
    opt = _adafactor_run(ours, cfg, 6)
    assert isinstance(opt, Adafactor) and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    hand = Adafactor([{"params": [ref[0].weight, ref[2].weight], "weight_decay": 0.1},
                      {"params": [ref[0].bias, ref[2].bias], "weight_decay": 0.0}],
                     lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)
    g = torch.Generator().manual_seed(0)
    for k in range(6):
        for group in hand.param_groups:
            group["lr"] = 1e-2 * lr_multiplier(k, cfg)
        x = torch.randn(16, 6, generator=g)
        (ref(x) - x[:, :3]).square().mean().backward()
        hand.step()
        hand.zero_grad()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    state = sum(v.numel() for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0)
    adam = build_optimizer(ours, TrainConfig())
    _adafactor_run(ours, TrainConfig(), 1, opt=adam)
    adam_state = sum(v.numel() for s in adam.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0)
    assert state == (32 + 6) + (3 + 32) + 32 + 3 and adam_state == 2 * sum(p.numel() for p in ours.parameters())


def test_adafactor_resumes_from_its_state_dict():
    """A checkpoint's optimizer state (what Accelerate saves) continues the run exactly."""
    cfg = TrainConfig(optimizer="adafactor", lr=1e-2, max_steps=6)
    torch.manual_seed(0)
    straight = nn.Sequential(nn.Linear(6, 32), nn.SiLU(), nn.Linear(32, 3))
    resumed = copy.deepcopy(straight)
    _adafactor_run(straight, cfg, 3, opt=_adafactor_run(straight, cfg, 3), start=3)
    saved = copy.deepcopy(_adafactor_run(resumed, cfg, 3).state_dict())
    fresh = build_optimizer(resumed, cfg)
    fresh.load_state_dict(saved)
    _adafactor_run(resumed, cfg, 3, opt=fresh, start=3)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
