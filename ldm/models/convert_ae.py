"""Load diffusers-format and CompVis (original Stable Diffusion) autoencoders into ours.

Both converters rename keys with ordered regex rules and load all-or-nothing through
`load_state_dict_strict`, so a wrong checkpoint fails with the list of missing/unexpected keys.

CompVis layout (ldm/modules/diffusionmodules/model.py of the LDM release):
  encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}, encoder.down.{i}.downsample.conv,
  {encoder,decoder}.mid.{block_1,attn_1,block_2}, mid.attn_1.{norm,q,k,v,proj_out} as 1x1 convs,
  decoder.up.{i}.block.{j}, decoder.up.{i}.upsample.conv with i = resolution level (0 = full size,
  run last), {encoder,decoder}.{conv_in,norm_out,conv_out}, quant_conv, post_quant_conv.
diffusers layout: down_blocks.{i}.resnets.{j}, downsamplers.0, mid_block.resnets.{0,1},
  mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0} as Linear, up_blocks.{i} in
  execution order, conv_shortcut, conv_norm_out.
"""
from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import torch

from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL, load_state_dict_strict

DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"

# diffusers config keys with no effect on the weights or the forward pass.
_DIFFUSERS_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "force_upcast",
                      "latents_mean", "latents_std"}

_DIFFUSERS_RULES = [
    (r"down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.res.\2."),
    (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.resample."),
    (r"up_blocks\.(\d+)\.resnets\.(\d+)\.", r"up.\1.res.\2."),
    (r"up_blocks\.(\d+)\.upsamplers\.0\.", r"up.\1.resample."),
    (r"mid_block\.resnets\.0\.", "mid.res1."),
    (r"mid_block\.resnets\.1\.", "mid.res2."),
    (r"mid_block\.attentions\.0\.", "mid.attn."),
    (r"attn\.group_norm\.", "attn.norm."),
    (r"attn\.(?:to_q|query)\.", "attn.q."),                         # `query` etc.: pre-0.14 diffusers names
    (r"attn\.(?:to_k|key)\.", "attn.k."),
    (r"attn\.(?:to_v|value)\.", "attn.v."),
    (r"attn\.(?:to_out\.0|proj_attn)\.", "attn.proj."),
    (r"\.conv_shortcut\.", ".skip."),
    (r"\.conv_norm_out\.", ".norm_out."),
]

_COMPVIS_RULES = [
    (r"encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down.\1.res.\2."),
    (r"encoder\.down\.(\d+)\.downsample\.", r"encoder.down.\1.resample."),
    (r"\.mid\.block_1\.", ".mid.res1."),
    (r"\.mid\.block_2\.", ".mid.res2."),
    (r"\.mid\.attn_1\.", ".mid.attn."),
    (r"attn\.proj_out\.", "attn.proj."),
    (r"\.nin_shortcut\.", ".skip."),
]


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


# ----------------------------------------------------------------------------
# diffusers.

def diffusers_config_to_ours(d: dict) -> AutoencoderConfig:
    """Map a diffusers AutoencoderKL config.json dict to AutoencoderConfig, rejecting what we do not build."""
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        bad = [t for t in d.get(key, []) if t != allowed]
        if bad:
            raise ValueError(f"diffusers config {key} has unsupported block types {bad}; only {allowed}")
    if d.get("act_fn", "silu") != "silu":
        raise ValueError(f"diffusers config act_fn={d['act_fn']!r} unsupported; only 'silu'")
    if d.get("use_quant_conv", True) != d.get("use_post_quant_conv", True):
        raise ValueError("diffusers config use_quant_conv and use_post_quant_conv must agree, got "
                         f"{d.get('use_quant_conv')} and {d.get('use_post_quant_conv')}")
    known = _DIFFUSERS_IGNORED | {"down_block_types", "up_block_types", "act_fn", "use_quant_conv",
                                  "use_post_quant_conv", "in_channels", "out_channels", "block_out_channels",
                                  "layers_per_block", "latent_channels", "norm_num_groups", "sample_size",
                                  "scaling_factor", "shift_factor", "mid_block_add_attention"}
    unknown = sorted(set(d) - known)
    if unknown:
        warnings.warn(f"ignoring diffusers AutoencoderKL config keys {unknown}")
    widths = list(d.get("block_out_channels", [64]))
    if any(w % widths[0] for w in widths):
        raise ValueError(f"block_out_channels {widths} must all be multiples of the first entry")
    if len(d.get("down_block_types", widths)) != len(widths):
        raise ValueError(f"down_block_types has {len(d['down_block_types'])} entries, "
                         f"block_out_channels has {len(widths)}")
    sample_size = d.get("sample_size", 32)
    return AutoencoderConfig(
        in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
        base_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=d.get("layers_per_block", 1), z_channels=d.get("latent_channels", 4),
        resolution=sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size,
        num_groups=d.get("norm_num_groups", 32), mid_attn=d.get("mid_block_add_attention", True),
        use_quant_conv=d.get("use_quant_conv", True),
        scaling_factor=d.get("scaling_factor", 0.18215), shift_factor=d.get("shift_factor"),
    )


def diffusers_state_dict_to_ours(state: dict) -> dict:
    return {_rename(k, _DIFFUSERS_RULES): v for k, v in state.items()}


def _resolve_diffusers_dir(path_or_name: str | Path, subfolder: str | None) -> Path:
    """A local folder (with config.json here or under vae/), else a hub repo id via snapshot_download."""
    path = Path(path_or_name)
    if not path.exists():
        path = _snapshot(str(path_or_name), subfolder)
    if subfolder:
        path = path / subfolder
    elif not (path / DIFFUSERS_CONFIG).is_file() and (path / "vae" / DIFFUSERS_CONFIG).is_file():
        path = path / "vae"                                          # a full pipeline folder
    if not (path / DIFFUSERS_CONFIG).is_file():                     # the weights: load_diffusers_autoencoder
        raise FileNotFoundError(f"{path / DIFFUSERS_CONFIG} not found; expected a diffusers AutoencoderKL folder "
                                f"with {DIFFUSERS_CONFIG} and {DIFFUSERS_WEIGHTS}")
    return path


def _snapshot(repo_id: str, subfolder: str | None) -> Path:
    """Download (or, offline, find in the local cache) only the VAE config and safetensors."""
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder}/" if subfolder else ""
    patterns = [prefix + DIFFUSERS_CONFIG, prefix + DIFFUSERS_WEIGHTS]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # no network, rate limit, ...: the cache may still hold it
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:
            raise FileNotFoundError(f"{repo_id!r} is neither a local folder nor downloadable "
                                    f"({type(err).__name__}: {err}) nor in the local HF cache") from err


def load_diffusers_autoencoder(path_or_name: str | Path, subfolder: str | None = None, variant: str | None = None,
                               **config_overrides) -> AutoencoderKL:
    """diffusers AutoencoderKL folder (or hub repo id) -> our AutoencoderKL in fp32 on CPU; `variant` (e.g.
    "fp16") reads diffusion_pytorch_model.<variant>.safetensors (or its shards)."""
    from ldm.models.convert_unet import _read_weights

    path = _resolve_diffusers_dir(path_or_name, subfolder)
    raw = json.loads((path / DIFFUSERS_CONFIG).read_text())
    config = diffusers_config_to_ours(raw)
    unknown = sorted(set(config_overrides) - {f.name for f in dataclasses.fields(config)})
    if unknown:
        raise ValueError(f"unknown AutoencoderConfig overrides {unknown}")
    config = dataclasses.replace(config, **config_overrides)          # re-validates
    model = AutoencoderKL(config)
    state = diffusers_state_dict_to_ours(_read_weights(str(path), variant))
    load_state_dict_strict(model, {k: v.float() for k, v in state.items()}, source=str(path))
    return model


# ----------------------------------------------------------------------------
# CompVis / original Stable Diffusion.

def compvis_state_dict_to_ours(state: dict, num_levels: int) -> dict:
    """Rename CompVis VAE keys (prefix already stripped) to ours; 1x1-conv attention weights become Linear."""
    out = {}
    for key, value in state.items():
        m = re.match(r"decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.*)", key)
        if m:  # CompVis indexes decoder levels by resolution; ours run lowest resolution first
            level = num_levels - 1 - int(m.group(1))
            inner = f"res.{m.group(3)}" if m.group(3) is not None else "resample"
            key = f"decoder.up.{level}.{inner}.{m.group(4)}"
        key = _rename(key, _COMPVIS_RULES)
        if re.search(r"attn\.(q|k|v|proj)\.weight$", key) and value.dim() == 4:
            value = value[:, :, 0, 0]                                # (C, C, 1, 1) -> (C, C)
        out[key] = value
    return out


def _strip_compvis_prefix(state: dict) -> dict:
    """Keep the VAE from a full SD checkpoint (`first_stage_model.*`) or a bare VAE file; drop loss.*."""
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    # LDM's VAE training checkpoints carry the discriminator and LPIPS under loss.*
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


def read_checkpoint(path: Path) -> dict:
    """An SD / LDM checkpoint file's state dict: .safetensors, or a .ckpt pickle (its "state_dict")."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    # .ckpt files are pickles: weights_only refuses anything but tensors and plain containers.
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def load_compvis_autoencoder(state_dict_or_file: dict | str | Path,
                             config: AutoencoderConfig) -> AutoencoderKL:
    """CompVis / original SD checkpoint (dict, .safetensors or .ckpt) -> our AutoencoderKL, all-or-nothing."""
    if isinstance(state_dict_or_file, dict):
        state, source = state_dict_or_file, "the given state dict"
    else:
        path = Path(state_dict_or_file)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} not found")
        state, source = read_checkpoint(path), str(path)
    state = compvis_state_dict_to_ours(_strip_compvis_prefix(state), len(config.channel_mult))
    model = AutoencoderKL(config)
    load_state_dict_strict(model, {k: v.float() for k, v in state.items()}, source=source)
    return model
