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
import importlib

# Loaded on first use (PEP 562), so that `from ldm.training.images import make_grid` in a CLI does not
# import the checkpointing stack (torch.distributed.checkpoint: ~1 s of txt2img's start-up).
_HOME = {
    "checkpoint": ["CheckpointMismatchError", "Checkpointer", "find_latest_checkpoint", "list_checkpoints",
                   "resolve_resume"],
    "config": ["ConfigError", "PostHocEMAConfig", "TrainConfig", "config_to_dict", "flatten_config", "load_config",
               "one_batch_size", "parse_args", "save_config"],
    "ema": ["EMA"],
    "images": ["log_images", "make_grid", "save_image_grid"],
    "loop": ["NonFiniteGuard", "NonFiniteLossError", "ProgressBar", "UpdateResult", "optimizer_step"],
    "optim": ["build_optimizer", "build_scheduler", "lr_multiplier"],
    "power_ema": ["PowerEMA", "power_ema_from_config"],
    "runtime": ["check_output_dir", "seed_everything", "setup"],
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}
__all__ = [name for names in _HOME.values() for name in names]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *__all__])
