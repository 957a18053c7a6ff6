"""Shared training plumbing: typed config, Accelerate setup, checkpoints, EMA, the update step, logging.

A stage script reads top to bottom (tests/training/test_loop.py is the worked example):

    cfg = parse_args(StageConfig, "Train X", "configs/x/tiny.yaml")
    accelerator = setup(cfg.train, cfg, project="x")
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)      # not passed to prepare
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(accelerator.unwrap_model(model), cfg.train.ema_decay, cfg.train.ema_power)
    ckpt = Checkpointer(accelerator, cfg.train, stage="x", model_config=cfg.model, config=cfg,
                        model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, data=data)
    step = ckpt.resume()                                   # restores RNG last
    guard, bar = NonFiniteGuard(cfg.train.max_nonfinite), ProgressBar(accelerator, max_steps, step)
    while step < cfg.train.max_steps:
        with accelerator.accumulate(model):
            loss = ...; guard.observe(loss); accelerator.backward(loss)
            update = optimizer_step(...) if accelerator.sync_gradients else None
        if update is None: continue
        step += 1; bar.update(update); accelerator.log(update.metrics(), step=step)
        ckpt.maybe_save(step)
"""
from .checkpoint import (CheckpointMismatchError, Checkpointer, find_latest_checkpoint,
                         list_checkpoints, resolve_resume)
from .config import (ConfigError, TrainConfig, config_to_dict, flatten_config, load_config,
                     one_batch_size, parse_args, save_config)
from .ema import EMA
from .images import log_images, make_grid, save_image_grid
from .loop import NonFiniteGuard, NonFiniteLossError, ProgressBar, UpdateResult, optimizer_step
from .optim import build_optimizer, build_scheduler, lr_multiplier
from .runtime import check_output_dir, seed_everything, setup

__all__ = [
    "CheckpointMismatchError", "Checkpointer", "find_latest_checkpoint", "list_checkpoints",
    "resolve_resume", "ConfigError", "TrainConfig", "config_to_dict", "flatten_config",
    "load_config", "one_batch_size", "parse_args", "save_config", "EMA", "log_images", "make_grid",
    "save_image_grid", "NonFiniteGuard", "NonFiniteLossError", "ProgressBar", "UpdateResult",
    "optimizer_step", "build_optimizer", "build_scheduler", "lr_multiplier",
    "check_output_dir", "seed_everything", "setup",
]
