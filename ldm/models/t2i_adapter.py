"""T2I-Adapter (Mou et al. 2023): a small conv net on a control image (sketch, canny, depth, pose, ...) whose
multi-scale features are added to the frozen U-Net's encoder features, one per encoder level (sec. 3.2,
eq. 4: F_enc^i <- F_enc^i + F_c^i). Unlike a ControlNet it never sees x_t or t: its features are computed
once per image and reused at every step.

    python -m ldm.txt2img "a house" --model models/sd15 --t2i-adapter TencentARC/t2iadapter_canny_sd15v2 --adapter-image edges.png

The shared ones (TencentARC/t2iadapter_*_sd15v2, t2i-adapter-*-sdxl-1.0) come as diffusers `T2IAdapter`
folders (config.json + diffusion_pytorch_model.safetensors); `load_t2i_adapter` reads one into `T2IAdapter`
below, diffusers' parameter names mapped to ours by `adapter_state_from_diffusers`. Three layouts (diffusers'
adapter_type):
  full_adapter     SD 1.x/2.x: pixel-unshuffle by f, conv, then one level per U-Net level, each halving
                   the grid but the first: features (c_k, H / (f 2^k), W / (f 2^k)).
  full_adapter_xl  SDXL: the same blocks, but only the third level halves: features at H/f, H/f, H/2f, H/2f
                   (with f = 16: SDXL's first level's output after its downsampler, its second, its third and
                   its middle block).
  light_adapter    SD 1.x: narrower levels (a quarter of the width inside), no stem conv, and one more
                   level than `channels`, halving again.
Where the U-Net adds them (UNet.encode, as diffusers' UNet2DConditionModel with down_intrablock_additional_
residuals): a level with transformers after its last transformer (before its downsampler; its skip carries
the sum), a plain level on its output (after its downsampler; its last skip carries the sum); features left
over go, one, on the middle block's output (SDXL's fourth).
`AdaptedUNet` wraps the U-Net so any sampler and CFG run it unchanged: scale x features for both halves of
CFG's batch (diffusers' adapter_conditioning_scale), on the first int(n x factor) of the n steps run
(`AdapterSteps`, diffusers' adapter_conditioning_factor); several adapters add their scaled features
(diffusers' MultiAdapter with adapter_weights). SD 1.x/2.x and SDXL U-Nets only; the teacher only (the
students never saw an adapter, as for ControlNets).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from ldm.diffusion.schedules import step_index
from ldm.models.controlnet import acting
from ldm.models.weights import load_state_dict_strict

KINDS = ("full_adapter", "full_adapter_xl", "light_adapter")


class AdapterResBlock(nn.Module):
    """x + conv2(ReLU(conv1(x))): conv1 3x3; conv2 1x1 (full adapters) or 3x3 (light). No norm, no time."""

    def __init__(self, channels: int, kernel2: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel2, padding=kernel2 // 2)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x)))


class AdapterLevel(nn.Module):
    """[2x2 average pool] -> [1x1 conv to the level's inner width] -> residual blocks -> [1x1 conv out]:
    (B, c_in, h, w) -> (B, c_out, h or ceil(h/2), w or ceil(w/2)). A full level's inner width is c_out (the
    1x1 conv only where the width changes), a light level's c_out / 4 (both 1x1 convs always)."""

    def __init__(self, c_in: int, c_out: int, num_res: int, down: bool, light: bool):
        super().__init__()
        self.down = down
        inner = c_out // 4 if light else c_out
        self.proj_in = nn.Conv2d(c_in, inner, 1) if light or c_in != c_out else None
        self.res = nn.Sequential(*[AdapterResBlock(inner, 3 if light else 1) for _ in range(num_res)])
        self.proj_out = nn.Conv2d(inner, c_out, 1) if light else None

    def forward(self, x):
        if self.down:
            x = F.avg_pool2d(x, 2, ceil_mode=True)       # odd sides round up, as diffusers' AvgPool2d(ceil_mode)
        if self.proj_in is not None:
            x = self.proj_in(x)
        x = self.res(x)
        return x if self.proj_out is None else self.proj_out(x)


def level_plan(kind: str, in_channels: int, channels: tuple[int, ...]) -> list[tuple[int, int, bool]]:
    """(c_in, c_out, halves) of each level of an adapter of `kind` (diffusers' FullAdapter, FullAdapterXL and
    LightAdapter); `in_channels`: what enters the first level (the stem's width, or the unshuffled image's)."""
    c = channels
    if kind == "full_adapter":
        return [(c[0], c[0], False)] + [(c[k - 1], c[k], True) for k in range(1, len(c))]
    if kind == "full_adapter_xl":         # levels 3+ keep their own width in diffusers (no 1x1 conv): same as 2's
        if any(c[k] != c[k - 1] for k in range(3, len(c))):
            raise ValueError(f"full_adapter_xl: channels {list(c)} must keep the third's width from the third on")
        return [(c[0], c[0], False)] + [(c[k - 1] if k < 3 else c[k], c[k], k == 2) for k in range(1, len(c))]
    if kind == "light_adapter":
        return ([(in_channels, c[0], False)] + [(c[k - 1], c[k], True) for k in range(1, len(c))]
                + [(c[-1], c[-1], True)])
    raise ValueError(f"T2I-Adapter adapter_type {kind!r}: expected one of {', '.join(KINDS)}")


class T2IAdapter(nn.Module):
    """forward(image (B, in_channels, H, W) in [0, 1]) -> features [(B, c_k, H / s_k, W / s_k)], s_k = strides[k]."""

    def __init__(self, kind: str = "full_adapter", in_channels: int = 3,
                 channels: tuple[int, ...] = (320, 640, 1280, 1280), num_res_blocks: int = 2,
                 downscale_factor: int = 8):
        super().__init__()
        self.kind, self.in_channels, self.factor = kind, in_channels, downscale_factor
        self.channels, self.num_res_blocks = tuple(channels), num_res_blocks
        unshuffled = in_channels * downscale_factor ** 2    # pixel-unshuffle: each f x f patch becomes channels
        light = kind == "light_adapter"
        plan = level_plan(kind, unshuffled, self.channels)
        self.conv_in = None if light else nn.Conv2d(unshuffled, self.channels[0], 3, padding=1)
        self.levels = nn.ModuleList(AdapterLevel(a, b, num_res_blocks, down, light) for a, b, down in plan)
        strides, s = [], downscale_factor
        for _, _, down in plan:
            s *= 2 if down else 1
            strides.append(s)
        self.strides = tuple(strides)                        # pixels per feature cell, level by level
        self.widths = tuple(b for _, b, _ in plan)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        if image.ndim != 4 or image.shape[1] != self.in_channels:
            raise ValueError(f"T2I-Adapter: image {tuple(image.shape)}, expected (B, {self.in_channels}, H, W)")
        if image.shape[-1] % self.factor or image.shape[-2] % self.factor:
            raise ValueError(f"T2I-Adapter: image sides {tuple(image.shape[-2:])} must divide by its "
                             f"downscale_factor {self.factor}")
        x = F.pixel_unshuffle(image, self.factor)           # (B, C f^2, H / f, W / f)
        if self.conv_in is not None:
            x = self.conv_in(x)
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)                               # (B, c_k, H / s_k, W / s_k)
        return features

    def check_base(self, unet, latent_factor: int) -> None:
        """ValueError unless each feature fits where `unet` (latents 1 / `latent_factor` of the pixels) adds it."""
        from ldm.models.unet import UNet
        if not isinstance(unet, UNet):
            raise ValueError(f"a T2I-Adapter needs a U-Net model (SD 1.x/2.x, SDXL); this model's network is "
                             f"{type(unet).__name__}")
        places = adapter_places(unet, latent_factor)
        ours = list(zip(self.widths, self.strides))
        if len(ours) > len(places) or ours != places[:len(ours)]:
            show = ", ".join(f"{c}@1/{s}" for c, s in places)
            raise ValueError(f"a {self.kind} with features {', '.join(f'{c}@1/{s}' for c, s in ours)} (width@"
                             f"1/pixel stride) does not fit this U-Net, which takes {show} (its levels, then the "
                             "middle block): made for another base model?")


def adapter_places(unet, latent_factor: int) -> list[tuple[int, int]]:
    """(width, pixel stride) of each place `unet` adds a feature, in order (see UNet.encode): one per encoder
    level (a level with transformers before its downsampler, a plain one after it), then the middle block."""
    places, stride = [], latent_factor
    for level, width in zip(unet.down, unet.cfg.channels):
        after = stride * (2 if level.resample is not None else 1)
        places.append((width, after if not len(level.attn) else stride))
        stride = after
    return places + [(unet.cfg.channels[-1], stride)]


class AdapterSteps:
    """Which adapters act at net time t, as diffusers' StableDiffusionXLAdapterPipeline: adapter k on step i of
    the n run when i < int(n * factor_k); `grid` as ControlSteps' (the n step times as the net sees them)."""

    def __init__(self, factors: list[float], grid):
        self.factors = [float(f) for f in factors]
        self.grid = [float(g) for g in torch.as_tensor(grid).flatten()]

    def __call__(self, t: torch.Tensor) -> list[bool]:
        i, n = step_index(self.grid, t), len(self.grid)      # the step an evaluation belongs to
        return [i < int(n * f) for f in self.factors]


class AdaptedUNet(nn.Module):
    """A U-Net (maybe wrapped: ConcatInputs) with T2I-Adapters attached: forward like the U-Net's; each (adapter,
    image (1 or B, C, H, W) in [0, 1], scale) adds scale x its features; `active`: None (all act at every t) or
    t -> one bool per adapter (AdapterSteps). Features depend on the image alone: each adapter runs once."""

    def __init__(self, unet, adapters: list[tuple[T2IAdapter, torch.Tensor, float]], active=None):
        super().__init__()
        self.unet, self.cfg = unet, unet.cfg
        self.nets = nn.ModuleList(a for a, _, _ in adapters)
        self.images = [image for _, image, _ in adapters]
        self.scales = [float(scale) for _, _, scale in adapters]
        self.active = active
        self._features: dict[int, list[torch.Tensor]] = {}   # adapter k's scaled features, made at the first call

    def features(self, k: int, device) -> list[torch.Tensor]:
        if k not in self._features:
            net = self.nets[k]
            weight = next(net.parameters())
            image = self.images[k].to(device=weight.device, dtype=weight.dtype)
            self._features[k] = [(f * self.scales[k]).to(device) for f in net(image)]
        return self._features[k]

    def forward(self, x, t, context, context_mask=None, cond_emb=None, control=None, **added):
        summed = None
        for k, on in enumerate(acting(self.active, t, len(self.nets))):
            if on:
                f = self.features(k, x.device)
                summed = f if summed is None else [a + b for a, b in zip(summed, f)]   # MultiAdapter's sum
        if summed is not None:
            if x.shape[0] % summed[0].shape[0]:
                raise ValueError(f"adapter image batch {summed[0].shape[0]} does not divide the batch {x.shape[0]}")
            summed = [f.repeat(x.shape[0] // f.shape[0], 1, 1, 1) for f in summed]   # CFG's halves share them
        return self.unet(x, t, context, context_mask, cond_emb, control=control, adapter=summed, **added)


def attach_adapters(net, base, adapters: list, latent_factor: int, grid=None) -> AdaptedUNet:
    """The teacher's `net` (its `base` U-Net, maybe wrapped) with `adapters` [(T2IAdapter, image (1 or B, C, H, W)
    in [0, 1] at the output size, scale[, factor]), ...] attached, each checked against `base`; factor (default
    1): the fraction of the run's steps it acts on, from the first (`grid`: the run's step times as the net sees
    them, needed for a factor < 1)."""
    factors = [float(a[3]) if len(a) > 3 else 1.0 for a in adapters]
    if any(not 0 <= f <= 1 for f in factors):
        raise ValueError(f"adapter factor: the fraction of steps an adapter acts on, in [0, 1]; got {factors}")
    for a in adapters:
        if len(a) not in (3, 4):
            raise ValueError("adapters: (T2IAdapter, image, scale[, factor]) each")
        a[0].check_base(base, latent_factor)
    active = None
    if any(f < 1 for f in factors):
        if grid is None:
            raise ValueError("an adapter factor < 1 needs the run's time grid (`grid`)")
        active = AdapterSteps(factors, grid)
    return AdaptedUNet(net, [tuple(a[:3]) for a in adapters], active)


# ----------------------------------------------------------------------------- diffusers' T2IAdapter

def adapter_state_from_diffusers(state: dict) -> dict:
    """diffusers T2IAdapter keys -> ours: adapter.body.K -> levels.K, resnets.J.block1/2 -> res.J.conv1/2,
    in_conv -> proj_in, out_conv -> proj_out; adapter.conv_in -> conv_in."""
    out = {}
    for key, value in state.items():
        if not key.startswith("adapter."):
            raise ValueError(f"not a T2IAdapter parameter: {key}")
        new = key[len("adapter."):].replace("body.", "levels.", 1).replace(".resnets.", ".res.")
        new = new.replace(".block1.", ".conv1.").replace(".block2.", ".conv2.")
        out[new.replace(".in_conv.", ".proj_in.").replace(".out_conv.", ".proj_out.")] = value
    return out


def load_t2i_adapter(source: str, device="cpu") -> T2IAdapter:
    """A diffusers T2IAdapter folder (config.json + diffusion_pytorch_model.safetensors/.bin), a hub repo id such as
    TencentARC/t2iadapter_canny_sd15v2 (downloaded, or from the cache when offline), or the name of one shipped in
    ldm/assets (`shapes64-edges-adapter`)."""
    from ldm.models.controlnet import shipped
    from ldm.models.convert_unet import _read_weights
    from ldm.models.from_diffusers import resolve_source
    path = str(resolve_source(shipped(source), ["config.json", "diffusion_pytorch_model.safetensors"], "a T2I-Adapter folder"))
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: not a diffusers T2IAdapter folder (no config.json)")
    with open(config_path) as f:
        d = json.load(f)
    if d.get("_class_name", "T2IAdapter") != "T2IAdapter":
        raise ValueError(f"{path}: a {d['_class_name']}, not a T2IAdapter")
    net = T2IAdapter(d.get("adapter_type", "full_adapter"), d.get("in_channels", 3),
                     tuple(d.get("channels", (320, 640, 1280, 1280))), d.get("num_res_blocks", 2),
                     d.get("downscale_factor", 8))
    load_state_dict_strict(net, adapter_state_from_diffusers(_read_weights(path, None)), path)
    return net.to(device).eval().requires_grad_(False)


def adapter_state_to_diffusers(state: dict) -> dict:
    """Ours -> diffusers T2IAdapter keys: the inverse of `adapter_state_from_diffusers`."""
    out = {}
    for key, value in state.items():
        new = key.replace("levels.", "body.", 1).replace(".res.", ".resnets.")
        new = new.replace(".conv1.", ".block1.").replace(".conv2.", ".block2.")
        out["adapter." + new.replace(".proj_in.", ".in_conv.").replace(".proj_out.", ".out_conv.")] = value
    return out


def save_t2i_adapter(net: T2IAdapter, folder: str, dtype: torch.dtype = torch.float32) -> None:
    """`net` as a diffusers T2IAdapter folder (config.json + diffusion_pytorch_model.safetensors), which
    `load_t2i_adapter` (--t2i-adapter) and diffusers' T2IAdapter.from_pretrained read."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    config = {"_class_name": "T2IAdapter", "_diffusers_version": "0.42.1", "adapter_type": net.kind,
              "in_channels": net.in_channels, "channels": list(net.channels), "num_res_blocks": net.num_res_blocks,
              "downscale_factor": net.factor}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in adapter_state_to_diffusers(net.state_dict()).items()}
    save_file(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
