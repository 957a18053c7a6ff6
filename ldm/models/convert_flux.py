"""Load FLUX.1 transformers released in the diffusers layout (FluxTransformer2DModel).

The same tensors under other names: diffusers' config maps onto FluxConfig and its keys onto ours
(`diffusers_to_ours`; back: `ours_to_diffusers`); loading is all-or-nothing. Every tensor maps 1:1: diffusers'
x_embedder and proj_out act on packed 2 x 2 patches (in_channels 64 = 16 latent channels x 4), and so do our
patch_embed and proj_out; only the packing moved into our forward, so diffusers' in/out channels are 4x ours
and its patch_size must be 1 (the pipeline packs).
"""
from __future__ import annotations

import re

from ldm.models.convert_mmdit import BLOCK, load_diffusers_transformer
from ldm.models.flux import PATCH, Flux, FluxConfig

CLASS_NAME = "FluxTransformer2DModel"
# diffusers config key -> ours; in/out channels are divided by PATCH^2 (packed -> latent channels)
_CONFIG_KEYS = {
    "in_channels": "in_channels", "out_channels": "out_channels", "num_layers": "depth_double",
    "num_single_layers": "depth_single", "num_attention_heads": "num_heads", "attention_head_dim": "head_dim",
    "joint_attention_dim": "context_dim", "pooled_projection_dim": "pooled_dim",
    "guidance_embeds": "guidance_embeds", "axes_dims_rope": "axes_dims_rope",
}


def _latent_channels(key: str, packed: int) -> int:
    if packed % (PATCH * PATCH):
        raise ValueError(f"diffusers config {key}={packed}: not a packed 2 x 2 channel count (divisible by 4)")
    return packed // (PATCH * PATCH)


def flux_config_from_diffusers(d: dict) -> FluxConfig:
    """Map a diffusers FluxTransformer2DModel config.json dict onto FluxConfig; other keys are refused."""
    if d.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise ValueError(f"diffusers config _class_name={d['_class_name']!r}: not a {CLASS_NAME}")
    unknown = sorted(k for k in d if k not in _CONFIG_KEYS and k != "patch_size" and not k.startswith("_"))
    if unknown:
        raise ValueError(f"diffusers config keys {unknown} are not supported by Flux")
    if d.get("patch_size", 1) != 1:
        raise ValueError(f"diffusers config patch_size={d['patch_size']} is not supported: FLUX.1 packs 2 x 2 "
                         "patches before the transformer (patch_size 1)")
    ours = {_CONFIG_KEYS[k]: v for k, v in d.items() if k in _CONFIG_KEYS}
    in_packed = d.get("in_channels", 64)
    out_packed = d.get("out_channels") or in_packed
    ours["in_channels"] = _latent_channels("in_channels", in_packed)
    ours["out_channels"] = _latent_channels("out_channels", out_packed)
    return FluxConfig(**ours)


# ---- key renaming ----------------------------------------------------------------------------

TOP = {"x_embedder.": "patch_embed.", "context_embedder.": "context_embed.",
       "time_text_embed.timestep_embedder.linear_1.": "time_embed.fc1.",
       "time_text_embed.timestep_embedder.linear_2.": "time_embed.fc2.",
       "time_text_embed.guidance_embedder.linear_1.": "guidance_embed.fc1.",
       "time_text_embed.guidance_embedder.linear_2.": "guidance_embed.fc2.",
       "time_text_embed.text_embedder.linear_1.": "pooled_embed.fc1.",
       "time_text_embed.text_embedder.linear_2.": "pooled_embed.fc2.",
       "norm_out.linear.": "final_mod.", "proj_out.": "proj_out."}
DOUBLE = {k: v for k, v in BLOCK.items() if not k.startswith("attn2.")}   # SD3's joint block, no MMDiT-X
SINGLE = {"norm.linear.": "mod.", "attn.to_q.": "q.", "attn.to_k.": "k.", "attn.to_v.": "v.",
          "attn.norm_q.": "q_norm.", "attn.norm_k.": "k_norm.", "proj_mlp.": "mlp_in.", "proj_out.": "out."}
# block list name -> (the other side's name, its per-block table)
_BLOCKS = {"transformer_blocks": ("double_blocks", DOUBLE), "single_transformer_blocks": ("single_blocks", SINGLE)}
_BLOCKS_BACK = {ours: (theirs, {v: k for k, v in table.items()}) for theirs, (ours, table) in _BLOCKS.items()}
_TOP_BACK = {v: k for k, v in TOP.items()}
_BLOCK_KEY = re.compile(r"([a-z_]+)\.(\d+)\.(.*)")


def _rename(key: str, top: dict, blocks: dict) -> str:
    """Map one key through the top-level or a per-block table; an unknown key passes through."""
    for old, new in top.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = _BLOCK_KEY.fullmatch(key)
    if m and m.group(1) in blocks:
        prefix, table = blocks[m.group(1)]
        for old, new in table.items():
            if m.group(3).startswith(old):
                return f"{prefix}.{m.group(2)}.{new}{m.group(3)[len(old):]}"
    return key


def diffusers_to_ours(state: dict) -> dict:
    """Rename diffusers FluxTransformer2DModel keys; unknown keys pass through (the loader reports them)."""
    return {_rename(k, TOP, _BLOCKS): v for k, v in state.items()}


def ours_to_diffusers(state: dict) -> dict:
    """Inverse of diffusers_to_ours."""
    return {_rename(k, _TOP_BACK, _BLOCKS_BACK): v for k, v in state.items()}


# ---- loader ----------------------------------------------------------------------------------

def load_diffusers_flux(path: str, subfolder: str | None = None, variant: str | None = None,
                        local_files_only: bool = False) -> Flux:
    """Our Flux from a diffusers FluxTransformer2DModel folder, a pipeline folder with transformer/, or a hub id."""
    return load_diffusers_transformer(path, subfolder, variant, local_files_only, flux_config_from_diffusers,
                                      diffusers_to_ours, Flux, "load_diffusers_flux")
