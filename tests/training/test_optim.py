"""Optimizer groups and the learning-rate schedule against closed form."""
import math

import pytest
from torch import nn

from ldm.training import TrainConfig, build_optimizer, build_scheduler


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
