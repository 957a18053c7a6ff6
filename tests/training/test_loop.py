"""A tiny regression "stage" written the way stages/*.py use ldm.training, and its tests.

`train()` below is the template a stage script follows top to bottom. Run it as a script too:

    accelerate launch --multi_gpu --num_processes 2 tests/training/test_loop.py train.max_steps=4
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.training import (EMA, Checkpointer, NonFiniteGuard, NonFiniteLossError, ProgressBar,
                          TrainConfig, build_optimizer, build_scheduler, config_to_dict,
                          find_latest_checkpoint, list_checkpoints, load_config, log_images,
                          optimizer_step, parse_args, setup)


# ----------------------------------------------------------------------------- the stage's config

@dataclass
class ToyModelConfig:
    width: int = 32          # hidden units
    dropout: float = 0.1     # makes the loss depend on the global torch RNG


@dataclass
class ToyDataConfig:
    num_samples: int = 40    # fixed regression set, drawn from its own generator
    noise: float = 0.05      # input noise from the global torch RNG, fresh every batch


@dataclass
class ToyStageConfig:
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    nan_updates: list[int] = field(default_factory=list)  # test hook: poison these update attempts (1-based)


# ----------------------------------------------------------------------------- model and data

class ToyNet(nn.Module):
    def __init__(self, cfg: ToyModelConfig):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, cfg.width), nn.SiLU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.width, 1))

    def forward(self, x):  # (B, 8) -> (B, 1)
        return self.net(x)


def make_dataset(cfg: ToyDataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(cfg.num_samples, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    return x, torch.sin(x @ w)


class ShuffledBatches:
    """Epoch-wise shuffled batches; process `rank` takes its slice of each global batch."""

    def __init__(self, data, batch_size: int, seed: int, rank: int, world: int):
        self.x, self.y = data
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.epoch, self.pos = 0, 0

    def next_batch(self):
        global_batch = self.batch_size * self.world
        if self.pos + global_batch > len(self.x):
            self.epoch, self.pos = self.epoch + 1, 0
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        idx = perm[self.pos:self.pos + global_batch][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        self.pos += global_batch
        return self.x[idx], self.y[idx]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]


# ----------------------------------------------------------------------------- the stage

@torch.no_grad()
def validate(accelerator, model, ema, step, cfg):
    """Held-out loss with the EMA weights; a fixed generator leaves the training RNG untouched."""
    g = torch.Generator().manual_seed(99)
    x = torch.randn(16, 8, generator=g).to(accelerator.device)
    net = accelerator.unwrap_model(model)
    net.eval()
    with ema.swapped() if ema is not None else torch.no_grad():
        pred = net(x)
    net.train()
    accelerator.log({"val/pred_std": pred.std().item()}, step=step)
    log_images(accelerator, pred.reshape(1, 1, 4, 4).tanh(), step, output_dir=cfg.train.output_dir)


def train(cfg: ToyStageConfig, stop_after: int | None = None) -> dict:
    """The stage; `stop_after` simulates the job being killed right after that step."""
    accelerator = setup(cfg.train, cfg, project="toy")

    model = ToyNet(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(accelerator.unwrap_model(model), cfg.train.ema_decay, cfg.train.ema_power) \
        if cfg.train.ema_decay > 0 else None
    data = ShuffledBatches(make_dataset(cfg.data), cfg.train.batch_size, cfg.train.seed,
                           accelerator.process_index, accelerator.num_processes)

    ckpt = Checkpointer(accelerator, cfg.train, stage="toy", model_config=cfg.model, config=cfg,
                        model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, data=data)
    step = ckpt.resume()  # restores RNG last, after everything above was built
    guard = NonFiniteGuard(cfg.train.max_nonfinite)
    bar = ProgressBar(accelerator, cfg.train.max_steps, initial=step)
    losses, attempts = {}, 0

    model.train()
    while step < cfg.train.max_steps and step != stop_after:
        x, y = (t.to(accelerator.device) for t in data.next_batch())
        x = x + cfg.data.noise * torch.randn_like(x)
        with accelerator.accumulate(model):
            loss = F.mse_loss(model(x), y)
            if accelerator.sync_gradients and attempts + 1 in cfg.nan_updates:
                loss = loss * float("nan")
            guard.observe(loss)
            accelerator.backward(loss)
            update = None
            if accelerator.sync_gradients:
                attempts += 1
                update = optimizer_step(accelerator, model, optimizer, scheduler, guard,
                                        max_grad_norm=cfg.train.max_grad_norm, ema=ema)
        if update is None:  # mid-accumulation, or a skipped update
            continue

        step += 1
        losses[step] = update.loss
        bar.update(update)
        if step % cfg.train.log_every == 0:
            accelerator.log({**update.metrics(), "train/skipped": guard.total_skipped}, step=step)
        if cfg.train.validate_every > 0 and step % cfg.train.validate_every == 0:
            validate(accelerator, model, ema, step, cfg)
        ckpt.maybe_save(step)

    bar.close()
    accelerator.end_training()
    net = accelerator.unwrap_model(model)
    return {"losses": losses, "weights": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "ema": ema.state_dict() if ema is not None else None, "skipped": guard.total_skipped,
            "optimizer": optimizer, "scheduler": scheduler, "ema_obj": ema, "rank": accelerator.process_index}


def main():
    cfg = parse_args(ToyStageConfig, "Toy regression stage (the ldm.training exemplar)")
    out = train(cfg)
    rank = out["rank"]
    save_file(out["weights"], os.path.join(cfg.train.output_dir, f"weights_rank{rank}.safetensors"))
    with open(os.path.join(cfg.train.output_dir, f"losses_rank{rank}.json"), "w") as f:
        json.dump(out["losses"], f)


# ----------------------------------------------------------------------------- tests

def toy_config(output_dir, *overrides) -> ToyStageConfig:
    base = [f"train.output_dir={output_dir}", "train.max_steps=6", "train.batch_size=4",
            "train.grad_accum=2", "train.lr=1e-2", "train.warmup_steps=2", "train.lr_schedule=cosine",
            "train.weight_decay=0.01", "train.ema_decay=0.9", "train.ema_power=0.75",
            "train.checkpoint_every=3", "train.keep_last=2", "train.log_every=1",
            "train.validate_every=0", "train.tracker=none", "train.min_free_disk_gb=0"]
    return load_config(ToyStageConfig, None, base + list(overrides))


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_exact_resume_is_bitwise(tmp_path):
    straight = train(toy_config(tmp_path / "straight", "train.tracker=tensorboard",
                                "train.validate_every=2"))
    killed = train(toy_config(tmp_path / "resumed", "train.tracker=tensorboard",
                              "train.validate_every=2"), stop_after=3)
    assert sorted(killed["losses"]) == [1, 2, 3]
    assert find_latest_checkpoint(tmp_path / "resumed").name == "checkpoint-000003"
    resumed = train(toy_config(tmp_path / "resumed", "train.resume=latest", "train.tracker=tensorboard",
                               "train.validate_every=2"))

    assert sorted(resumed["losses"]) == [4, 5, 6]
    assert {**killed["losses"], **resumed["losses"]} == straight["losses"]  # exact float equality
    assert_same_tensors(resumed["weights"], straight["weights"])
    assert_same_tensors(resumed["ema"], straight["ema"])
    assert (tmp_path / "resumed" / "samples" / "step-000006.png").is_file()
    assert list((tmp_path / "resumed" / "logs").rglob("events.out.tfevents*"))


def test_resume_with_other_rng_state_diverges(tmp_path):
    # The exact-resume test must be able to fail: dropout and input noise make the RNG matter,
    # so a checkpoint whose RNG state is replaced by another one resumes differently.
    from ldm.training.checkpoint import capture_rng
    straight = train(toy_config(tmp_path / "a"))
    train(toy_config(tmp_path / "b"), stop_after=3)
    torch.manual_seed(12345)
    torch.save(capture_rng(), find_latest_checkpoint(tmp_path / "b") / "rng_state_0.pt")
    resumed = train(toy_config(tmp_path / "b", "train.resume=latest"))
    assert resumed["losses"][4] != straight["losses"][4]


def test_nonfinite_update_is_skipped(tmp_path):
    out = train(toy_config(tmp_path, "nan_updates=[2]", "train.max_nonfinite=3"))
    assert out["skipped"] == 1
    assert sorted(out["losses"]) == [1, 2, 3, 4, 5, 6]
    adam_steps = {int(s["step"]) for s in out["optimizer"].state_dict()["state"].values()}
    assert adam_steps == {6}                       # 7 attempts, 6 optimizer steps
    assert out["ema_obj"].num_updates == 6
    assert out["scheduler"].last_epoch == 6
    assert all(torch.isfinite(w).all() for w in out["weights"].values())


def test_nonfinite_stops_after_k_in_a_row(tmp_path):
    cfg = toy_config(tmp_path, "nan_updates=[3,4,5,6,7,8]", "train.max_nonfinite=3",
                     "train.checkpoint_every=1", "train.keep_last=0")
    with pytest.raises(NonFiniteLossError, match=r"3 updates in a row.*max_nonfinite=3"):
        train(cfg)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]
    assert not list(tmp_path.glob("*.tmp"))
    # The last good checkpoint loads into a fresh run.
    resumed = train(toy_config(tmp_path, "train.resume=latest", "train.max_steps=4"))
    assert sorted(resumed["losses"]) == [3, 4]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    overrides = ["model.dropout=0", "data.noise=0", "train.max_steps=4", "train.checkpoint_every=2"]
    out_dir = tmp_path / "ddp"
    cfg2 = toy_config(out_dir, *overrides)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), __file__,
           *[f"{k}={v}" for k, v in flat_overrides(cfg2).items()]]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"2-process run took {time.time() - t0:.1f} s")

    w0 = load_file(str(out_dir / "weights_rank0.safetensors"))
    w1 = load_file(str(out_dir / "weights_rank1.safetensors"))
    assert_same_tensors(w0, w1)
    l0 = json.loads((out_dir / "losses_rank0.json").read_text())
    assert json.loads((out_dir / "losses_rank1.json").read_text()) == l0
    latest = find_latest_checkpoint(out_dir)
    assert json.loads((latest / "meta.json").read_text())["num_processes"] == 2  # a real gloo group
    assert {f.name for f in latest.iterdir()} >= {"rng_state_0.pt", "rng_state_1.pt",
                                                  "data_state_0.pt", "data_state_1.pt"}

    single = train(toy_config(tmp_path / "single", *overrides, "train.batch_size=8"))
    assert sorted(int(k) for k in l0) == sorted(single["losses"])
    for k, v in l0.items():
        assert abs(v - single["losses"][int(k)]) <= 1e-5, (k, v, single["losses"][int(k)])
    for k in w0:
        torch.testing.assert_close(w0[k], single["weights"][k], rtol=1e-5, atol=1e-5)


def flat_overrides(cfg: ToyStageConfig) -> dict[str, str]:
    """The config as key=value strings (what a user would type)."""
    out = {}
    for section, values in config_to_dict(cfg).items():
        if not isinstance(values, dict):
            out[section] = json.dumps(values)
            continue
        for k, v in values.items():
            out[f"{section}.{k}"] = "null" if v is None else (json.dumps(v) if not isinstance(v, str) else v)
    return out


if __name__ == "__main__":
    main()
