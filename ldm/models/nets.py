"""The denoising network of a model folder: our U-Net, an MMDiT (SD3's transformer) or a Flux transformer
(FLUX.1), told apart by the `kind` in its config.json (a U-Net's has none)."""
from __future__ import annotations

import json
import os

from ldm.models.unet import UNet, UNetConfig
from ldm.models.weights import CONFIG_NAME


def net_config(d: dict):
    """A config.json dict -> UNetConfig, or MMDiTConfig / FluxConfig where `kind` says "mmdit" / "flux"."""
    if d.get("kind", "unet") == "mmdit":
        from ldm.models.mmdit import MMDiTConfig
        return MMDiTConfig.from_dict(d)
    if d.get("kind") == "flux":
        from ldm.models.flux import FluxConfig
        return FluxConfig.from_dict(d)
    if "kind" in d and d["kind"] != "unet":
        raise ValueError(f"net config: unknown kind {d['kind']!r} (unet, mmdit or flux)")
    return UNetConfig.from_dict({k: v for k, v in d.items() if k != "kind"})


def net_class(cfg) -> type:
    """UNet, MMDiT or Flux, whichever `cfg` configures."""
    if isinstance(cfg, UNetConfig):
        return UNet
    if cfg.kind == "flux":
        from ldm.models.flux import Flux
        return Flux
    from ldm.models.mmdit import MMDiT
    return MMDiT


def build_net(cfg):
    """A fresh network for `cfg`."""
    return net_class(cfg)(cfg)


def net_structure(directory: str):
    """The network saved in `directory` built on the meta device: its modules and names, no weights read
    (to check layer names before a run loads the real one)."""
    import torch
    with open(os.path.join(directory, CONFIG_NAME)) as f:
        cfg = net_config(json.load(f))
    with torch.device("meta"):
        return build_net(cfg)


def load_net(directory: str, device="cpu"):
    """The network saved in `directory` by its save_pretrained, whichever kind; every weight must fit."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_net: missing {path}")
    with open(path) as f:
        cfg = net_config(json.load(f))
    return net_class(cfg).from_pretrained(directory, device=device)
