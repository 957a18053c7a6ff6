"""The guidance-conditioned student of Meng et al. 2023 (sec. 4.1): a denoising net that also takes w.

The net is any kind of ldm.models.nets: our U-Net, an MMDiT (SD3) or a Flux (FLUX.1). w enters
one of two ways (`w_input`):
  "embedding"  Fourier features -> MLP, added to the timestep embedding (the MMDiT's c) through the
               net's `cond_emb` hook. The MLP's last layer starts at zero, so a fresh student equals
               its teacher's conditional model at every w; stage-one distillation then teaches it guidance.
  "guidance"   a guidance-distilled net (FLUX.1-dev) already takes the guidance scale: w enters as that
               scale, s = 1 + w (the pipeline's GuidanceInput), so a fresh student IS its teacher at every
               w, Meng's stage-one student made by BFL's guidance distillation.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Literal

import torch
import torch.nn as nn

from ldm.models.flux import Flux
from ldm.models.layers import TimestepMLP, timestep_embedding
from ldm.models.mmdit import MMDiT
from ldm.models.nets import build_net, net_config
from ldm.models.unet import UNet
from ldm.models.weights import load_weights, save_weights

W_SCALE = 100.0   # w in [0, ~10] spread over the sinusoid frequencies made for t in [0, 1000)
W_INPUTS = ("embedding", "guidance")


class WEmbedding(nn.Module):
    """w (B,) -> (B, time_embed_dim): sinusoidal Fourier features of w, then an MLP."""

    def __init__(self, features: int, out_dim: int):
        super().__init__()
        self.features = features
        self.mlp = TimestepMLP(features, out_dim)
        nn.init.zeros_(self.mlp.fc2.weight)   # start as the teacher: cond_emb = 0
        nn.init.zeros_(self.mlp.fc2.bias)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(w * W_SCALE, self.features).to(self.mlp.fc1.weight.dtype))


class GuidedStudent(nn.Module):
    """net(x, t, context, context_mask=None, w=0., **added) -> the net's prediction at guidance w
    (`added`: an SDXL U-Net's pooled text and size numbers, an MMDiT's pooled text, passed on).
    The net stays at `.unet` whichever kind it is: checkpoints and LoRA merges name it so.

    w_range: the (w_min, w_max) it was distilled on, saved with it so that samplers can warn when
    asked for a w outside it (the w-embedding does not extrapolate the teacher's guidance there).
    w_input: how w reaches the net (module docstring); "guidance" has no w-embedding.
    grid_shift: the shift of the grid it was distilled on where the folder's grid moves with the drawn size (FLUX.1's
    resolution-dependent shift), saved with it so that the pipeline samples it on that grid at any size; None: the
    folder's schedule.
    """

    def __init__(self, unet: UNet | MMDiT | Flux, w_features: int = 64, w_range: tuple[float, float] | None = None,
                 w_input: Literal["embedding", "guidance"] = "embedding", grid_shift: float | None = None):
        super().__init__()
        if w_input not in W_INPUTS:
            raise ValueError(f"GuidedStudent: w_input must be one of {W_INPUTS}, got {w_input!r}")
        if (w_input == "guidance") != bool(getattr(unet.cfg, "guidance_embeds", False)):
            raise ValueError(f"GuidedStudent: w_input={w_input!r} does not fit a net with guidance_embeds="
                             f"{getattr(unet.cfg, 'guidance_embeds', False)}: a guidance-distilled net (FLUX.1-dev) "
                             "takes w as its guidance scale, every other net through the w-embedding")
        self.unet, self.w_input = unet, w_input
        self.w_embed = WEmbedding(w_features, unet.cfg.time_embed_dim) if w_input == "embedding" else None
        self.w_range = None if w_range is None else (float(w_range[0]), float(w_range[1]))
        self.grid_shift = None if grid_shift is None else float(grid_shift)

    def forward(self, x, t, context, context_mask=None, w=0.0, **added):
        w = torch.as_tensor(w, dtype=torch.float32, device=x.device).expand(x.shape[0])  # (B,)
        if self.w_embed is None:                  # FLUX.1-dev: the guidance scale 1 + w, as GuidanceInput
            return self.unet(x, t, context, context_mask=context_mask, guidance=1.0 + w, **added)
        return self.unet(x, t, context, context_mask=context_mask, cond_emb=self.w_embed(w), **added)

    @classmethod
    def from_teacher(cls, teacher: UNet | MMDiT | Flux, w_features: int = 64) -> "GuidedStudent":
        """A student initialised from the teacher's weights (a copy; the teacher is untouched); a guidance-distilled
        teacher's takes w as its guidance input."""
        unet = build_net(dataclasses.replace(teacher.cfg)).to(next(teacher.parameters()).device)   # own config
        unet.load_state_dict(teacher.state_dict())
        return cls(unet, w_features, w_input=guidance_input(teacher))

    def save_pretrained(self, directory: str, dtype: torch.dtype | None = None) -> None:
        """config.json (the net's config + w features) and model.safetensors (optionally cast, e.g. fp16)."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            w_range = {} if self.w_range is None else {"w_range": list(self.w_range)}
            grid = {} if self.grid_shift is None else {"grid_shift": self.grid_shift}
            w_features = 0 if self.w_embed is None else self.w_embed.features
            json.dump({"kind": "guided_student", "w_input": self.w_input, "w_features": w_features, **w_range, **grid,
                       "unet": dataclasses.asdict(self.unet.cfg)}, f, indent=2)
        save_weights(self, os.path.join(directory, "model.safetensors"), dtype)

    @classmethod
    def from_pretrained(cls, directory: str, device="cpu") -> "GuidedStudent":
        path = os.path.join(directory, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GuidedStudent.from_pretrained: missing {path}")
        with open(path) as f:
            cfg = json.load(f)
        if cfg.get("kind") != "guided_student":
            raise ValueError(f"{directory} holds a {cfg.get('kind', 'plain U-Net')!r} checkpoint, not a guided student")
        model = cls(build_net(net_config(cfg["unet"])), cfg["w_features"], cfg.get("w_range"),
                    cfg.get("w_input", "embedding"), cfg.get("grid_shift"))
        load_weights(model, os.path.join(directory, "model.safetensors"), directory)  # on CPU, then .to(device)
        return model.to(device)


def guidance_input(net) -> str:
    """The `w_input` of a student of `net`: "guidance" for a guidance-distilled net (FLUX.1-dev), else "embedding"."""
    return "guidance" if getattr(net.cfg, "guidance_embeds", False) else "embedding"
