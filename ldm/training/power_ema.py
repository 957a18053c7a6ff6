"""EDM2's power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", sec. 3.1 and appendix C), tracked in training with snapshots for the post-hoc reconstruction.

The EMA of the weights theta_1..theta_t with exponent gamma averages them with the profile
    p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)  on [0, t]                       (appendix C, Eq. 108/121)
and is tracked step by step with
    theta_hat_t = beta_t theta_hat_(t-1) + (1 - beta_t) theta_t,  beta_t = (1 - 1/t)^(gamma + 1)    (Eq. 127)
whose weights are exactly p's integrals over (s - 1, s]: w_s = (s^(gamma+1) - (s-1)^(gamma+1)) / t^(gamma+1).
Its width relative to the training length is sigma_rel = (gamma+1)^(1/2) (gamma+2)^(-1) (gamma+3)^(-1/2)
(Eq. 123): the paper tracks sigma_rel 0.05 and 0.10 (gamma 16.97 and 6.94). Because the profile scales with t, one
sigma_rel is the same relative average at every length, and snapshots of two of them let
`python -m ldm.training.posthoc_ema` rebuild any other afterwards.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ldm.models.weights import write_safetensors_atomic

from .ema import check_same_tensors

logger = logging.getLogger(__name__)

SNAPSHOT_DIR = "posthoc-ema"                               # under the run's output_dir
SNAPSHOT_FORMAT = "ldm-posthoc-ema/1"                      # safetensors metadata "format"
SNAPSHOT_PATTERN = re.compile(r"^phema-(\d+)-(\d+\.\d+)\.safetensors$")
MAX_SIGMA_REL = 1 / math.sqrt(12)                          # gamma = 0: the uniform average of all steps


def sigma_rel_of_gamma(gamma: float) -> float:
    """The profile's standard deviation over its length t (Eq. 123)."""
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """Eq. 123 inverted (Eq. 126, Algorithm 2): sigma_rel^-2 (gamma+1) = (gamma+2)^2 (gamma+3), the largest real root
    of gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s), s = sigma_rel^-2 (one root >= 0 for sigma_rel in range)."""
    if not 0.0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}] (gamma >= 0; {MAX_SIGMA_REL:.4f} = the "
                         f"uniform average), got {sigma_rel}")
    s = sigma_rel ** -2
    return max(0.0, float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max()))


def snapshot_name(step: int, sigma_rel: float) -> str:
    return f"phema-{step:06d}-{sigma_rel:.4f}.safetensors"


class PowerEMA:
    """Power-function EMAs (one per sigma_rel) of a model's trainable weights in fp32, and their snapshots.

    `update()` once per optimizer update (the t-th uses beta_t, so t = 1 copies the weights and the start is
    forgotten); `maybe_snapshot(step)` on the main process writes `<folder>/phema-<step>-<sigma_rel>.safetensors`,
    the EMA weights alone (keys as model.named_parameters()), every `every` steps and at the last.
    Give it the unwrapped model after `prepare`; its state goes into checkpoints as a Checkpointer extra.
    """

    def __init__(self, model: nn.Module, sigma_rels: list[float], every: int, folder: str | Path,
                 dtype: torch.dtype = torch.float32):
        if not sigma_rels or every < 1:
            raise ValueError(f"PowerEMA needs sigma_rels and every >= 1, got {sigma_rels}, {every}")
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if any(isinstance(p, DTensor) for p in self.params.values()):
            raise NotImplementedError("train.posthoc_ema under FSDP2 (sharded weights) is not supported: "
                                      "use single-process or DDP training")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [gamma_of_sigma_rel(s) for s in self.sigma_rels]
        self.every, self.folder, self.dtype = every, Path(folder), dtype
        self.shadows = [{n: p.detach().float().clone() for n, p in self.params.items()} for _ in self.sigma_rels]
        self.num_updates = 0

    def betas(self) -> list[float]:
        """beta_t of each profile for the next update, t = num_updates + 1 (Eq. 127)."""
        t = self.num_updates + 1
        return [(1.0 - 1.0 / t) ** (gamma + 1.0) for gamma in self.gammas]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into every profile (call once per optimizer update)."""
        for beta, shadow in zip(self.betas(), self.shadows):
            for name, p in self.params.items():
                shadow[name].lerp_(p.detach().float(), 1.0 - beta)   # beta * shadow + (1 - beta) * p
        self.num_updates += 1

    # ------------------------------------------------------------------ snapshots

    def maybe_snapshot(self, step: int, max_steps: int) -> list[Path]:
        """Write the snapshots every `every` steps and at `max_steps` (call on the main process only)."""
        if step % self.every == 0 or step == max_steps:
            return self.snapshot(step)
        return []

    def snapshot(self, step: int) -> list[Path]:
        """One file per profile: its weights in `dtype`, with step, update count t, sigma_rel and gamma as metadata."""
        self.folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for sigma_rel, gamma, shadow in zip(self.sigma_rels, self.gammas, self.shadows):
            path = self.folder / snapshot_name(step, sigma_rel)
            meta = {"format": SNAPSHOT_FORMAT, "step": str(step), "updates": str(self.num_updates),
                    "sigma_rel": repr(sigma_rel), "gamma": repr(gamma)}
            write_safetensors_atomic({n: s.detach().to(self.dtype).cpu().contiguous() for n, s in shadow.items()},
                                     path, meta)
            paths.append(path)
        return paths

    def settle_folder(self, step: int, drop_later: bool = True) -> None:
        """Before training from `step` (every process; `drop_later` on the main one): snapshots of later steps are
        dropped, as the run will redo those steps and rewrite them; a fresh run (step 0) refuses another run's."""
        found = sorted((int(m.group(1)), p) for p in self.folder.glob("phema-*.safetensors")
                       if (m := SNAPSHOT_PATTERN.match(p.name)))
        if step == 0 and found:
            raise FileExistsError(f"{self.folder} already holds {len(found)} post-hoc EMA snapshots of an earlier run "
                                  f"(steps {found[0][0]}..{found[-1][0]}): resume it (--resume latest, where it left a "
                                  "checkpoint) or move the folder away; mixing two runs' snapshots would reconstruct neither")
        later = [p for s, p in found if s > step] if drop_later else []
        for p in later:
            p.unlink()
        if later:
            logger.info("resumed at step %d: dropped %d post-hoc EMA snapshots of later steps (rewritten when "
                        "reached again)", step, len(later))

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict:
        """sigma_rels, update count and the fp32 shadows (plain types: training_state.pt loads weights_only)."""
        return {"sigma_rels": list(self.sigma_rels), "num_updates": self.num_updates,
                "shadows": [{n: s.clone() for n, s in shadow.items()} for shadow in self.shadows]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; the tracked sigma_rels and every tensor's key and shape must match."""
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"the checkpoint tracked post-hoc EMA sigma_rels {list(state['sigma_rels'])}, this run "
                             f"train.posthoc_ema.sigma_rels={self.sigma_rels}: resume with the same list")
        for shadow, saved in zip(self.shadows, state["shadows"]):
            check_same_tensors(shadow, saved, "post-hoc EMA")
        for shadow, saved in zip(self.shadows, state["shadows"]):
            for n, s in saved.items():
                shadow[n].copy_(s.float())
        self.num_updates = int(state["num_updates"])


def power_ema_from_config(model: nn.Module, cfg, output_dir: str | Path) -> PowerEMA | None:
    """The run's PowerEMA from `train.posthoc_ema` (a PostHocEMAConfig), or None when it is off."""
    if not cfg.sigma_rels:
        return None
    return PowerEMA(model, cfg.sigma_rels, cfg.every, Path(output_dir) / SNAPSHOT_DIR, getattr(torch, cfg.dtype))
