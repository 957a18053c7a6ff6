"""The denoising network of a model folder: our U-Net, or an MMDiT (SD3's transformer), told apart by the
`kind` in its config.json (a U-Net's has none)."""
from __future__ import annotations

import json
import os

from ldm.models.unet import CONFIG_NAME, UNet, UNetConfig


def net_config(d: dict):
    """A config.json dict -> UNetConfig, or MMDiTConfig where `kind` says "mmdit"."""
    if d.get("kind", "unet") == "mmdit":
        from ldm.models.mmdit import MMDiTConfig
        return MMDiTConfig.from_dict(d)
    if "kind" in d and d["kind"] != "unet":
        raise ValueError(f"net config: unknown kind {d['kind']!r} (unet or mmdit)")
    return UNetConfig.from_dict({k: v for k, v in d.items() if k != "kind"})


def net_class(cfg) -> type:
    """UNet or MMDiT, whichever `cfg` (UNetConfig or MMDiTConfig) configures."""
    if isinstance(cfg, UNetConfig):
        return UNet
    from ldm.models.mmdit import MMDiT
    return MMDiT


def build_net(cfg):
    """A fresh network for `cfg`."""
    return net_class(cfg)(cfg)


def load_net(directory: str, device="cpu"):
    """The network saved in `directory` by its save_pretrained, whichever kind; every weight must fit."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_net: missing {path}")
    with open(path) as f:
        cfg = net_config(json.load(f))
    return net_class(cfg).from_pretrained(directory, device=device)
