"""The optimizer (AdamW, or Adafactor for memory) and the warmup + constant/cosine/linear learning-rate schedule,
built from TrainConfig."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """`cfg.optimizer`: AdamW, or Adafactor; weight decay only on tensors with >= 2 dims (matrices, conv kernels,
    embeddings).

    Biases and norm gains are 1-D: decaying them pulls activations' scale and offset to zero
    without regularising what the layer computes.

    Adafactor (Shazeer & Stern 2018) keeps, for a matrix, row and column sums of the squared gradients in place of
    Adam's full second moment (their sec. 3, Alg. 4) and no first moment: its state is about (rows + columns)
    floats per matrix against Adam's 2 x rows x columns, which is what lets a large fine-tune fit. transformers'
    implementation, driven as a plain optimizer: our lr and schedule (relative_step and scale_parameter off, as
    its docs advise for an external schedule), update clipping at 1 (their sec. 5), cfg.eps unused.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(groups, lr=cfg.lr, relative_step=False, scale_parameter=False, warmup_init=False,
                         clip_threshold=1.0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """lr factor for update number `step` (0-based): linear warmup, then the chosen decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" \
        else 1.0 - progress
    return cfg.lr_min_ratio + (1.0 - cfg.lr_min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_multiplier`; step it once per optimizer update (not per process).

    Keep it out of `accelerator.prepare`: Accelerate would step it num_processes times per update.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
