"""ControlNets for SD3 (Zhang et al. 2023's idea on the MMDiT), as InstantX and Stability share them in diffusers'
`SD3ControlNetModel` layout:

    python -m ldm.txt2img "a house" --model models/sd3 --controlnet InstantX/SD3-Controlnet-Canny \
        --control-image edges.png --control-scale 0.7

- The copy: the MMDiT's patch and position embedding, time, pooled-text and text embeddings and its first joint
  blocks (ldm.models.mmdit.JointBlock), every one with both streams (no last-block special case), no output layer.
- The control image enters as its autoencoder latents through a zero-initialised patch embedding without positions
  (diffusers' pos_embed_input), added to x's tokens.
- Outputs: every block's image tokens through its own zero-initialised Linear, times the conditioning scale; the
  MMDiT adds them after its blocks but the last (`MMDiT.forward(control=...)`).
- `force_zeros_for_pooled_projection` (InstantX's, the default): the copy sees an all-zero pooled text and
  control latents without the autoencoder's shift, as diffusers' StableDiffusion3ControlNetPipeline gives them.

Refused by name: inpainting ControlNets (extra_conditioning_channels: a mask besides the image) and SD 3.5 Large's
ControlNets (no position or text embedding of their own; single-stream blocks).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ldm.models.controlnet import ControlledTransformer, acting
from ldm.models.convert_mmdit import diffusers_to_ours, mmdit_config_from_diffusers
from ldm.models.mmdit import JointBlock, MMDiT, MMDiTConfig

CLASS_NAME = "SD3ControlNetModel"
_KEYS = {"pos_embed_input.proj.": "hint_embed.", "controlnet_blocks.": "zero."}
_OURS_ONLY = ("_class_name", "extra_conditioning_channels", "pos_embed_type", "use_pos_embed",
              "force_zeros_for_pooled_projection")


class SD3ControlNet(nn.Module):
    """forward(x, t, context, hint latents, pooled, context_mask=None) -> one residual (B, N, D) per block."""

    def __init__(self, cfg: MMDiTConfig, zero_pooled: bool = True):
        super().__init__()
        self.cfg, self.zero_pooled = cfg, zero_pooled
        body = MMDiT(cfg)                                   # the copy's embeddings and blocks; no output layer
        body.blocks[-1] = JointBlock(cfg.width, cfg.num_heads, cfg.qk_norm, last=False,
                                     dual=cfg.depth - 1 in cfg.dual_attention_layers)   # its text stream goes on
        del body.final_mod, body.proj_out
        self.body = body
        p = cfg.patch_size
        self.hint_embed = nn.Conv2d(cfg.in_channels, cfg.width, p, stride=p)           # no position table
        self.zero = nn.ModuleList(nn.Linear(cfg.width, cfg.width) for _ in range(cfg.depth))

    def check_base(self, net) -> None:
        """ValueError unless `net` is an MMDiT this ControlNet was made for (width, patches, text widths)."""
        if not isinstance(net, MMDiT):
            raise ValueError(f"an SD3 ControlNet (SD3ControlNetModel) needs an SD3 model; this model's network is "
                             f"{type(net).__name__}")
        keys = ("width", "patch_size", "in_channels", "context_dim", "pooled_dim")
        if any(getattr(self.cfg, k) != getattr(net.cfg, k) for k in keys):
            raise ValueError("this SD3 ControlNet was made for another transformer: " + ", ".join(
                f"{k} {getattr(self.cfg, k)} vs the model's {getattr(net.cfg, k)}" for k in keys))

    def hint_latents(self, image: torch.Tensor, autoencoder) -> torch.Tensor:
        """Control image (B, 3, H, W) in [0, 1] -> scaled latents (posterior mode); InstantX's (zero_pooled) were
        trained without the autoencoder's shift: z * scale, not (z - shift) * scale."""
        z = autoencoder.encode_latents(image * 2 - 1, sample=False)
        if self.zero_pooled:
            z = z + (autoencoder.config.shift_factor or 0.0) * autoencoder.config.scaling_factor
        return z

    def forward(self, x, t, context, hint, pooled, context_mask=None):
        body = self.body
        if self.zero_pooled:
            pooled = torch.zeros_like(pooled)
        body._check_inputs(x, context, context_mask, pooled, None, None)
        dtype, p = body.patch_embed.weight.dtype, self.cfg.patch_size
        B, _, H, W = x.shape
        c = body._conditioning(t, pooled, None, B, dtype)
        h = body.patch_embed(x.to(dtype)).flatten(2).transpose(1, 2) + body.positions(H // p, W // p).to(dtype)
        h = h + self.hint_embed(hint.to(dtype)).flatten(2).transpose(1, 2)      # (B, N, D)
        ctx = body.context_embed(context.to(dtype))
        mask = None
        if context_mask is not None:
            mask = torch.cat([context_mask.new_ones(B, h.shape[1]), context_mask], dim=1).bool()
        out = []
        for block, zero in zip(body.blocks, self.zero):
            h, ctx = body._run(block, h, ctx, c, mask)
            out.append(zero(h))
        return out

    @staticmethod
    def attach(net, controls: list, autoencoder, active=None) -> "ControlledMMDiT":
        """`net` (the SD3 teacher, maybe wrapped) with controls [(SD3ControlNet, image in [0, 1], scale), ...]
        attached, their images encoded once here; `active`: as ControlledUNet's."""
        bound = []
        ae = next(autoencoder.parameters())
        for control, image, scale, *mode in controls:
            if mode:
                raise ValueError("SD3 ControlNets take no control mode (that is FLUX.1's Union ControlNets')")
            with torch.no_grad():
                bound.append((control, control.hint_latents(image.to(ae.device, ae.dtype), autoencoder), float(scale)))
        return ControlledMMDiT(net, bound, active)


class ControlledMMDiT(ControlledTransformer):
    """An MMDiT with SD3 ControlNets attached: forward like the MMDiT's; each (controlnet, latents (1 or B, C, h, w),
    scale) adds scale x its residuals (several: summed, as diffusers' SD3MultiControlNetModel) at the t where
    `active` (ldm.models.controlnet.ControlSteps, or None: all t) says it acts."""

    def forward(self, x, t, context, context_mask=None, cond_emb=None, pooled=None, **added):
        residuals = []
        for net, (hint, scale), on in zip(self.nets, self.controls, acting(self.active, t, len(self.nets))):
            if not on:
                continue
            hint = hint.to(x.device).repeat(x.shape[0] // hint.shape[0], 1, 1, 1)    # CFG's halves share it
            r = [s * scale for s in net(x, t, context, hint, pooled, context_mask)]
            if residuals and len(r) != len(residuals):
                raise ValueError("several SD3 ControlNets must have as many blocks each to add up")
            residuals = [a + b for a, b in zip(residuals, r)] if residuals else r
        return self.net(x, t, context, context_mask, cond_emb, control=residuals or None, pooled=pooled, **added)


def load_sd3_controlnet(path: str, d: dict, state: dict) -> SD3ControlNet:
    """An SD3ControlNetModel from its config.json dict `d` and diffusers-named weights `state`."""
    from ldm.models.weights import load_state_dict_strict, split_renamed
    if d.get("extra_conditioning_channels", 0):
        raise ValueError(f"{path}: an SD3 inpainting ControlNet (extra_conditioning_channels "
                         f"{d['extra_conditioning_channels']}: a mask besides the image): not supported")
    if not d.get("use_pos_embed", True) or d.get("joint_attention_dim", 4096) is None:
        raise ValueError(f"{path}: an SD 3.5 Large ControlNet (no position or text embedding of its own, "
                         "single-stream blocks): not supported")
    if d.get("pos_embed_type", "sincos") != "sincos":
        raise ValueError(f"{path}: pos_embed_type {d['pos_embed_type']!r}: only SD3's sincos table is supported")
    cfg = mmdit_config_from_diffusers({k: v for k, v in d.items() if k not in _OURS_ONLY})
    cfg = dataclasses.replace(cfg, out_channels=cfg.in_channels)   # no output layer: out_channels is moot
    net = SD3ControlNet(cfg, d.get("force_zeros_for_pooled_projection", True))
    # its own layers by _KEYS; the copy of the base transformer's blocks in that transformer's names
    load_state_dict_strict(net, split_renamed(state, _KEYS, diffusers_to_ours, "body."), path)
    return net
