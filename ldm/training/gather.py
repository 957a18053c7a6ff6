"""Whole weights of a prepared model for work done on rank 0 alone: sampling a grid, exporting a folder.

Under FSDP2 every parameter is a DTensor shard: `state_dict()` returns shards and a forward is
collective (one process alone waits forever). So every process takes part in gathering the
weights, and rank 0 loads them into a plain module of the same architecture that it can use on
its own. Single-process and DDP runs use the model itself, exactly as before.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from .ema import EMA

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to CPU, on rank 0 only


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def full_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """Full weights: FSDP2 shards gathered to CPU (collective; {} on ranks > 0), else the model's state_dict()."""
    if is_sharded(accelerator):
        return get_model_state_dict(model, options=_FULL)
    return accelerator.unwrap_model(model).state_dict()


def main_process_copy(accelerator: Accelerator, model: nn.Module,
                      build: Callable[[], nn.Module]) -> nn.Module | None:
    """The model's current weights in an unsharded module on the main process; None on the others.

    Not sharded: the unwrapped model itself. FSDP2 (collective, every process calls it): `build()`,
    a fresh module of the same architecture, holding the gathered weights. It is built with the
    RNG forked, so sharded and unsharded runs draw the same training noise afterwards.
    """
    if not is_sharded(accelerator):
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    state = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    with torch.random.fork_rng(devices=[]):
        plain = build()
    plain.load_state_dict(state)
    return plain.to(accelerator.device)


@contextlib.contextmanager
def ema_copy(accelerator: Accelerator, model: nn.Module, ema: EMA | None,
             build: Callable[[], nn.Module]) -> Iterator[nn.Module | None]:
    """`main_process_copy` with the EMA weights swapped in for the block (None on ranks > 0).

    Not sharded: the main process swaps the EMA into the model for the block, as `ema.swapped()`.
    FSDP2: every process swaps its EMA shard in just for the gather, so the block runs on a copy.
    """
    swap = ema.swapped() if ema is not None else contextlib.nullcontext()
    if is_sharded(accelerator):
        with swap:
            plain = main_process_copy(accelerator, model, build)
        yield plain
    elif accelerator.is_main_process:
        with swap:
            yield accelerator.unwrap_model(model)
    else:
        yield None
