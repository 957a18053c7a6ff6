"""Checkpoints: atomic folders, keep-K, `latest`, refusal of foreign checkpoints, full restore."""
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ldm.training.checkpoint as ckpt_mod
from ldm.training import (EMA, CheckpointMismatchError, Checkpointer, TrainConfig, build_optimizer,
                          build_scheduler, find_latest_checkpoint, list_checkpoints, setup)


class Position:
    """A data position: anything with state_dict()/load_state_dict()."""

    def __init__(self):
        self.index = 0

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


class Tied(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.embed = nn.Embedding(5, width)
        self.head = nn.Linear(width, 5, bias=False)
        self.head.weight = self.embed.weight  # tied: shares storage


def make(out, *, stage="toy", width=4, resume=None, keep_last=3, seed=0):
    cfg = TrainConfig(output_dir=str(out), tracker="none", min_free_disk_gb=0, resume=resume,
                      keep_last=keep_last, checkpoint_every=2, max_steps=10, ema_decay=0.9, lr=0.1)
    accelerator = setup(cfg)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, width), nn.Linear(width, 2))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema, data = EMA(model, cfg.ema_decay), Position()
    ckpt = Checkpointer(accelerator, cfg, stage=stage, model_config={"width": width}, model=model,
                        optimizer=optimizer, scheduler=scheduler, ema=ema, data=data)
    return ckpt


def train_a_bit(ckpt, steps=2):
    for _ in range(steps):
        loss = ckpt.model(torch.randn(4, 3)).square().mean()
        loss.backward()
        ckpt.optimizer.step()
        ckpt.optimizer.zero_grad()
        ckpt.scheduler.step()
        ckpt.ema.update()
        ckpt.data.index += 1


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_keep_last_k(tmp_path):
    ckpt = make(tmp_path, keep_last=2)
    for step in range(1, 6):
        ckpt.save(step)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000004", "checkpoint-000005"]


def test_latest_ignores_temp_and_incomplete_folders(tmp_path):
    ckpt = make(tmp_path)
    ckpt.save(2)
    ckpt.save(4)
    (tmp_path / "checkpoint-000006.tmp").mkdir()                      # crashed mid-save
    (tmp_path / "checkpoint-000006.tmp" / "meta.json").write_text("{}")
    (tmp_path / "checkpoint-000008").mkdir()                          # no meta.json
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-000004"
    assert make(tmp_path, resume="latest").resume() == 4
    ckpt.save(6)
    assert not (tmp_path / "checkpoint-000006.tmp").exists()


def test_crash_during_save_leaves_previous_latest(tmp_path, monkeypatch):
    ckpt = make(tmp_path)
    ckpt.save(2)
    real_write = ckpt_mod.write_safetensors

    def dying_write(tensors, filename, *args, **kwargs):
        if str(filename).endswith("ema.safetensors"):
            raise OSError("disk full")
        return real_write(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "write_safetensors", dying_write)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(4)
    assert not (tmp_path / "checkpoint-000004").exists()
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-000002"


def test_round_trip_restores_everything(tmp_path):
    ckpt = make(tmp_path)
    train_a_bit(ckpt, 3)
    random.seed(5)
    np.random.seed(6)
    path = ckpt.save(3)
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))
    weights, shadow = snapshot(ckpt.model), dict(ckpt.ema.shadow)
    opt_state, lr = ckpt.optimizer.state_dict(), ckpt.scheduler.get_last_lr()

    fresh = make(tmp_path, seed=1, resume=str(path))
    assert fresh.resume() == 3
    draws = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == expected_draws[:2] and torch.equal(draws[2], expected_draws[2])
    for k, v in snapshot(fresh.model).items():
        assert torch.equal(v, weights[k])
    for k, v in fresh.ema.shadow.items():
        assert torch.equal(v, shadow[k])
    assert fresh.ema.num_updates == 3 and fresh.data.index == 3
    assert fresh.scheduler.get_last_lr() == lr and fresh.scheduler.last_epoch == 3
    got = fresh.optimizer.state_dict()["state"]
    for i, s in opt_state["state"].items():
        assert torch.equal(got[i]["exp_avg_sq"], s["exp_avg_sq"]) and int(got[i]["step"]) == 3
    assert load_file(str(path / "model.safetensors")).keys() == weights.keys()


def test_wrong_stage_refused_before_loading(tmp_path):
    make(tmp_path, stage="ae").save(2)
    other = make(tmp_path, stage="latent", seed=1, resume="latest")
    before = snapshot(other.model)
    with pytest.raises(CheckpointMismatchError, match="stage 'ae'.*stage 'latent'"):
        other.resume()
    assert all(torch.equal(v, before[k]) for k, v in snapshot(other.model).items())


def test_wrong_model_config_refused_naming_key(tmp_path):
    make(tmp_path, width=4).save(2)
    with pytest.raises(CheckpointMismatchError, match="model.width: checkpoint 4 vs now 8"):
        make(tmp_path, width=8, resume="latest").resume()


def test_weights_mismatch_refused_without_partial_load(tmp_path):
    make(tmp_path, width=4).save(2)
    other = make(tmp_path, width=4, seed=1, resume="latest")
    other.model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3))    # same config, other shapes
    before = snapshot(other.model)
    with pytest.raises(ValueError, match=r"1.weight: checkpoint \(2, 4\) vs model \(3, 4\)"):
        other.resume()
    assert all(torch.equal(v, before[k]) for k, v in snapshot(other.model).items())


def test_missing_resume_path_is_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        make(tmp_path, resume=str(tmp_path / "no-such-checkpoint")).resume()
    (tmp_path / "checkpoint-000001").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        make(tmp_path, resume=str(tmp_path / "checkpoint-000001")).resume()
    assert make(tmp_path / "empty", resume="latest").resume() == 0


def test_tied_weights_save_and_load(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path), tracker="none", min_free_disk_gb=0)
    accelerator = setup(cfg)
    model = Tied(6)
    optimizer = build_optimizer(model, cfg)
    ckpt = Checkpointer(accelerator, cfg, stage="tied", model_config={}, model=model,
                        optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg))
    path = ckpt.save(1)
    with torch.no_grad():
        model.embed.weight.zero_()
    ckpt.load(path)
    assert model.head.weight is model.embed.weight and model.embed.weight.abs().sum() > 0
