"""Load Stable Diffusion 3 / 3.5 transformers released in the diffusers layout (SD3Transformer2DModel).

The same tensors under other names: diffusers' config maps onto MMDiTConfig and its keys onto ours
(`diffusers_to_ours`; back for an export: `mmdit_config_to_diffusers`, `ours_to_diffusers`); loading is
all-or-nothing. SD3's original layout (Stability AI's single files: fused qkv, (shift, scale) modulations) maps
onto diffusers' names (`original_to_diffusers`, tables shared with ldm.models.lora) and its sizes read off
the tensors (`mmdit_config_from_original`).

One diffusers tensor has no counterpart: the last block's text query projection (and its q-norm gain).
Its text tokens' outputs are thrown away there, so that projection never reaches the output; we drop
it, and `ours_to_diffusers` writes zeros (and unit gains) in its place.
"""
from __future__ import annotations

import json
import os
import re

import torch

from ldm.models.convert_unet import _read_weights, _resolve_diffusers_dir
from ldm.models.mmdit import MMDiT, MMDiTConfig
from ldm.models.weights import load_state_dict_strict

# diffusers config key -> ours
_CONFIG_KEYS = {
    "in_channels": "in_channels", "out_channels": "out_channels", "patch_size": "patch_size",
    "num_layers": "depth", "num_attention_heads": "num_heads", "attention_head_dim": "head_dim",
    "joint_attention_dim": "context_dim", "caption_projection_dim": "caption_dim",
    "pooled_projection_dim": "pooled_dim", "pos_embed_max_size": "pos_embed_max_size",
    "sample_size": "sample_size", "qk_norm": "qk_norm", "dual_attention_layers": "dual_attention_layers",
}
CLASS_NAME = "SD3Transformer2DModel"


def mmdit_config_from_diffusers(d: dict) -> MMDiTConfig:
    """Map a diffusers SD3Transformer2DModel config.json dict onto MMDiTConfig; other keys are refused."""
    if d.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise ValueError(f"diffusers config _class_name={d['_class_name']!r}: not an {CLASS_NAME}")
    unknown = sorted(k for k in d if k not in _CONFIG_KEYS and not k.startswith("_"))
    if unknown:
        raise ValueError(f"diffusers config keys {unknown} are not supported by MMDiT")
    if d.get("pos_embed_max_size", 96) is None:
        raise ValueError("diffusers config pos_embed_max_size=None is not supported (SD3's cropped table needs it)")
    ours = {_CONFIG_KEYS[k]: v for k, v in d.items() if k in _CONFIG_KEYS}
    if ours.get("out_channels", 0) is None:
        ours["out_channels"] = ours.get("in_channels", MMDiTConfig.in_channels)
    return MMDiTConfig(**ours)


def mmdit_config_to_diffusers(cfg: MMDiTConfig) -> dict:
    """MMDiTConfig -> an SD3Transformer2DModel config.json dict (inverse of mmdit_config_from_diffusers)."""
    if not cfg.pooled_dim:
        raise ValueError("an MMDiT without pooled text (pooled_dim=0) has no SD3Transformer2DModel counterpart: "
                         "SD3's transformer always adds the pooled text to its time embedding")
    d = {theirs: getattr(cfg, ours) for theirs, ours in _CONFIG_KEYS.items()}
    d["dual_attention_layers"] = list(cfg.dual_attention_layers)
    return {"_class_name": CLASS_NAME, **d}


# ---- key renaming ----------------------------------------------------------------------------

TOP = {"pos_embed.proj.": "patch_embed.", "pos_embed.pos_embed": "pos_embed",
       "time_text_embed.timestep_embedder.linear_1.": "time_embed.fc1.",
       "time_text_embed.timestep_embedder.linear_2.": "time_embed.fc2.",
       "time_text_embed.text_embedder.linear_1.": "pooled_embed.fc1.",
       "time_text_embed.text_embedder.linear_2.": "pooled_embed.fc2.",
       "context_embedder.": "context_embed.", "norm_out.linear.": "final_mod.", "proj_out.": "proj_out."}
BLOCK = {"norm1.linear.": "image.mod.", "norm1_context.linear.": "text.mod.",
         "attn.to_q.": "image.attn.q.", "attn.to_k.": "image.attn.k.", "attn.to_v.": "image.attn.v.",
         "attn.norm_q.": "image.attn.q_norm.", "attn.norm_k.": "image.attn.k_norm.",
         "attn.to_out.0.": "image.attn.out.",
         "attn.add_q_proj.": "text.attn.q.", "attn.add_k_proj.": "text.attn.k.", "attn.add_v_proj.": "text.attn.v.",
         "attn.norm_added_q.": "text.attn.q_norm.", "attn.norm_added_k.": "text.attn.k_norm.",
         "attn.to_add_out.": "text.attn.out.",
         "attn2.to_q.": "self_attn.q.", "attn2.to_k.": "self_attn.k.", "attn2.to_v.": "self_attn.v.",
         "attn2.norm_q.": "self_attn.q_norm.", "attn2.norm_k.": "self_attn.k_norm.",
         "attn2.to_out.0.": "self_attn.out.",
         "ff.net.0.proj.": "image.mlp.fc1.", "ff.net.2.": "image.mlp.fc2.",
         "ff_context.net.0.proj.": "text.mlp.fc1.", "ff_context.net.2.": "text.mlp.fc2."}
_DEAD = ("attn.add_q_proj.", "attn.norm_added_q.")   # the last block's unused text query (module docstring)
_BLOCK_KEY = re.compile(r"(transformer_blocks|blocks)\.(\d+)\.(.*)")


def _rename(key: str, top: dict, block: dict, ours_prefix: str) -> str:
    """Map one key through the top-level or the per-block table; an unknown key passes through."""
    for old, new in top.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = _BLOCK_KEY.fullmatch(key)
    if m:
        for old, new in block.items():
            if m.group(3).startswith(old):
                return f"{ours_prefix}.{m.group(2)}.{new}{m.group(3)[len(old):]}"
    return key


def _pre_only_blocks(state: dict, prefix: str, out: str) -> set[str]:
    """Indices of the blocks `prefix.i.*` in `state` without the text output projection `out`: the last one."""
    blocks = {m.group(2) for k in state if (m := _BLOCK_KEY.fullmatch(k)) and m.group(1) == prefix}
    return {i for i in blocks if f"{prefix}.{i}.{out}weight" not in state}


def diffusers_to_ours(state: dict) -> dict:
    """Rename diffusers SD3Transformer2DModel keys; unknown keys pass through (the loader reports them)."""
    last = _pre_only_blocks(state, "transformer_blocks", "attn.to_add_out.")
    out = {}
    for key, value in state.items():
        m = _BLOCK_KEY.fullmatch(key)
        if m and m.group(1) == "transformer_blocks" and m.group(2) in last and m.group(3).startswith(_DEAD):
            continue
        if key == "pos_embed.pos_embed":   # (1, M * M, D) -> (M, M, D)
            side = round(value.shape[1] ** 0.5)
            value = value.reshape(side, side, value.shape[-1])
        out[_rename(key, TOP, BLOCK, "blocks")] = value
    return out


_TOP_BACK, _BLOCK_BACK = {v: k for k, v in TOP.items()}, {v: k for k, v in BLOCK.items()}


def ours_to_diffusers_key(key: str) -> str:
    """One key of ours -> diffusers' name for it (a LoRA file names modules so: `name.weight` in, out)."""
    return _rename(key, _TOP_BACK, _BLOCK_BACK, "transformer_blocks")


def ours_to_diffusers(state: dict) -> dict:
    """Inverse of diffusers_to_ours; the last block's dropped text query comes back as zeros (unit q-norm gain)."""
    out = {}
    for key, value in state.items():
        if key == "pos_embed":
            value = value.reshape(1, -1, value.shape[-1])
        out[ours_to_diffusers_key(key)] = value
    for i in _pre_only_blocks(state, "blocks", "text.attn.out."):
        k, k_norm = state[f"blocks.{i}.text.attn.k.weight"], state.get(f"blocks.{i}.text.attn.k_norm.weight")
        out[f"transformer_blocks.{i}.attn.add_q_proj.weight"] = k.new_zeros(k.shape)
        out[f"transformer_blocks.{i}.attn.add_q_proj.bias"] = k.new_zeros(k.shape[0])
        if k_norm is not None:
            out[f"transformer_blocks.{i}.attn.norm_added_q.weight"] = k_norm.new_ones(k_norm.shape)
    return out


# ---- loader ----------------------------------------------------------------------------------

def load_diffusers_transformer(path: str, subfolder: str | None, variant: str | None, local_files_only: bool,
                               config_from, rename, net_class, what: str):
    """A diffusers transformer folder (or a pipeline folder with transformer/, or a hub id) as our `net_class`:
    its config.json through `config_from`, its weights renamed by `rename`, loaded all or nothing."""
    if not os.path.isdir(path) and (os.path.exists(path) or path.count("/") != 1):
        raise FileNotFoundError(f"{what}: {path!r} is neither a folder nor a hub repo id 'org/name'")
    if subfolder is None and not os.path.isfile(os.path.join(path, "config.json")):
        subfolder = "transformer"   # a pipeline (folder or hub repo) keeps it there
    directory = _resolve_diffusers_dir(path, subfolder, local_files_only)
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{what}: missing {config_path}")
    with open(config_path) as f:
        model = net_class(config_from(json.load(f)))
    load_state_dict_strict(model, rename(_read_weights(directory, variant)), directory)
    return model


def load_diffusers_mmdit(path: str, subfolder: str | None = None, variant: str | None = None,
                         local_files_only: bool = False) -> MMDiT:
    """Our MMDiT from a diffusers SD3Transformer2DModel folder, a pipeline folder with transformer/, or a hub id."""
    return load_diffusers_transformer(path, subfolder, variant, local_files_only, mmdit_config_from_diffusers,
                                      diffusers_to_ours, MMDiT, "load_diffusers_mmdit")


# ---- SD3's original layout (Stability AI's single files, sd-scripts, ComfyUI) ------------------

# SD3's original module names -> diffusers', as diffusers' scripts/convert_sd3_to_diffusers.py moves the weights:
# a fused attn.qkv is three projections (its thirds of rows). The file's `pos_embed` is diffusers' pos_embed.pos_embed.
SD3_ORIGINAL_TOP = {"x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
                    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
                    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
                    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
                    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
                    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
SD3_ORIGINAL_BLOCK = {  # joint_blocks.N.<key> -> transformer_blocks.N.<value(s)>; x_block: image, context_block: text
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "x_block.attn.proj": ("attn.to_out.0",),
    "x_block.attn.ln_q": ("attn.norm_q",), "x_block.attn.ln_k": ("attn.norm_k",),          # SD3.5's qk norm
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.attn2.ln_q": ("attn2.norm_q",), "x_block.attn2.ln_k": ("attn2.norm_k",),      # SD3.5 medium
    "x_block.mlp.fc1": ("ff.net.0.proj",), "x_block.mlp.fc2": ("ff.net.2",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.proj": ("attn.to_add_out",),
    "context_block.attn.ln_q": ("attn.norm_added_q",), "context_block.attn.ln_k": ("attn.norm_added_k",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",), "context_block.mlp.fc2": ("ff_context.net.2",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",)}
SD3_JOINT_BLOCK = re.compile(r"joint_blocks\.(\d+)\.(.+)")
SD3_HEAD_DIM = 64                     # every SD3 and SD 3.5 transformer: heads = width / 64


def original_swaps_halves(module: str, last: int) -> bool:
    """Whether SD3's original `module` holds (shift, scale) rows where diffusers holds (scale, shift): the final
    layer's modulation and that of the last block's text stream (`last`: its index), AdaLayerNormContinuous there."""
    m = SD3_JOINT_BLOCK.fullmatch(module)
    if m:
        return m.group(2) == "context_block.adaLN_modulation.1" and int(m.group(1)) == last
    return module == "final_layer.adaLN_modulation.1"


def original_modules(module: str) -> list[str] | None:
    """The diffusers module(s) an SD3-original module's rows split into (a fused qkv: three, in order), or None
    when `module` is not one of SD3's original names."""
    m = SD3_JOINT_BLOCK.fullmatch(module)
    if m and m.group(2) in SD3_ORIGINAL_BLOCK:
        return [f"transformer_blocks.{m.group(1)}.{t}" for t in SD3_ORIGINAL_BLOCK[m.group(2)]]
    return [SD3_ORIGINAL_TOP[module]] if module in SD3_ORIGINAL_TOP else None


def original_to_diffusers(state: dict) -> dict:
    """SD3's original tensors (the `model.diffusion_model.` prefix stripped) under diffusers' names: fused qkv
    split in thirds, (shift, scale) halves swapped; unknown keys pass through (the loader reports them)."""
    last = max((int(m.group(1)) for k in state if (m := SD3_JOINT_BLOCK.match(k))), default=-1)
    out = {}
    for key, value in state.items():
        if key == "pos_embed":                        # a buffer (1, M * M, D), no module of its own
            out["pos_embed.pos_embed"] = value
            continue
        module, _, param = key.rpartition(".")
        theirs = original_modules(module)
        if theirs is None:
            out[key] = value
            continue
        if original_swaps_halves(module, last):
            value = torch.cat(value.chunk(2)[::-1])
        for name, rows in zip(theirs, value.chunk(len(theirs))):
            out[f"{name}.{param}"] = rows
    return out


def mmdit_config_from_original(state: dict, sample_size: int = 128) -> MMDiTConfig:
    """SD3's sizes read off its original tensors (prefix stripped), as no single file carries a config: width,
    latent channels and patch from x_embedder, depth from the joint blocks, 64-channel heads, text widths from
    the embedders, the position table's side, qk norm (ln_q) and dual attention (attn2) where present."""
    needed = ("x_embedder.proj.weight", "pos_embed", "context_embedder.weight", "y_embedder.mlp.0.weight",
              "final_layer.linear.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"SD3 transformer: the weights lack {missing}")
    width, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    if width % SD3_HEAD_DIM:
        raise ValueError(f"SD3 transformer: width {width} is no multiple of {SD3_HEAD_DIM}-channel heads; give its "
                         "SD3Transformer2DModel config.json")
    blocks = {int(m.group(1)) for k in state if (m := SD3_JOINT_BLOCK.match(k))}
    if blocks != set(range(len(blocks))):
        raise ValueError(f"SD3 transformer: joint_blocks {sorted(blocks)} are not 0..{len(blocks) - 1}")
    context = state["context_embedder.weight"]
    return MMDiTConfig(
        in_channels=in_channels, out_channels=state["final_layer.linear.weight"].shape[0] // patch ** 2,
        patch_size=patch, depth=len(blocks), num_heads=width // SD3_HEAD_DIM, head_dim=SD3_HEAD_DIM,
        context_dim=context.shape[1], caption_dim=context.shape[0],
        pooled_dim=state["y_embedder.mlp.0.weight"].shape[1],
        pos_embed_max_size=round(state["pos_embed"].shape[1] ** 0.5), sample_size=sample_size,
        qk_norm="rms_norm" if any(".attn.ln_q." in k for k in state) else None,
        dual_attention_layers=sorted({int(m.group(1)) for k in state if (m := SD3_JOINT_BLOCK.match(k))
                                      and m.group(2).startswith("x_block.attn2.")}))


def load_original_mmdit(state: dict, cfg: MMDiTConfig | None = None, source: str = "SD3 checkpoint") -> MMDiT:
    """Our MMDiT from SD3's original tensors (prefix stripped), all-or-nothing; cfg: read off them by default."""
    model = MMDiT(cfg or mmdit_config_from_original(state))
    load_state_dict_strict(model, diffusers_to_ours(original_to_diffusers(state)), source)
    return model
