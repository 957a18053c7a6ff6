"""Load FLUX.1 transformers released in the diffusers layout (FluxTransformer2DModel).

The same tensors under other names: diffusers' config maps onto FluxConfig and its keys onto ours
(`diffusers_to_ours`; back: `ours_to_diffusers`); loading is all-or-nothing. Every tensor maps 1:1: diffusers'
x_embedder and proj_out act on packed 2 x 2 patches (in_channels 64 = 16 latent channels x 4), and so do our
patch_embed and proj_out; only the packing moved into our forward, so diffusers' in/out channels are 4x ours
and its patch_size must be 1 (the pipeline packs).
"""
from __future__ import annotations

import re

import torch

from ldm.models.convert_mmdit import BLOCK, load_diffusers_transformer
from ldm.models.flux import PATCH, Flux, FluxConfig
from ldm.models.weights import load_state_dict_strict

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


def flux_config_to_diffusers(cfg: FluxConfig) -> dict:
    """FluxConfig -> a FluxTransformer2DModel config.json dict (inverse of flux_config_from_diffusers): packed
    channel counts (4x ours), patch_size 1."""
    if cfg.rope_theta != 10000.0:
        raise ValueError(f"FluxConfig.rope_theta={cfg.rope_theta:g}: diffusers' {CLASS_NAME} has RoPE base 10000 "
                         "built in")
    d = {theirs: getattr(cfg, ours) for theirs, ours in _CONFIG_KEYS.items()}
    d.update(in_channels=cfg.in_channels * PATCH * PATCH, out_channels=cfg.out_channels * PATCH * PATCH,
             axes_dims_rope=list(cfg.axes_dims_rope))
    return {"_class_name": CLASS_NAME, "patch_size": 1, **d}


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


# ---- FLUX.1's original layout (Black Forest Labs' files, kohya / sd-scripts, ComfyUI) -----------

# BFL's module names -> diffusers'. A double block's fused img_attn.qkv / txt_attn.qkv is three projections (its
# thirds of rows); a single block's linear1 is q, k, v and the MLP's input, [D, D, D, 4D] rows in that order.
# The RMSNorms keep their gain under `.scale` where diffusers has `.weight`.
ORIGINAL_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
                "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
                "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
                "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
                "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
                "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
                "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
                "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
ORIGINAL_DOUBLE = {  # double_blocks.N.<key> -> transformer_blocks.N.<value(s)>; img: image stream, txt: text
    "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.proj": ("attn.to_out.0",),
    "img_attn.norm.query_norm": ("attn.norm_q",), "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn.proj": ("attn.to_add_out",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",), "txt_attn.norm.key_norm": ("attn.norm_added_k",),
    "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",)}
ORIGINAL_SINGLE = {  # single_blocks.N.<key> -> single_transformer_blocks.N.<value(s)>
    "modulation.lin": ("norm.linear",), "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",), "norm.query_norm": ("attn.norm_q",), "norm.key_norm": ("attn.norm_k",)}
_ORIGINAL_BLOCKS = {"double_blocks": ("transformer_blocks", ORIGINAL_DOUBLE),
                    "single_blocks": ("single_transformer_blocks", ORIGINAL_SINGLE)}
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")   # full checkpoints (ComfyUI), some LoRA files
MLP_RATIO = 4                                                        # every FLUX.1: the MLP is 4 x the width


def original_modules(module: str) -> list[str] | None:
    """The diffusers module(s) a BFL module's rows split into, in row order (a fused qkv: three; a single block's
    linear1: four, see `original_row_split`), or None when `module` is not one of FLUX.1's original names."""
    m = _BLOCK_KEY.fullmatch(module)
    if m and m.group(1) in _ORIGINAL_BLOCKS:
        theirs, table = _ORIGINAL_BLOCKS[m.group(1)]
        if m.group(3) in table:
            return [f"{theirs}.{m.group(2)}.{t}" for t in table[m.group(3)]]
        return None
    return [ORIGINAL_TOP[module]] if module in ORIGINAL_TOP else None


def original_row_split(module: str, rows: int) -> list[int]:
    """Row counts of the parts of a BFL module with `rows` output rows: a single block's linear1 is
    [D, D, D, 4D] (D = rows / 7), a fused qkv three equal thirds, anything else whole."""
    parts = original_modules(module) or [module]
    if module.endswith(".linear1"):
        if rows % (3 + MLP_RATIO):
            raise ValueError(f"{module}: {rows} rows are not q, k, v and a {MLP_RATIO}x MLP input")
        d = rows // (3 + MLP_RATIO)
        return [d, d, d, MLP_RATIO * d]
    if rows % len(parts):
        raise ValueError(f"{module}: {rows} rows do not split into {len(parts)} equal parts")
    return [rows // len(parts)] * len(parts)


def original_swaps_halves(module: str) -> bool:
    """BFL's final layer holds (shift, scale) rows where diffusers' AdaLayerNormContinuous holds (scale, shift)."""
    return module == "final_layer.adaLN_modulation.1"


def strip_original_prefix(state: dict) -> dict:
    """A BFL state dict without a full checkpoint's `model.diffusion_model.` (or `diffusion_model.`) prefix; keys
    outside it (a bundled VAE or text encoders) are dropped."""
    for prefix in ORIGINAL_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def original_to_diffusers(state: dict) -> dict:
    """FLUX.1's original tensors (prefix stripped) under diffusers' names: fused projections split by rows, the
    final (shift, scale) halves swapped, `.scale` gains as `.weight`; unknown keys pass through (the loader
    reports them)."""
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        theirs = original_modules(module)
        if theirs is None:
            out[key] = value
            continue
        if original_swaps_halves(module):
            value = torch.cat(value.chunk(2)[::-1])
        param = "weight" if param == "scale" else param
        for name, rows in zip(theirs, value.split(original_row_split(module, value.shape[0]))):
            out[f"{name}.{param}"] = rows
    return out


def flux_config_from_original(state: dict, axes_dims_rope: tuple[int, ...] | None = None) -> FluxConfig:
    """FLUX.1's sizes read off its original tensors (prefix stripped), as BFL's files carry no config: width and
    latent channels from img_in, head size from the query norm's gain, depths from the block indices, the text
    widths from txt_in / vector_in, dev's guidance input where guidance_in is present. axes_dims_rope: RoPE's
    channels per axis, (16, 56, 56) for every released FLUX.1 (128-channel heads)."""
    needed = ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight",
              "double_blocks.0.img_attn.norm.query_norm.scale")
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"FLUX.1 transformer: the weights lack {missing}")
    width, packed_in = state["img_in.weight"].shape
    head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    depths = {}
    for name in _ORIGINAL_BLOCKS:
        blocks = {int(m.group(2)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(1) == name}
        if blocks != set(range(len(blocks))):
            raise ValueError(f"FLUX.1 transformer: {name} {sorted(blocks)} are not 0..{len(blocks) - 1}")
        depths[name] = len(blocks)
    if axes_dims_rope is None and head_dim != sum(FluxConfig.axes_dims_rope):
        raise ValueError(f"FLUX.1 transformer: {head_dim}-channel heads, not FLUX.1's 128; give its "
                         "FluxTransformer2DModel config.json (axes_dims_rope)")
    return FluxConfig(
        in_channels=_latent_channels("img_in", packed_in),
        out_channels=_latent_channels("final_layer.linear", state["final_layer.linear.weight"].shape[0]),
        depth_double=depths["double_blocks"], depth_single=depths["single_blocks"],
        num_heads=width // head_dim, head_dim=head_dim, context_dim=state["txt_in.weight"].shape[1],
        pooled_dim=state["vector_in.in_layer.weight"].shape[1],
        guidance_embeds="guidance_in.in_layer.weight" in state,
        **({} if axes_dims_rope is None else {"axes_dims_rope": tuple(axes_dims_rope)}))


def load_original_flux(state: dict, cfg: FluxConfig | None = None, source: str = "FLUX.1 checkpoint") -> Flux:
    """Our Flux from FLUX.1's original tensors (either prefix or none), all-or-nothing; cfg: read off them."""
    state = strip_original_prefix(state)
    model = Flux(cfg or flux_config_from_original(state))
    load_state_dict_strict(model, diffusers_to_ours(original_to_diffusers(state)), source)
    return model
