"""Teacher-path fine-tuning: few-step students learn the CFG teacher's own many-step DDIM paths.

Progressive distillation (Salimans & Ho 2022) teaches an N-step student two DDIM steps of its
2N-step teacher, so the best it can do is that teacher's quality; after six halvings the 4-step
student of the shapes world is at its 8-step teacher's level, 4 points under the 64-step CFG
teacher (docs/stage3-distill.md). Here the target is the CFG teacher's path itself: the guided
teacher runs its n-step DDIM from pure noise on training prompts (states kept on a coarse grid),
and one DDIM step t_i -> t_{i+1} of the N-step student must land where the teacher's path is at
t_{i+1}: the x of Salimans & Ho's Alg. 2 (`two_step_target`) with the teacher's n / N steps in
place of two. This is the multi-step analogue of Luhman & Luhman's (2021) one-step distillation
of a teacher's ODE solutions, started from a progressively distilled student.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ldm.diffusion.samplers import sample_ddim
from ldm.distill.targets import coefficients, two_step_target
from ldm.models.weights import write_safetensors_atomic


@torch.no_grad()
def teacher_path(model, noise, ts, schedule, keep: int, extra_args: dict) -> torch.Tensor:
    """(keep + 1, B, ...) states of DDIM on the grid ts (n + 1 times) at every (n / keep)-th time.

    model: the guided teacher (e.g. a `cfg(...)` wrapper); row 0 is `noise`, row `keep` the sample.
    """
    n = len(ts) - 1
    if keep < 1 or n % keep:
        raise ValueError(f"the kept grid ({keep} steps) must divide the teacher's {n} steps")
    states = [noise.clone()]

    def collect(d):
        if d["i"] > 0 and d["i"] % (n // keep) == 0:
            states.append(d["x"].clone())

    states.append(sample_ddim(model, noise, ts, schedule, extra_args=extra_args, callback=collect, disable=True))
    return torch.stack(states)


def path_batch(states, steps: int, schedule, batch: int, generator=None):
    """One training batch from teacher paths `states` (keep + 1, P, ...) for an N-step student.

    Draws `batch` (path, student step i) pairs uniformly: the input z at t_i on the path, the time
    t_i, and the x that makes one DDIM step t_i -> t_{i+1} land on the path at t_{i+1}.
    Returns z_t (batch, ...), t (batch,), target (batch, ...), path indices (batch,).
    """
    keep = states.shape[0] - 1
    if steps < 1 or keep % steps:
        raise ValueError(f"a {steps}-step student needs paths kept on a multiple of its grid, got {keep}")
    stride, paths = keep // steps, states.shape[1]
    idx = torch.randint(0, paths, (batch,), generator=generator)
    i = torch.randint(0, steps, (batch,), generator=generator)
    ts = schedule.timesteps(steps).to(torch.float32)
    z_t, z_end = states[i * stride, idx], states[(i + 1) * stride, idx]
    t, t_end = ts[i].to(z_t.device), ts[i + 1].to(z_t.device)
    a_t, s_t = coefficients(schedule, t, z_t)
    a_e, s_e = coefficients(schedule, t_end, z_t)
    return z_t, t, two_step_target(z_t, z_end, a_t, s_t, a_e, s_e).to(z_t.dtype), idx


@torch.no_grad()
def path_error(model, states, steps: int, schedule, extra_args: dict, batch: int = 64) -> float:
    """Mean squared distance, per latent element, of the N-step DDIM sample from each path's noise
    (row 0 of `states` (keep + 1, P, ...)) to the path's end point (its last row).

    model: the student's x0 function; extra_args: tensors with P rows (cond, w), sliced per batch.
    Held-out paths measure what the student learnt of the teacher's map from noise to images;
    training paths beside them show how much of it was memorised (docs/stage3-distill.md).
    """
    ts, total = schedule.timesteps(steps), 0.0
    for i in range(0, states.shape[1], batch):
        extra = {k: v[i:i + batch] for k, v in extra_args.items()}
        z = sample_ddim(model, states[0, i:i + batch], ts, schedule, extra_args=extra, disable=True)
        total += (z.float() - states[-1, i:i + batch].float()).pow(2).flatten(1).mean(1).sum().item()
    return total / states.shape[1]


def save_paths(path: str | Path, states: torch.Tensor, w: torch.Tensor, prompts: list[str]) -> None:
    """One file of paths: states (keep + 1, B, ...), w (B,), prompts in the metadata."""
    write_safetensors_atomic({"states": states.contiguous().float(), "w": w.float()}, path,
                             metadata={"prompts": json.dumps(prompts)})   # a killed run leaves no half file


def load_paths(files) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All paths of `files`, concatenated: states (keep + 1, P, ...), w (P,), prompts (P)."""
    states, ws, prompts = [], [], []
    for f in files:
        with safe_open(str(f), "pt") as fh:
            states.append(fh.get_tensor("states"))
            ws.append(fh.get_tensor("w"))
            prompts += json.loads(fh.metadata()["prompts"])
    if not states:
        raise FileNotFoundError("no teacher-path files to load")
    return torch.cat(states, dim=1), torch.cat(ws), prompts
