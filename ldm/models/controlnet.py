"""ControlNet (Zhang et al. 2023): a trainable copy of the U-Net's encoder that reads a control image
(edges, depth, pose, ...) and adds zero-initialised residuals to the frozen U-Net's skips and middle.

    python -m ldm.txt2img "a house" --model models/sd15 --controlnet lllyasviel/sd-controlnet-canny --control-image edges.png

The networks people share for SD 1.x/2.x come as diffusers `ControlNetModel` folders (config.json +
diffusion_pytorch_model.safetensors); `load_diffusers_controlnet` reads one into `ControlNet`, whose
encoder is our own U-Net's (its `encode`), renamed by ldm.models.convert_unet. The control image enters
through a small conv stack (`HintEncoder`, Zhang et al. sec. 3.2: 4x4 down to the latent grid for SD's
f = 8 autoencoder) added to conv_in's output; every skip and the middle block's output then gets a 1x1
"zero convolution" of the copy's own (their eq. 2), scaled by the conditioning scale.
`ControlledUNet` wraps the U-Net so that any sampler and CFG run it unchanged: the control image goes
with both halves of CFG's batch, as in diffusers' pipeline.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.convert_unet import _read_weights, diffusers_to_ours, unet_config_from_diffusers
from ldm.models.unet import UNet, UNetConfig
from ldm.models.weights import load_state_dict_strict


class HintEncoder(nn.Module):
    """Control image (B, 3, H, W) in [0, 1] -> (B, C, H / 2^(k-1), W / 2^(k-1)) for k widths: conv, SiLU,
    then per width step a conv and a stride-2 conv, each with SiLU, then a conv to the U-Net's width."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks += [nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x):
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class ControlNet(nn.Module):
    """forward(x, t, context, hint, context_mask=None) -> (residuals, one per U-Net skip; mid residual)."""

    def __init__(self, cfg: UNetConfig, hint_widths: tuple[int, ...] = (16, 32, 96, 256), hint_channels: int = 3):
        super().__init__()
        self.cfg, self.hint_widths = cfg, tuple(hint_widths)
        body = UNet(cfg)                                     # the encoder half is the copy; drop the decoder
        del body.up, body.norm_out, body.conv_out
        self.body = body
        self.hint = HintEncoder(hint_channels, self.hint_widths, cfg.channels[0])
        self.zero_down = nn.ModuleList(nn.Conv2d(c, c, 1) for c in body.skip_channels)
        self.zero_mid = nn.Conv2d(cfg.channels[-1], cfg.channels[-1], 1)

    def forward(self, x, t, context, hint, context_mask=None):
        body = self.body
        body._check_inputs(x, context)
        emb = body._embed(x, t, None)
        h = body.conv_in(x) + self.hint(hint.to(x.dtype))
        h, skips = body.encode(h, emb, context.to(body.conv_in.weight.dtype), context_mask)
        return [zero(s) for zero, s in zip(self.zero_down, skips)], self.zero_mid(h)


class ControlledUNet(nn.Module):
    """A U-Net with ControlNets attached: forward(x, t, context, context_mask=None, cond_emb=None) like the
    U-Net's; each (controlnet, hint (1 or B, 3, H, W) in [0, 1], scale) adds scale x its residuals
    (several ControlNets: summed, as diffusers' MultiControlNetModel does)."""

    def __init__(self, unet: UNet, controls: list[tuple[ControlNet, torch.Tensor, float]]):
        super().__init__()
        self.unet, self.cfg = unet, unet.cfg
        self.nets = nn.ModuleList(net for net, _, _ in controls)
        self.hints = [hint for _, hint, _ in controls]
        self.scales = [float(scale) for _, _, scale in controls]

    def forward(self, x, t, context, context_mask=None, cond_emb=None):
        down, mid = None, None
        for net, hint, scale in zip(self.nets, self.hints, self.scales):
            if x.shape[0] % hint.shape[0]:
                raise ValueError(f"control image batch {hint.shape[0]} does not divide the batch {x.shape[0]}")
            hint = hint.to(x.device).repeat(x.shape[0] // hint.shape[0], 1, 1, 1)   # CFG's halves share it
            d, m = net(x, t, context, hint, context_mask)
            d, m = [r * scale for r in d], m * scale
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return self.unet(x, t, context, context_mask, cond_emb, control=(down, mid))


# ----------------------------------------------------------------------------- diffusers' ControlNetModel

_HINT_KEYS = {"controlnet_cond_embedding.": "hint.", "controlnet_down_blocks.": "zero_down.",
              "controlnet_mid_block.": "zero_mid."}


def controlnet_state_from_diffusers(state: dict, num_levels: int) -> dict:
    """diffusers ControlNetModel keys -> ours: the encoder through convert_unet's U-Net map, under body."""
    out = {}
    for key, value in state.items():
        for theirs, ours in _HINT_KEYS.items():
            if key.startswith(theirs):
                out[ours + key[len(theirs):]] = value
                break
        else:
            (new, v), = diffusers_to_ours({key: value}, num_levels).items()
            out["body." + new] = v
    return out


def load_diffusers_controlnet(source: str, device="cpu") -> ControlNet:
    """A diffusers ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors/.bin), or a hub
    repo id such as lllyasviel/sd-controlnet-canny (downloaded, or from the cache when offline)."""
    from ldm.models.from_diffusers import resolve_source
    path = str(resolve_source(source, ["config.json", "diffusion_pytorch_model.safetensors"], "a ControlNet folder"))
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: not a diffusers ControlNetModel folder (no config.json)")
    with open(config_path) as f:
        d = json.load(f)
    if d.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ValueError(f"{path}: a {d['_class_name']}, not a ControlNetModel (SD 1.x/2.x)")
    if d.get("controlnet_conditioning_channel_order", "rgb") != "rgb" or d.get("global_pool_conditions", False):
        raise ValueError(f"{path}: BGR control images and pooled conditions (shuffle) are not supported")
    down = list(d["down_block_types"])
    up = [name.replace("Down", "Up") for name in reversed(down)]    # a ControlNet has no decoder: mirror it
    cfg = unet_config_from_diffusers({**d, "up_block_types": up})
    net = ControlNet(cfg, tuple(d.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
                     d.get("conditioning_channels", 3))
    state = controlnet_state_from_diffusers(_read_weights(path, None), len(cfg.channels))
    load_state_dict_strict(net, state, path)
    return net.to(device).eval().requires_grad_(False)
