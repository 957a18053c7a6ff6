"""Load Stable Diffusion U-Net weights released in the diffusers or the CompVis layout.

Both layouts hold the same tensors under other names; we map names (and the diffusers
config) onto `UNet`/`UNetConfig` and load all-or-nothing.
"""
from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file

from ldm.models.unet import UNet, UNetConfig, load_state_dict_strict

COMPVIS_PREFIX = "model.diffusion_model."

# Diffusers config entries that must keep these values: anything else is an architecture we lack.
# (upcast_attention, set by SD 2.1, needs no entry: ldm.ops attention backends accumulate softmax in fp32.)
_DIFFUSERS_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    "downsample_padding": 1, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "dual_cross_attention": False, "class_embed_type": None,
    "num_class_embeds": None, "encoder_hid_dim": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "cross_attention_norm": None, "num_attention_heads": None,
    "class_embeddings_concat": False, "reverse_transformer_layers_per_block": None,
}
_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"


def _uniform(d: dict, key: str):
    """An int-or-list diffusers entry that must be the same at every level."""
    value = d[key]
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"diffusers config {key}={value}: per-level values are not supported")
        return value[0]
    return value


def unet_config_from_diffusers(d: dict) -> UNetConfig:
    """Map a diffusers UNet2DConditionModel config.json dict onto UNetConfig."""
    for key, expected in _DIFFUSERS_FIXED.items():
        value = d.get(key, expected)
        if isinstance(value, list) and not isinstance(expected, list) and len(set(value)) == 1:
            value = value[0]  # e.g. only_cross_attention: [false, false, ...]
        if value != expected:
            raise ValueError(f"diffusers config {key}={value!r} is not supported (need {expected!r})")
    down, up = list(d["down_block_types"]), list(d["up_block_types"])
    for name in down + up:
        if name not in (_CROSS_DOWN, _PLAIN_DOWN, _CROSS_UP, _PLAIN_UP):
            raise ValueError(f"diffusers config: block type {name!r} is not supported")
    attention_levels = tuple(i for i, name in enumerate(down) if name == _CROSS_DOWN)
    mirrored = [_CROSS_UP if i in attention_levels else _PLAIN_UP for i in reversed(range(len(down)))]
    if up != mirrored:
        raise ValueError(f"diffusers config: up_block_types {up} do not mirror down_block_types {down}")
    added = d.get("addition_embed_type")
    if added not in (None, "text_time"):
        raise ValueError(f"diffusers config addition_embed_type={added!r} is not supported (need None or 'text_time')")
    heads = d.get("attention_head_dim", 8)  # diffusers' historical name for the number of heads
    depth = d.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in depth):
        raise ValueError(f"diffusers config transformer_layers_per_block={depth}: nested lists are not supported")
    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        channels=tuple(d["block_out_channels"]),
        layers_per_block=_uniform(d, "layers_per_block"),
        attention_levels=attention_levels,
        num_heads=tuple(heads) if isinstance(heads, (list, tuple)) else heads,
        transformer_depth=tuple(depth) if isinstance(depth, (list, tuple)) else depth,
        context_dim=_uniform(d, "cross_attention_dim"),
        linear_projection=bool(d.get("use_linear_projection", False)),
        norm_groups=d.get("norm_num_groups", 32),
        norm_eps=d.get("norm_eps", 1e-5),
        dropout=d.get("dropout", 0.0),
        added_cond=added,
        **({"added_in_dim": d["projection_class_embeddings_input_dim"],
            "added_id_dim": d.get("addition_time_embed_dim", 256)} if added else {}),
    )


# ---- key renaming ----------------------------------------------------------------------------

# Names inside a spatial transformer (identical in both layouts) -> ours; ldm.models.lora inverts these tables.
TRANSFORMER_RENAMES = (("transformer_blocks.", "blocks."), ("to_out.0.", "to_out."),
                       ("ff.net.0.proj.", "ff.geglu.proj."), ("ff.net.2.", "ff.out."))
DIFFUSERS_TOP = {"time_embedding.linear_1.": "time_embed.fc1.", "time_embedding.linear_2.": "time_embed.fc2.",
                 "conv_norm_out.": "norm_out.", "mid_block.resnets.0.": "mid.res1.", "mid_block.resnets.1.": "mid.res2.",
                 "mid_block.attentions.0.": "mid.attn.",
                 "add_embedding.linear_1.": "add_embed.fc1.", "add_embedding.linear_2.": "add_embed.fc2."}


def _rename_transformer(suffix: str) -> str:
    for old, new in TRANSFORMER_RENAMES:
        suffix = suffix.replace(old, new)
    return suffix


RES_DIFFUSERS = {"time_emb_proj": "emb_proj", "conv_shortcut": "skip"}
_RES_COMPVIS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "skip"}


def _rename_res(suffix: str, table: dict) -> str:
    head, _, param = suffix.rpartition(".")
    return f"{table.get(head, head)}.{param}"


def diffusers_to_ours(state: dict, num_levels: int) -> dict:
    """Rename diffusers UNet2DConditionModel keys; unknown keys pass through (the loader reports them)."""
    out = {}
    for key, value in state.items():
        new = key
        for old, ours in DIFFUSERS_TOP.items():
            if key.startswith(old):
                rest = key[len(old):]
                new = ours + (_rename_transformer(rest) if "attentions" in old
                              else _rename_res(rest, RES_DIFFUSERS) if "resnets" in old else rest)
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers\.0|upsamplers\.0)\.(.*)", key)
        if m:
            side, idx, kind, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            level = idx if side == "down" else num_levels - 1 - idx  # diffusers orders up blocks deepest first
            if kind == "resnets":
                j, _, rest = rest.partition(".")
                new = f"{side}.{level}.res.{j}.{_rename_res(rest, RES_DIFFUSERS)}"
            elif kind == "attentions":
                j, _, rest = rest.partition(".")
                new = f"{side}.{level}.attn.{j}.{_rename_transformer(rest)}"
            else:
                new = f"{side}.{level}.{'downsample' if side == 'down' else 'upsample'}.{rest}"
        out[new] = value
    return out


def _compvis_table(cfg: UNetConfig) -> dict:
    """CompVis module prefix -> (our prefix, kind), walking openaimodel.UNetModel's block order."""
    L, n = len(cfg.channels), cfg.layers_per_block
    table = {"time_embed.0": ("time_embed.fc1", "plain"), "time_embed.2": ("time_embed.fc2", "plain"),
             "input_blocks.0.0": ("conv_in", "plain"), "out.0": ("norm_out", "plain"),
             "out.2": ("conv_out", "plain")}
    if cfg.added_cond:   # SDXL (Stability AI's sgm layout): the added embedding's MLP
        table |= {"label_emb.0.0": ("add_embed.fc1", "plain"), "label_emb.0.2": ("add_embed.fc2", "plain")}
    mid = [("mid.res1", "res"), ("mid.attn", "attn"), ("mid.res2", "res")]
    for i, entry in enumerate(mid if cfg.mid_attention else mid[::2]):
        table[f"middle_block.{i}"] = entry
    b = 1
    for lvl in range(L):
        for j in range(n):
            table[f"input_blocks.{b}.0"] = (f"down.{lvl}.res.{j}", "res")
            table[f"input_blocks.{b}.1"] = (f"down.{lvl}.attn.{j}", "attn")
            b += 1
        if lvl < L - 1:
            table[f"input_blocks.{b}.0.op"] = (f"down.{lvl}.downsample.conv", "plain")
            b += 1
    b = 0
    for lvl in reversed(range(L)):
        for j in range(n + 1):
            has_attn = lvl in cfg.attention_levels
            table[f"output_blocks.{b}.0"] = (f"up.{lvl}.res.{j}", "res")
            if has_attn:
                table[f"output_blocks.{b}.1"] = (f"up.{lvl}.attn.{j}", "attn")
            if lvl > 0 and j == n:
                table[f"output_blocks.{b}.{2 if has_attn else 1}.conv"] = (f"up.{lvl}.upsample.conv", "plain")
            b += 1
    return table


def compvis_to_ours(state: dict, cfg: UNetConfig) -> dict:
    """Rename CompVis `model.diffusion_model.*` keys; unknown keys pass through (the loader reports them)."""
    if any(k.startswith(COMPVIS_PREFIX) for k in state):
        state = {k[len(COMPVIS_PREFIX):]: v for k, v in state.items() if k.startswith(COMPVIS_PREFIX)}
    table = _compvis_table(cfg)
    out = {}
    for key, value in state.items():
        parts, new = key.split("."), key
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in table:
                ours, kind = table[prefix]
                rest = ".".join(parts[i:])
                rest = (_rename_res(rest, _RES_COMPVIS) if kind == "res"
                        else _rename_transformer(rest) if kind == "attn" else rest)
                new = f"{ours}.{rest}"
                break
        out[new] = value
    return out


# ---- loaders ---------------------------------------------------------------------------------

def _resolve_diffusers_dir(path: str, subfolder: str | None, local_files_only: bool) -> str:
    """A local folder, a pipeline folder with unet/, or a hub repo id (downloaded with huggingface_hub)."""
    if not os.path.isdir(path):
        if os.path.exists(path) or path.count("/") != 1:
            raise FileNotFoundError(f"load_diffusers_unet: {path!r} is neither a folder nor a hub repo id 'org/name'")
        from huggingface_hub import snapshot_download
        pattern = f"{subfolder or 'unet'}/*"
        path = snapshot_download(path, allow_patterns=[pattern], local_files_only=local_files_only)
        subfolder = subfolder or "unet"
    if subfolder:
        path = os.path.join(path, subfolder)
    elif not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "unet")):
        path = os.path.join(path, "unet")
    return path


def _read_weights(directory: str, variant: str | None) -> dict:
    """diffusion_pytorch_model[.<variant>].safetensors (or .bin), or the shards its index names (large
    models, e.g. SD 3.5 Large's transformer: diffusion_pytorch_model.safetensors.index[.<variant>].json)."""
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    st, pt = os.path.join(directory, stem + ".safetensors"), os.path.join(directory, stem + ".bin")
    if os.path.isfile(st):
        return load_file(st)
    index = os.path.join(directory, "diffusion_pytorch_model.safetensors.index" + (f".{variant}" if variant else "")
                         + ".json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(os.path.join(directory, shard)).items()}
    if os.path.isfile(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {stem}.safetensors or .bin in {directory}{variant_hint(directory, stem)}")


def variant_hint(directory: str, stem: str) -> str:
    """", it has the variants [...] (pick one: --variant NAME)" when `directory` holds only variant files of `stem`."""
    base = stem.split(".")[0]
    found = sorted({name[len(base) + 1:].split(".")[0] for name in os.listdir(directory)
                    if name.startswith(base + ".") and name.endswith((".safetensors", ".bin"))} - {"safetensors", "bin"})
    return f", it has the variants {found} (pick one: --variant NAME)" if found else ""


def load_diffusers_unet(path: str, subfolder: str | None = None, variant: str | None = None,
                        local_files_only: bool = False) -> UNet:
    """Our UNet from a diffusers UNet2DConditionModel folder (config.json + diffusion_pytorch_model.*)."""
    directory = _resolve_diffusers_dir(path, subfolder, local_files_only)
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"load_diffusers_unet: missing {config_path}")
    with open(config_path) as f:
        cfg = unet_config_from_diffusers(json.load(f))
    state = diffusers_to_ours(_read_weights(directory, variant), len(cfg.channels))
    model = UNet(cfg)
    load_state_dict_strict(model, state, directory)
    return model


def load_compvis_unet(state_dict: dict, config: UNetConfig) -> UNet:
    """Our UNet from a CompVis/SD checkpoint state dict (`model.diffusion_model.*` keys or bare)."""
    model = UNet(config)
    load_state_dict_strict(model, compvis_to_ours(state_dict, config), "CompVis state dict")
    return model
