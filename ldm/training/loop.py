"""The update step of a training loop: non-finite guard, clip, optimizer, scheduler, EMA; progress bar."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from .ema import EMA
from .power_ema import PowerEMA


class NonFiniteLossError(RuntimeError):
    """Too many updates in a row had a non-finite loss."""


class NonFiniteGuard:
    """Averages micro-step losses over an update and flags updates with a non-finite loss.

    The flag is summed over processes so that every process skips the same updates (DDP
    weights stay identical); `max_in_a_row` skips in a row raise NonFiniteLossError.
    """

    def __init__(self, max_in_a_row: int):
        if max_in_a_row < 1:
            raise ValueError(f"train.max_nonfinite must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total_skipped = 0
        self._losses: list[torch.Tensor] = []

    def observe(self, loss: torch.Tensor) -> None:
        """Record one micro-step's loss (no host sync)."""
        self._losses.append(loss.detach().float().reshape(()))

    def end_update(self, accelerator: Accelerator) -> float | None:
        """Global mean loss of the update, or None when any process saw a non-finite loss."""
        if not self._losses:
            raise RuntimeError("NonFiniteGuard.end_update called before any observe(loss)")
        losses = torch.stack(self._losses)  # (micro_steps,)
        self._losses = []
        finite = torch.isfinite(losses).all()
        stats = torch.stack([torch.where(finite, losses.sum(), 0.0), losses.new_tensor(len(losses)),
                             (~finite).float()])
        total, count, bad = accelerator.reduce(stats, reduction="sum").tolist()
        if bad == 0:
            self.in_a_row = 0
            return total / count
        self.in_a_row += 1
        self.total_skipped += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(
                f"loss was not finite for {self.in_a_row} updates in a row "
                f"(train.max_nonfinite={self.max_in_a_row}); stopping. The last checkpoint "
                f"is intact: lower train.lr, check the data, or resume with --resume latest")
        return None


@dataclass
class UpdateResult:
    """What one applied optimizer update reports."""

    loss: float              # mean loss over micro-steps and processes
    lr: float                # learning rate the update used
    grad_norm: float | None  # global gradient norm before clipping (None when not clipping)

    def metrics(self) -> dict[str, float]:
        m = {"train/loss": self.loss, "train/lr": self.lr}
        return m if self.grad_norm is None else {**m, "train/grad_norm": self.grad_norm}


def optimizer_step(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler, guard: NonFiniteGuard, *, max_grad_norm: float,
                   ema: EMA | None = None, power_ema: PowerEMA | None = None) -> UpdateResult | None:
    """Finish an update when `accelerator.sync_gradients`: returns None if it was skipped.

    Skipped: a non-finite loss anywhere (guard) or an fp16 overflow (the grad scaler). Applied:
    clip, optimizer step, one scheduler step, EMA updates (classic, then post-hoc power EMAs), in that order.
    """
    loss = guard.end_update(accelerator)
    if loss is None:
        optimizer.zero_grad(set_to_none=True)
        return None
    grad_norm = None
    if max_grad_norm > 0:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if accelerator.optimizer_step_was_skipped:
        return None
    scheduler.step()
    if ema is not None:
        ema.update()
    if power_ema is not None:
        power_ema.update()
    return UpdateResult(loss=loss, lr=lr, grad_norm=grad_norm)


class ProgressBar:
    """A tqdm bar on the local main process showing loss, lr and it/s."""

    def __init__(self, accelerator: Accelerator, total: int, initial: int = 0):
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                        disable=not accelerator.is_local_main_process)

    def update(self, result: UpdateResult) -> None:
        self.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
