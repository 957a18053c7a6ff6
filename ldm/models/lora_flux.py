"""FLUX.1 LoRA files on our Flux (ldm.models.flux): each module a file names -> our layer(s), for lora.merge_lora.

`read_lora` has split the file into {module: Update} (its 'unet' part), the module in one of four namings:
    diffusers / peft   `transformer.<FluxTransformer2DModel module>.lora_A.weight` / `.lora_B.weight` (alpha from
                       the metadata), and `lora_transformer_<the same, _ for .>` (kohya-style trainers);
    kohya / sd-scripts `lora_unet_<FLUX.1's original (BFL) module, _ for .>.lora_down.weight` / `.lora_up.weight` /
                       `.alpha`: `lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`,
                       `lora_unet_final_layer_adaLN_modulation_1`, ...;
    BFL / ComfyUI      `diffusion_model.<BFL module>.lora_A.weight` / `.lora_B.weight`, or `.lora_down.weight` /
                       `.lora_up.weight` / `.alpha` (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`);
    XLabs              `double_blocks.N.processor.qkv_lora1.down.weight` / `.up.weight`: qkv_lora1 / proj_lora1 on
                       the image stream's img_attn.qkv / .proj, qkv_lora2 / proj_lora2 on the text stream's; a single
                       block's qkv_lora on the q, k, v rows of its linear1, proj_lora on its linear2; no alpha.
A BFL module that fuses several of ours (a double block's qkv: q, k, v; a single block's linear1: q, k, v and the
MLP's input, [D, D, D, 4D] rows: convert_flux.original_row_split) has its update cut by rows the same way: each
part keeps the whole down and the scale alpha / r of the stored down, which is the fused update sd-scripts and
ComfyUI add to the fused weight. final_layer.adaLN_modulation.1's (shift, scale) rows are swapped to our (scale,
shift) order first. A LoHa / LoKr / DoRA update (kohya's names only: `lora_unet_double_blocks_0_img_attn_qkv.lokr_w1`)
cannot be cut before dW is built: its parts go to the merge as one `lora.Rows`, the same parts in the same order.

Caution: diffusers 0.42's reader of kohya files keeps the block modules only (the top-level img_in, txt_in,
time_in, vector_in, guidance_in and final_layer come out without its `transformer.` prefix and are dropped), and
reads a single block's linear1 at FLUX.1's real width only; we apply every module, with alpha / r.
"""
from __future__ import annotations

import re

import torch

from ldm.models.convert_flux import diffusers_to_ours, original_modules, original_row_split, original_swaps_halves
from ldm.models.lora import Rows, Update

# XLabs' attention processors: (block kind, lora name) -> the BFL module it updates; a single block's qkv_lora
# covers only the first three of linear1's parts (q, k, v): diffusers_parts handles it apart.
XLABS = {("double", "qkv_lora1"): "img_attn.qkv", ("double", "proj_lora1"): "img_attn.proj",
         ("double", "qkv_lora2"): "txt_attn.qkv", ("double", "proj_lora2"): "txt_attn.proj",
         ("single", "proj_lora"): "linear2"}
_XLABS = re.compile(r"(double|single)_blocks\.(\d+)\.processor\.((?:qkv|proj)_lora[12]?)")


def flux_module(name: str) -> str:
    """A diffusers FluxTransformer2DModel module name -> ours (convert_flux's renaming; unknown names pass)."""
    return next(iter(diffusers_to_ours({f"{name}.weight": None}))).removesuffix(".weight")


def diffusers_parts(name: str, rows: int) -> tuple[list[str], list[int]]:
    """(the diffusers module(s), their row counts) that a file's module with `rows` output rows updates; a name
    that is neither BFL's nor XLabs' is taken as diffusers' own (a wrong one is refused by the merge)."""
    m = _XLABS.fullmatch(name)
    if m:
        kind, block, lora = m.groups()
        if (kind, lora) == ("single", "qkv_lora"):
            if rows % 3:
                raise ValueError(f"LoRA module {name!r}: up has {rows} rows, not q, k, v thirds")
            return original_modules(f"single_blocks.{block}.linear1")[:3], [rows // 3] * 3
        if (kind, lora) in XLABS:
            name = f"{kind}_blocks.{block}.{XLABS[kind, lora]}"
    theirs = original_modules(name)
    if theirs is None:
        return [name], [rows]
    try:
        return theirs, original_row_split(name, rows)
    except ValueError as err:
        raise ValueError(f"LoRA module {err}") from None


def flux_updates(lora: dict[str, Update]) -> list[tuple[str, str | Rows, Update]]:
    """(the file's module, ours, Update) for a LoRA on FLUX.1's transformer in any of the namings above; a fused
    BFL module gives one entry per part, each with its rows of up (a LoHa / LoKr / DoRA update: one entry, Rows)."""
    out = []
    for name, update in lora.items():
        if not isinstance(update, Update):     # kohya's names only: not XLabs', whose qkv_lora covers part of linear1
            theirs = original_modules(name) or [name]
            out.append((name, Rows(tuple(flux_module(t) for t in theirs), original_swaps_halves(name)), update))
            continue
        up = update.up
        if original_swaps_halves(name):
            if up.shape[0] % 2:
                raise ValueError(f"LoRA module {name!r}: up has {up.shape[0]} rows, not (shift, scale) halves")
            up = torch.cat(up.chunk(2)[::-1])
        theirs, rows = diffusers_parts(name, up.shape[0])
        for module, part in zip(theirs, up.split(rows)):
            out.append((name, flux_module(module), Update(update.down, part, update.scale)))
    return out


def refuse_t5(lora: dict, source: str) -> None:
    """FLUX.1's T5 is diffusers' text_encoder_2 (kohya: lora_te2_); its LoRA weights are not read."""
    if lora.get("text_encoder_2"):
        raise ValueError(f"{source}: has LoRA weights for FLUX.1's T5 text encoder (text_encoder_2 / lora_te2_), "
                         "which are not read; only its transformer and CLIP-L (text_encoder / lora_te1_)")
