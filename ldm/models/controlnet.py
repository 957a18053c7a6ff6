"""ControlNet (Zhang et al. 2023): a trainable copy of the U-Net's encoder that reads a control image
(edges, depth, pose, ...) and adds zero-initialised residuals to the frozen U-Net's skips and middle.

    python -m ldm.txt2img "a house" --model models/sd15 --controlnet lllyasviel/sd-controlnet-canny --control-image edges.png

The networks people share for SD 1.x/2.x and SDXL come as diffusers `ControlNetModel` folders (config.json +
diffusion_pytorch_model.safetensors); `load_diffusers_controlnet` reads one into `ControlNet`, whose
encoder is our own U-Net's (its `encode`), renamed by ldm.models.convert_unet. The control image enters
through a small conv stack (`HintEncoder`, Zhang et al. sec. 3.2: 4x4 down to the latent grid for SD's
f = 8 autoencoder) added to conv_in's output; every skip and the middle block's output then gets a 1x1
"zero convolution" of the copy's own (their eq. 2), scaled by the conditioning scale.
`ControlledUNet` wraps the U-Net so that any sampler and CFG run it unchanged: the control image goes
with both halves of CFG's batch, as in diffusers' pipeline. An SDXL ControlNet has SDXL's added embedding
(pooled text, size numbers) in its copy of the encoder, and gets the U-Net's.

Training one (stages/train_controlnet.py): `ControlNet.from_unet` copies a trained U-Net's encoder and
zero-initialises the zero convolutions and the hint encoder's last conv (Zhang et al. sec. 3.1: at step 0
the controlled U-Net is exactly the U-Net). `save_controlnet` writes a diffusers ControlNetModel folder
when the U-Net has SD's architecture, else our own (config.json with "_class_name": "ldm.ControlNet" +
model.safetensors); `load_controlnet` reads either, and diffusers' FLUX.1 and SD3 ControlNets
(ldm.models.controlnet_flux, controlnet_sd3) by the config's _class_name. `attach_controlnets` puts any of
them on the teacher; `ControlSteps` lets each act on part of the sampling run only (diffusers'
control_guidance_start / _end, the A1111 web UI's starting / ending control step).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from ldm.diffusion.schedules import step_index
from ldm.models.convert_unet import _read_weights, diffusers_to_ours, unet_config_from_diffusers
from ldm.models.unet import UNet, UNetConfig
from ldm.models.weights import load_state_dict_strict, load_weights, save_state, save_weights

OUR_CLASS = "ldm.ControlNet"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
HINT_WIDTHS = (16, 32, 96, 256)    # diffusers' default conditioning_embedding_out_channels (SD, f = 8)


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

    @classmethod
    def from_unet(cls, unet: UNet, latent_factor: int = 8, hint_channels: int = 3) -> "ControlNet":
        """A ControlNet whose encoder is a copy of `unet`'s, its output convolutions zero (Zhang et al. sec. 3.1).
        The hint encoder halves the control image k - 1 times for `latent_factor` = 2^(k-1) (the autoencoder's)."""
        k = int(math.log2(latent_factor)) + 1
        if 2 ** (k - 1) != latent_factor:
            raise ValueError(f"latent_factor must be a power of 2, got {latent_factor}")
        widths = HINT_WIDTHS[:k] + (HINT_WIDTHS[-1],) * max(0, k - len(HINT_WIDTHS))
        net = cls(dataclasses.replace(unet.cfg), widths, hint_channels)  # its own config: checkpointing is per net
        own = net.body.state_dict()
        net.body.load_state_dict({name: v for name, v in unet.state_dict().items() if name in own})
        for zero in [*net.zero_down, net.zero_mid, net.hint.conv_out]:
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)
        return net.to(next(unet.parameters()).device)

    def check_base(self, unet) -> None:
        """ValueError unless `unet` is a U-Net this ControlNet was made for (widths, text width)."""
        if not isinstance(unet, UNet):
            raise ValueError(f"a ControlNet for U-Nets (ControlNetModel: SD 1.x/2.x, SDXL) needs a U-Net model; this "
                             f"model's network is {type(unet).__name__} (FLUX.1 and SD3 take FluxControlNetModel and "
                             "SD3ControlNetModel folders)")
        if self.cfg.context_dim != unet.cfg.context_dim or self.cfg.channels != unet.cfg.channels:
            raise ValueError(f"made for another U-Net (widths {self.cfg.channels}, text {self.cfg.context_dim}; this "
                             f"model's {unet.cfg.channels}, {unet.cfg.context_dim})")

    @staticmethod
    def attach(unet, controls: list, autoencoder=None, active=None) -> "ControlledUNet":
        """`unet` (maybe wrapped) with controls [(ControlNet, image in [0, 1], scale), ...] attached; `active`:
        see ControlledUNet."""
        if any(len(c) != 3 for c in controls):
            raise ValueError("U-Net ControlNets take no control mode (that is FLUX.1's Union ControlNets')")
        return ControlledUNet(unet, controls, active)

    def forward(self, x, t, context, hint, context_mask=None, pooled=None, time_ids=None):
        body = self.body
        body._check_inputs(x, context)
        emb = body._embed(x, t, None, pooled, time_ids)
        h = body.conv_in(x) + self.hint(hint.to(x.dtype))
        h, skips = body.encode(h, emb, context.to(body.conv_in.weight.dtype), context_mask)
        return [zero(s) for zero, s in zip(self.zero_down, skips)], self.zero_mid(h)


class ControlledUNet(nn.Module):
    """A U-Net with ControlNets attached: forward(x, t, context, context_mask=None, cond_emb=None, **added)
    like the U-Net's (`added`: SDXL's pooled text and size numbers, for both); each (controlnet, hint (1 or B, 3, H,
    W) in [0, 1], scale) adds scale x its residuals (several ControlNets: summed, as diffusers' MultiControlNetModel
    does). active: None (all act at every t) or t -> one bool per ControlNet (`ControlSteps`); one that does not act
    is not run (diffusers runs it and multiplies by 0: the same sum)."""

    def __init__(self, unet: UNet, controls: list[tuple[ControlNet, torch.Tensor, float]], active=None):
        super().__init__()
        for net, _, _ in controls:
            if (net.cfg.added_cond is None) != (unet.cfg.added_cond is None):
                raise ValueError("a ControlNet for SDXL needs an SDXL U-Net and the other way round: "
                                 f"ControlNet added_cond={net.cfg.added_cond!r}, U-Net {unet.cfg.added_cond!r}")
        self.unet, self.cfg = unet, unet.cfg
        self.nets = nn.ModuleList(net for net, _, _ in controls)
        self.hints = [hint for _, hint, _ in controls]
        self.scales = [float(scale) for _, _, scale in controls]
        self.active = active

    def forward(self, x, t, context, context_mask=None, cond_emb=None, **added):
        down, mid = None, None
        for net, hint, scale, on in zip(self.nets, self.hints, self.scales, acting(self.active, t, len(self.nets))):
            if not on:
                continue
            if x.shape[0] % hint.shape[0]:
                raise ValueError(f"control image batch {hint.shape[0]} does not divide the batch {x.shape[0]}")
            hint = hint.to(x.device).repeat(x.shape[0] // hint.shape[0], 1, 1, 1)   # CFG's halves share it
            d, m = net(x, t, context, hint, context_mask, **added)
            d, m = [r * scale for r in d], m * scale
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return self.unet(x, t, context, context_mask, cond_emb, control=None if down is None else (down, mid), **added)


class ControlSteps:
    """Which ControlNets act at net time t, as diffusers' controlnet_keep: ControlNet k acts on step i of the n a
    sampler runs when i / n >= start_k and (i + 1) / n <= end_k (ranges [(start_k, end_k), ...] in [0, 1]).
    grid: the n step times as the net sees them, descending; an evaluation at t belongs to the step whose
    [grid[i], grid[i + 1]) holds it (t's first entry: sampling gives the batch one time; Heun's second evaluation,
    at the next step's time, counts in that next step)."""

    def __init__(self, ranges: list[tuple[float, float]], grid):
        self.ranges = check_control_ranges(ranges, len(ranges))
        self.grid = [float(g) for g in torch.as_tensor(grid).flatten()]

    def step(self, t: torch.Tensor) -> int:
        return step_index(self.grid, t)

    def __call__(self, t: torch.Tensor) -> list[bool]:
        i, n = self.step(t), len(self.grid)
        return [i / n >= start and (i + 1) / n <= end for start, end in self.ranges]


def check_control_ranges(ranges, n: int) -> list[tuple[float, float]]:
    """One (start, end) with 0 <= start < end <= 1 per ControlNet (n) from one for all or one each."""
    ranges = [(float(a), float(b)) for a, b in ranges]
    if len(ranges) not in (1, n):
        raise ValueError(f"control_range: one (start, end) for all ControlNets or one each, got {len(ranges)} for {n}")
    for start, end in ranges:
        if not 0 <= start < end <= 1:
            raise ValueError(f"control range {start:g}:{end:g}: need 0 <= start < end <= 1")
    return ranges * n if len(ranges) == 1 else ranges


def acting(active, t, n: int) -> list[bool]:
    """Which of n ControlNets act at t: all without `active` (a ControlSteps)."""
    return [True] * n if active is None else active(t)


class ControlledTransformer(nn.Module):
    """What an SD3 or FLUX.1 net with transformer ControlNets attached keeps (ControlledMMDiT, ControlledFlux):
    the net, the ControlNets, each one's bound inputs (latents, scale[, mode]) and `active` (as ControlledUNet's);
    the subclass's forward adds their residuals where its net takes them."""

    def __init__(self, net, controls: list, active=None):
        super().__init__()
        self.net, self.cfg = net, net.cfg
        self.nets = nn.ModuleList(c[0] for c in controls)
        self.controls = [c[1:] for c in controls]
        self.active = active


def attach_controlnets(net, base, controls: list, autoencoder, active=None):
    """The teacher's `net` (the model's `base` U-Net or transformer, maybe wrapped) with `controls` [(ControlNet,
    image (1 or B, 3, H, W) in [0, 1], scale[, mode]), ...] attached, all of one kind: ControlNet (U-Nets),
    FluxControlNet or SD3ControlNet, each checked against `base`; the transformers' get the images' latents.
    active: None (all act throughout) or a ControlSteps for the run."""
    kinds = {type(c[0]) for c in controls}
    if len(kinds) != 1:
        raise ValueError(f"ControlNets of one kind at a time, got {sorted(k.__name__ for k in kinds)}")
    for c in controls:
        c[0].check_base(base)
    return kinds.pop().attach(net, controls, autoencoder, active)


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


def controlnet_state_to_diffusers(state: dict, num_levels: int) -> dict:
    """Inverse of controlnet_state_from_diffusers."""
    from ldm.models.to_diffusers import unet_state_to_diffusers
    out = {}
    for key, value in state.items():
        for theirs, ours in _HINT_KEYS.items():
            if key.startswith(ours):
                out[theirs + key[len(ours):]] = value
                break
        else:
            out.update(unet_state_to_diffusers({key[len("body."):]: value}, num_levels))
    return out


def diffusers_config(net: ControlNet, sample_size: int) -> dict:
    """A ControlNetModel config.json dict; ValueError when the U-Net is not SD's architecture (e.g. pos_embed)."""
    from ldm.models.to_diffusers import unet_config_to_diffusers
    d = unet_config_to_diffusers(net.cfg, sample_size)
    for key in ("up_block_types", "out_channels", "center_input_sample", "dropout"):  # not a ControlNet's
        d.pop(key)
    return {**d, "_class_name": "ControlNetModel", "conditioning_channels": net.hint.conv_in.in_channels,
            "conditioning_embedding_out_channels": list(net.hint_widths),
            "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False}


@torch.no_grad()
def save_controlnet(net: ControlNet, folder: str, sample_size: int = 64, dtype: torch.dtype | None = None) -> str:
    """Write `net` to `folder`: diffusers' ControlNetModel layout when it can hold it, else ours; returns which."""
    os.makedirs(folder, exist_ok=True)
    try:
        config = diffusers_config(net, sample_size)
    except ValueError:
        config = None
    if config is not None:
        save_state(controlnet_state_to_diffusers(net.state_dict(), len(net.cfg.channels)),
                   os.path.join(folder, DIFFUSERS_WEIGHTS), dtype)
        layout = "diffusers"
    else:
        unet = dataclasses.asdict(dataclasses.replace(net.cfg, gradient_checkpointing=False))  # a training setting
        config = {"_class_name": OUR_CLASS, "unet": unet, "hint_widths": list(net.hint_widths),
                  "hint_channels": net.hint.conv_in.in_channels}
        save_weights(net, os.path.join(folder, "model.safetensors"), dtype)
        layout = "ours"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return layout


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")   # e.g. shapes64-edges


def shipped(source: str) -> str:
    """`source`, or the folder in ldm/assets a bare name (no folder of that name here, no '/') names, where one is
    shipped: `shapes64-edges` (the ControlNet), `shapes64-edges-adapter` (the T2I-Adapter)."""
    if not os.path.isdir(source) and os.sep not in source and "/" not in source \
            and os.path.isfile(os.path.join(SHIPPED, source, "config.json")):
        return os.path.join(SHIPPED, source)
    return source


def load_controlnet(source: str, device="cpu") -> ControlNet:
    """A ControlNet folder of ours (save_controlnet) or of diffusers, a hub repo id (diffusers'), the name
    of one shipped in ldm/assets (`shapes64-edges`), or Stability's single file of an SD 3.5 Large one."""
    source = shipped(source)
    if os.path.isfile(source):                     # a single file: Stability's SD 3.5 Large ControlNets come so
        from ldm.models.controlnet_sd3 import load_original_sd3_controlnet
        return load_original_sd3_controlnet(source).to(device).eval().requires_grad_(False)
    config_path = os.path.join(source, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            d = json.load(f)
        if d.get("_class_name") == OUR_CLASS:
            net = ControlNet(UNetConfig.from_dict(d["unet"]), tuple(d["hint_widths"]), d["hint_channels"])
            load_weights(net, os.path.join(source, "model.safetensors"), source)
            return net.to(device).eval().requires_grad_(False)
    return load_diffusers_controlnet(source, device)


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
    kind = d.get("_class_name", "ControlNetModel")
    if kind in ("FluxControlNetModel", "SD3ControlNetModel"):          # FLUX.1's and SD3's transformer copies
        from ldm.models.controlnet_flux import load_flux_controlnet
        from ldm.models.controlnet_sd3 import load_sd3_controlnet
        load = load_flux_controlnet if kind == "FluxControlNetModel" else load_sd3_controlnet
        return load(path, d, _read_weights(path, None)).to(device).eval().requires_grad_(False)
    if kind != "ControlNetModel":
        raise ValueError(f"{path}: a {kind}, not a ControlNetModel (SD 1.x/2.x, SDXL), FluxControlNetModel "
                         "(FLUX.1) or SD3ControlNetModel (SD3)")
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
