"""Exponential moving average of a model's trainable weights, kept in fp32."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class EMA:
    """shadow <- d_n * shadow + (1 - d_n) * weights after each optimizer update.

    d_n = ema_decay, or with warmup power p > 0: d_n = min(decay, 1 - (1 + n)^-p) for the n-th
    update (n = 0 copies the weights), so early, near-random weights are forgotten quickly.
    Give it the unwrapped model (`accelerator.unwrap_model(model)`) after `prepare`.
    """

    def __init__(self, model: nn.Module, decay: float, power: float = 0.0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        if power < 0.0:
            raise ValueError(f"ema power must be >= 0, got {power}")
        self.model, self.decay, self.power = model, decay, power
        self.num_updates = 0
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if self.power == 0.0:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + self.num_updates) ** -self.power)

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the shadow (call once per optimizer update)."""
        d = self.current_decay()
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - d)  # d*s + (1-d)*p
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the EMA weights into `model` (default: the tracked model)."""
        params = dict((model or self.model).named_parameters())
        for name, s in self.shadow.items():
            params[name].copy_(s.to(params[name].dtype))

    @contextlib.contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """Evaluate with the EMA weights inside the block; the training weights come back after."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        self.copy_to()
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 shadow weights by parameter name (num_updates is kept separately)."""
        return {n: s.clone() for n, s in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int = 0) -> None:
        """Restore the shadow from `state_dict()`; keys and shapes must match exactly."""
        check_same_tensors(self.shadow, state, "ema")
        for n, s in state.items():
            self.shadow[n].copy_(s.float())
        self.num_updates = int(num_updates)


def check_same_tensors(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor],
                       what: str) -> None:
    """Raise a ValueError naming missing, unexpected and mis-shaped keys (before any copying)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(got)) if got[k].shape != expected[k].shape]
    problems = ([f"missing keys {missing[:8]}"] if missing else []) + \
               ([f"unexpected keys {unexpected[:8]}"] if unexpected else []) + shapes[:8]
    if problems:
        raise ValueError(f"{what} weights do not match the model: " + "; ".join(problems))
