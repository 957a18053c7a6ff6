"""LoRA: low-rank updates W + (alpha / r) B A of a model's weights (Hu et al. 2021, eq. 3).

Two uses:
- Sampling with LoRA files as people share them for Stable Diffusion 1.x/2.x, SDXL and SD3, merged into the
  weights (no cost per step): `read_lora` + `merge_lora` (the CLIs' `--lora FILE[:SCALE]`). Layouts read:
    diffusers / peft   `unet.<diffusers module>.lora_A.weight`, `.lora_B.weight` (alpha from the
                       safetensors metadata `lora_adapter_metadata`, else alpha = r), the older
                       `...attn1.processor.to_q_lora.down.weight` and `....lora.down.weight`, and
                       `text_encoder.<transformers module>...` for a CLIP text encoder (SDXL: and
                       `text_encoder_2.`);
    kohya / A1111      `lora_unet_<module with _ for .>.lora_down.weight`, `.lora_up.weight`,
                       `.alpha`, and `lora_te_...` (LoCon's conv layers included); the U-Net module in
                       diffusers' names or, as kohya writes SDXL's, in the original (CompVis / sgm)
                       ones (`lora_unet_input_blocks_4_1_...`); SDXL's encoders `lora_te1_`, `lora_te2_`.
  Stable Diffusion 3 (its MMDiT, ldm.models.mmdit; the same W += scale * alpha / r * up @ down):
    diffusers / peft   `transformer.<SD3Transformer2DModel module>.lora_A.weight`, `.lora_B.weight` (alpha
                       from the metadata's `transformer.lora_alpha`), as diffusers' save_lora_weights and its
                       dreambooth-lora-sd3 script write them; the CLIPs `text_encoder.` (ViT-L), `text_encoder_2.`
                       (bigG);
    kohya              `lora_transformer_<module>` or `lora_unet_<module>` in diffusers' names, and sd-scripts'
                       `lora_unet_joint_blocks_N_{x,context}_block_...` in SD3's original ones (`mmdit_updates`:
                       a fused attn.qkv update is its q, k, v thirds of rows; the scale is alpha over the rank of
                       the stored down, as sd-scripts' own loader and ComfyUI read it, a split_qkv file's
                       block-diagonal update included); the CLIPs `lora_te1_`, `lora_te2_`. T5
                       (`text_encoder_3.`, `lora_te3_`) is refused.
  FLUX.1 (its transformer, ldm.models.flux; the namings, fused modules and row splits: ldm.models.lora_flux):
    diffusers / peft   `transformer.<FluxTransformer2DModel module>.lora_A.weight`, `.lora_B.weight`, and
                       `lora_transformer_<the same>`;
    kohya / sd-scripts `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.lora_up.weight`, `.alpha`:
                       FLUX.1's original (BFL) names, a fused qkv / linear1 update cut into its parts' rows;
    BFL / ComfyUI      `diffusion_model.<BFL module>.lora_A.weight` / `.lora_B.weight` (or `.lora_down` / `.lora_up`
                       / `.alpha`);
    XLabs              `double_blocks.N.processor.qkv_lora1.down.weight`, `.up.weight` (1: image, 2: text);
    its CLIP-L `text_encoder.`, `lora_te1_`, `lora_te_`, `text_encoders.clip_l.transformer.`; its T5 (`text_encoder_2.`,
    `lora_te2_`, sd-scripts' `lora_te3_`, ComfyUI's `text_encoders.t5xxl.`) is refused.
  SD3: the last block's text query projection (diffusers' `transformer_blocks.LAST.attn.add_q_proj`, the q third
    of SD3's last `context_block.attn.qkv`) has no counterpart in our MMDiT and no effect on the output (that
    block's text outputs are discarded, convert_mmdit): its update is skipped.
  LyCORIS's LoHa and LoKr (`lora_unet_<module>.hada_w1_a`, `.lokr_w1`, ..., in kohya's names, mixed with plain
  LoRA modules or not): ldm.models.lycoris, read into `Factored` updates beside `Update`s, merged alike (SD 1.x/2.x,
  SDXL, the CLIPs, SD3's and FLUX.1's transformers in any of their namings above; on a fused module, sd-scripts'
  `lora_unet_double_blocks_0_img_attn_qkv.lokr_w1`, dW is built for the whole fused weight and its rows cut as a
  plain LoRA's up is: `Rows`, lycoris.fused_deltas).
  DoRA's magnitudes `.dora_scale` (LyCORIS, kohya's names) beside any of these: lycoris.Decomposed. peft's DoRA
  (`lora_magnitude_vector`) is refused by name, and so are what some files carry besides low-rank updates:
  whole-weight and bias differences (`.diff`, `.diff_b`), norm gains (`.scale`) and LoRA biases.
- Training in stage 2 (`lora.rank > 0`): `add_lora` wraps the attention projections in
  `LoRALinear` with the base frozen (an MMDiT: `mmdit_targets`, both streams' q, k, v, out by default, as
  diffusers' train_dreambooth_lora_sd3.py; a Flux: `flux_targets`, the same in its double blocks and the single
  blocks' q, k, v, as train_dreambooth_lora_flux.py); `lora_file_state` writes the result in diffusers' layout
  (`unet.`, or SD3's and FLUX.1's `transformer.`), so diffusers' `load_lora_weights` reads our files too, and
  `merged_state_dict` folds it into plain weights.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.models.convert_flux import ours_to_diffusers as flux_ours_to_diffusers
from ldm.models.convert_mmdit import original_modules, original_swaps_halves
from ldm.models.convert_mmdit import diffusers_to_ours as mmdit_diffusers_to_ours
from ldm.models.convert_mmdit import ours_to_diffusers_key as mmdit_ours_to_diffusers_key
from ldm.models.convert_unet import DIFFUSERS_TOP, RES_DIFFUSERS, TRANSFORMER_RENAMES, compvis_to_ours, diffusers_to_ours
from ldm.models.flux import Flux
from ldm.models.lycoris import KEYS as LYCORIS_KEYS
from ldm.models.lycoris import DORA_KEY, Decomposed, Factored, factored, fused_deltas
from ldm.models.mmdit import MMDiT
from ldm.models.text import clip_name

TRAIN_TARGETS = ("to_q", "to_k", "to_v", "to_out")   # our attention projections (diffusers: to_out.0)
METADATA_KEY = "lora_adapter_metadata"               # diffusers' safetensors metadata entry
# An MMDiT's targets by diffusers' SD3Transformer2DModel names (peft's target_modules; to_out.0 as to_out) -> the
# ends of our module names: image stream (to_*), text stream (add_*, to_add_out), SD 3.5 medium's second image
# attention (attn2.*), the feed-forwards.
MMDIT_TARGETS = {"to_q": "image.attn.q", "to_k": "image.attn.k", "to_v": "image.attn.v", "to_out": "image.attn.out",
                 "add_q_proj": "text.attn.q", "add_k_proj": "text.attn.k", "add_v_proj": "text.attn.v",
                 "to_add_out": "text.attn.out",
                 "attn2.to_q": "self_attn.q", "attn2.to_k": "self_attn.k", "attn2.to_v": "self_attn.v",
                 "attn2.to_out": "self_attn.out",
                 "ff.net.0.proj": "image.mlp.fc1", "ff.net.2": "image.mlp.fc2",
                 "ff_context.net.0.proj": "text.mlp.fc1", "ff_context.net.2": "text.mlp.fc2"}
MMDIT_TRAIN_TARGETS = tuple(list(MMDIT_TARGETS)[:8])   # both streams' attention: the SD3 LoRA script's default
# A Flux's targets by diffusers' FluxTransformer2DModel names -> the ends of our module names in its double-stream
# blocks and in its single-stream blocks (None: that kind of block has no such layer).
FLUX_TARGETS = {"to_q": ("image.attn.q", "q"), "to_k": ("image.attn.k", "k"), "to_v": ("image.attn.v", "v"),
                "to_out": ("image.attn.out", None), "add_q_proj": ("text.attn.q", None),
                "add_k_proj": ("text.attn.k", None), "add_v_proj": ("text.attn.v", None),
                "to_add_out": ("text.attn.out", None),
                "ff.net.0.proj": ("image.mlp.fc1", None), "ff.net.2": ("image.mlp.fc2", None),
                "ff_context.net.0.proj": ("text.mlp.fc1", None), "ff_context.net.2": ("text.mlp.fc2", None),
                "proj_mlp": (None, "mlp_in"), "proj_out": (None, "out")}
FLUX_TRAIN_TARGETS = tuple(list(FLUX_TARGETS)[:8])     # both streams' attention (the single blocks' q, k, v too)


# ----------------------------------------------------------------------------- training

class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * x A^T B^T with `base` frozen; B = 0 at the start, so the wrapped
    model starts as exactly the base model (Hu et al. 2021, Sec. 4.1)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as peft does

    def forward(self, x):  # (..., in) -> (..., out)
        return self.base(x) + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale

    def delta(self) -> torch.Tensor:
        """(out, in): what the update adds to base.weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=TRAIN_TARGETS) -> list[str]:
    """Freeze `model` and wrap every nn.Linear whose name ends in one of `targets` ("to_q", or dotted:
    "image.attn.q"); returns their names."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(f".{n}".endswith(f".{t}") for t in targets)]
    if not names:
        raise ValueError(f"add_lora: no nn.Linear named one of {tuple(targets)} in {type(model).__name__}")
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), rank, float(alpha or rank)))
    return names


def mmdit_targets(names) -> list[str]:
    """Stage 2's `lora.targets` for an MMDiT (MMDIT_TARGETS' keys, diffusers' names) -> add_lora's targets."""
    unknown = sorted(set(names) - set(MMDIT_TARGETS))
    if unknown or not names:
        raise ValueError(f"MMDiT LoRA targets: {unknown or 'empty'}; pick from {list(MMDIT_TARGETS)}")
    return [MMDIT_TARGETS[n] for n in names]


def flux_targets(names, cfg) -> list[str]:
    """Stage 2's `lora.targets` for a Flux (FLUX_TARGETS' keys, diffusers' names) with FluxConfig `cfg` -> add_lora's
    targets: whole module names, since a single block's q ends as a double block's does."""
    unknown = sorted(set(names) - set(FLUX_TARGETS))
    if unknown or not names:
        raise ValueError(f"Flux LoRA targets: {unknown or 'empty'}; pick from {list(FLUX_TARGETS)}")
    double, single = zip(*(FLUX_TARGETS[n] for n in names))
    return [f"double_blocks.{i}.{t}" for i in range(cfg.depth_double) for t in double if t] + \
        [f"single_blocks.{i}.{t}" for i in range(cfg.depth_single) for t in single if t]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model: each LoRALinear's base.weight + delta under the base's names."""
    wrapped = lora_modules(model)
    out = {}
    for key, value in model.state_dict().items():
        prefix, _, param = key.rpartition(".")
        if prefix in wrapped:
            continue                                       # lora_A / lora_B: folded below
        if prefix.endswith(".base") and prefix[:-5] in wrapped:
            name = prefix[:-5]
            if param == "weight":
                value = (value.float() + wrapped[name].delta()).to(value.dtype)
            key = f"{name}.{param}"
        out[key] = value
    return out


# convert_unet's diffusers -> ours tables, inverted (module names, so without the trailing dots)
_TOP = {ours[:-1]: theirs[:-1] for theirs, ours in DIFFUSERS_TOP.items()}
_INVERSE = {"res": tuple((f".{ours}.", f".{theirs}.") for theirs, ours in RES_DIFFUSERS.items()),
            "attn": tuple((f".{ours}", f".{theirs}") for theirs, ours in TRANSFORMER_RENAMES)}


def ours_to_diffusers(name: str, num_levels: int) -> str:
    """Our U-Net module name -> diffusers' UNet2DConditionModel name (convert_unet's renaming, inverted)."""
    head, rest, kind = name, "", None                     # conv_in, conv_out: the same names
    m = re.match(r"(down|up)\.(\d+)\.(?:(res|attn)\.(\d+)|(downsample|upsample))(\..*)?$", name)
    if m:
        side, level, kind, j, resample, rest = m.groups()
        idx = int(level) if side == "down" else num_levels - 1 - int(level)  # diffusers: up blocks deepest first
        block = f"{resample}rs.0" if resample else f"{'resnets' if kind == 'res' else 'attentions'}.{j}"
        head = f"{side}_blocks.{idx}.{block}"
    else:
        for ours, theirs in _TOP.items():
            if name == ours or name.startswith(ours + "."):
                head, rest = theirs, name[len(ours):]
                kind = "attn" if ".attentions." in theirs else "res" if ".resnets." in theirs else None
                break
    rest = (rest or "") + "."
    for a, b in _INVERSE.get(kind, ()):
        rest = rest.replace(a, b)
    return head + rest[:-1]


def lora_file_state(net: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a diffusers/peft LoRA file for the LoRALinear modules of `net`: a U-Net's under
    `unet.` in UNet2DConditionModel's names, an MMDiT's under `transformer.` in SD3Transformer2DModel's, a Flux's
    under `transformer.` in FluxTransformer2DModel's.

    alpha / r is folded into lora_B and the metadata says lora_alpha = r: any reader, with or
    without the metadata, applies exactly the trained update.
    """
    mmdit, flux = isinstance(net, MMDiT), isinstance(net, Flux)
    part = "transformer" if mmdit or flux else "unet"
    tensors, ranks, targets = {}, set(), set()
    for name, m in lora_modules(net).items():
        theirs = mmdit_ours_to_diffusers_key(f"{name}.weight").removesuffix(".weight") if mmdit else \
            next(iter(flux_ours_to_diffusers({f"{name}.weight": None}))).removesuffix(".weight") if flux else \
            ours_to_diffusers(name, len(net.cfg.channels))
        tensors[f"{part}.{theirs}.lora_A.weight"] = m.lora_A.detach().float().contiguous()
        tensors[f"{part}.{theirs}.lora_B.weight"] = (m.lora_B.detach().float() * m.scale).contiguous()
        ranks.add(m.lora_A.shape[0])
        parts = theirs.split(".")  # peft's target_modules match name suffixes: "to_q", "to_out.0", "net.2";
        # an MMDiT's whole names: diffusers' last block has a text query ("add_q_proj") that ours has not; a Flux's
        # too: "proj_out" is a single block's and the transformer's own
        targets.add(theirs if mmdit or flux else ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    if len(ranks) != 1:
        raise ValueError(f"lora_file_state: one rank expected, got {sorted(ranks)}")
    r = ranks.pop()
    meta = {f"{part}.r": r, f"{part}.lora_alpha": r, f"{part}.target_modules": sorted(targets)}
    return tensors, {"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)}


# ----------------------------------------------------------------------------- reading files

@dataclass
class Update:
    """One module's update: weight += scale * (up @ down), reshaped to the weight's shape."""
    down: torch.Tensor   # (r, in) or (r, in, kh, kw)
    up: torch.Tensor     # (out, r) or (out, r, 1, 1)
    scale: float         # alpha / r

    def delta(self, shape: torch.Size) -> torch.Tensor:
        r = self.down.shape[0]
        if self.up.shape[1] != r or self.up.shape[0] != shape[0] or self.down[0].numel() != math.prod(shape[1:]):
            raise ValueError(f"LoRA down {tuple(self.down.shape)} / up {tuple(self.up.shape)} do not fit a "
                             f"weight of shape {tuple(shape)}")
        return (self.up.float().reshape(shape[0], r) @ self.down.float().reshape(r, -1)).reshape(shape) * self.scale


# Multi-word names in diffusers' U-Net and transformers' CLIP: kohya writes module paths with "_" for ".",
# so "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" is re-split at these words.
_WORDS = {"down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
          "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
          "time_embedding", "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj", "v_proj",
          "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "add_embedding",
          # the CompVis / sgm U-Net (kohya's SDXL files)
          "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
          "skip_connection", "time_embed", "label_emb",
          # SD3's transformer: diffusers' SD3Transformer2DModel, and the original layout (sd-scripts' SD3 files)
          "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "norm1_context", "norm_out",
          "context_embedder", "time_text_embed", "timestep_embedder", "text_embedder", "pos_embed",
          "joint_blocks", "x_block", "context_block", "adaLN_modulation", "x_embedder", "t_embedder", "y_embedder",
          "final_layer",
          # FLUX.1's transformer: diffusers' FluxTransformer2DModel, and the original layout (sd-scripts' files)
          "single_transformer_blocks", "guidance_embedder", "proj_mlp", "double_blocks", "single_blocks",
          "img_attn", "txt_attn", "img_mod", "txt_mod", "img_mlp", "txt_mlp", "img_in", "txt_in", "time_in",
          "vector_in", "guidance_in", "in_layer", "out_layer", "query_norm", "key_norm"}
_COMPVIS_TOP = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
TEXT_PARTS = ("text_encoder", "text_encoder_2")        # SDXL and SD3 have two CLIPs
NET_PARTS = ("unet", "transformer")                    # the denoiser: a U-Net, or SD3's transformer
T5_PART = "text_encoder_3"                             # SD3's T5: refused


def kohya_to_dotted(name: str) -> str:
    """'down_blocks_0_attentions_0_proj_in' -> 'down_blocks.0.attentions.0.proj_in'."""
    parts, out, i = name.split("_"), [], 0
    while i < len(parts):
        for n in (3, 2, 1):
            word = "_".join(parts[i:i + n])
            if n == 1 or word in _WORDS:
                out.append(word)
                i += n
                break
    return ".".join(out)


_UNSUPPORTED = {"lora_magnitude_vector": "peft DoRA"}
# key ends that some LoRA files carry besides the low-rank updates (LyCORIS, ComfyUI, FLUX.1 Control LoRAs)
_NOT_LOW_RANK = {".diff": "whole-weight differences (.diff)", ".diff_b": "bias differences (.diff_b)",
                 ".scale": "norm gains (.scale)", ".bias": "biases (.bias)"}


_LAYOUTS = ((r"(.*)\.lora_A(?:\.default)?\.weight", "down"), (r"(.*)\.lora_B(?:\.default)?\.weight", "up"),  # peft
            (r"(.*)\.lora(?:_linear_layer)?\.down\.weight", "down"),                     # diffusers 0.2x
            (r"(.*)\.lora(?:_linear_layer)?\.up\.weight", "up"), (r"(.*)\.alpha", "alpha"))
_PROCESSOR = re.compile(r"(.*)\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight")  # attention processors
_KOHYA = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_DOTTED = ((r"(.*)\.lora_down\.weight", "down"), (r"(.*)\.lora_up\.weight", "up"))   # kohya's ends, dotted names
# ComfyUI's prefixes (BFL's / CompVis' net names, transformers' encoders) -> our part names
_COMFY = (("model.diffusion_model.", "transformer"), ("diffusion_model.", "transformer"),
          ("text_encoders.clip_l.transformer.", "text_encoder"), ("text_encoders.clip_g.transformer.", "text_encoder_2"),
          ("text_encoders.t5xxl.transformer.", T5_PART))
_XLABS = re.compile(r"((?:double|single)_blocks\.\d+\.processor\.(?:qkv|proj)_lora[12]?)\.(down|up)\.weight")  # FLUX.1


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(part, source module, 'down'|'up'|'alpha') of one tensor key, or None for a key that is not LoRA."""
    for pre, part in (("lora_unet_", "unet"), ("lora_transformer_", "transformer"), ("lora_te_", "text_encoder"),
                      ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te3_", T5_PART)):
        if key.startswith(pre):
            module, _, kind = key[len(pre):].partition(".")
            if kind in LYCORIS_KEYS or kind == DORA_KEY:   # LoHa / LoKr factors, DoRA (ldm.models.lycoris)
                return part, kohya_to_dotted(module), kind
            return (part, kohya_to_dotted(module), _KOHYA[kind]) if kind in _KOHYA else None
    for pre, part in _COMFY:
        if key.startswith(pre):
            rest = key[len(pre):]
            break
    else:
        part, _, rest = key.partition(".")
        if part not in (*NET_PARTS, *TEXT_PARTS, T5_PART):
            part, rest = "unet", key                      # the oldest diffusers files have no prefix
    rest = rest.removeprefix("base_model.model.")         # a peft model's own state dict
    m = _PROCESSOR.fullmatch(rest)
    if m:
        return part, f"{m.group(1)}.{m.group(2)}" + (".0" if m.group(2) == "to_out" else ""), m.group(3)
    m = _XLABS.fullmatch(rest)
    if m:
        return part, m.group(1), m.group(2)
    for pattern, kind in (*_LAYOUTS, *_DOTTED):
        m = re.fullmatch(pattern, rest)
        if m:
            return part, m.group(1), kind
    return None


def read_lora(path: str) -> dict[str, dict[str, Update]]:
    """{'unet': {diffusers or CompVis module (SD3, FLUX.1: diffusers' or the original transformer module): Update},
    'text_encoder' (and SDXL's / SD3's 'text_encoder_2'): {transformers module: Update}} of a LoRA file."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            from safetensors.torch import load_file
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
            state = load_file(path)
        else:                                             # .ckpt / .pt / .bin: tensors only, no code
            state, metadata = torch.load(path, map_location="cpu", weights_only=True), {}
    except Exception as err:                              # safetensors' and pickle's own error types
        raise ValueError(f"{path}: not a readable LoRA file ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a LoRA file (expected a flat dict of tensors)")
    for marker, what in _UNSUPPORTED.items():
        if any(marker in k for k in state):
            raise ValueError(f"{path}: a {what} file; only LoRA (for Stable Diffusion's U-Nets, SD3's and FLUX.1's "
                             "transformers and CLIP) is supported")
    meta = json.loads(metadata.get(METADATA_KEY, "{}"))
    for part in (*NET_PARTS, *TEXT_PARTS):
        if meta.get(f"{part}.use_dora") or meta.get(f"{part}.rank_pattern") or meta.get(f"{part}.alpha_pattern"):
            raise ValueError(f"{path}: per-module ranks/alphas or DoRA in the metadata are not supported")
    pieces: dict[tuple[str, str], dict] = {}
    heads: dict[tuple[str, str], str] = {}                # LoHa / LoKr modules: the file's key, for messages
    unknown = []
    for key, value in state.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        part, module, kind = split
        pieces.setdefault((part, module), {})[kind] = value
        if kind in LYCORIS_KEYS or kind == DORA_KEY:
            heads[(part, module)] = key.partition(".")[0]
    if unknown:
        kinds = sorted({what for key in unknown for end, what in _NOT_LOW_RANK.items() if key.endswith(end)})
        if all(key.endswith(tuple(_NOT_LOW_RANK)) for key in unknown):   # a LoRA file with extras, not a model
            raise ValueError(f"{path}: has {' and '.join(kinds)}, e.g. {unknown[:3]}; only low-rank LoRA updates "
                             "(down / up, alpha) are read")
        raise ValueError(f"{path}: {len(unknown)} keys are not LoRA weights in a layout we read, e.g. {unknown[:3]}")
    if any(part == T5_PART for part, _ in pieces):
        raise ValueError(f"{path}: has LoRA weights for SD3's T5 text encoder or FLUX.1's ({T5_PART}, lora_te3_, "
                         "text_encoders.t5xxl), which are not read; only the transformer and the CLIPs")
    out: dict[str, dict[str, Update]] = {"unet": {}, **{part: {} for part in TEXT_PARTS}}
    for (part, module), p in pieces.items():
        magnitude = p.pop(DORA_KEY, None)
        if any(k in LYCORIS_KEYS for k in p):
            update = _factored(p, heads[part, module], path)
        else:
            if "down" not in p or "up" not in p:
                raise ValueError(f"{path}: {part} module {module!r} has no "
                                 f"{'down/lora_A' if 'down' not in p else 'up/lora_B'} weight")
            r = p["down"].shape[0]
            if "alpha" in p:
                alpha = float(p["alpha"])
            else:
                alpha = float(meta.get(f"{part}.lora_alpha", r))
                alpha = alpha * math.sqrt(r) if meta.get(f"{part}.use_rslora") else alpha  # rsLoRA: alpha / sqrt(r)
            update = Update(p["down"], p["up"], alpha / r)
        if magnitude is not None:                         # DoRA: the update then rescales the weight's rows / columns
            update = Decomposed(update, magnitude, heads[part, module])
        out["unet" if part in NET_PARTS else part][module] = update
    return out


def _factored(p: dict, key: str, path: str) -> Factored:
    """A module's LoHa / LoKr pieces (factors and .alpha, no LoRA down / up) -> its update."""
    if "down" in p or "up" in p:
        raise ValueError(f"{path}: {key} has both LoRA (lora_down / lora_up) and LoHa / LoKr factors")
    try:
        alpha = float(p["alpha"]) if "alpha" in p else None
        return factored({k: v for k, v in p.items() if k != "alpha"}, alpha, key)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


# ----------------------------------------------------------------------------- merging

@dataclass(frozen=True)
class Rows:
    """Our layers whose weights, stacked by rows in this order, are one fused module of a file (FLUX.1's
    img_attn.qkv: our q, k, v), for a LoHa / LoKr / DoRA update, which cannot be cut before dW is built."""
    modules: tuple[str | None, ...]   # None: a part our model drops (SD3's last text query), as tall as the first
    swap: bool = False                # the file's module holds the stack's halves exchanged ((shift, scale))


def _targets(named: list[tuple[str, str | Rows | None, Update]], model: nn.Module,
             source: str) -> list[tuple[list[nn.Module | None], bool, Update]]:
    """(layers, swap, update) for each (the file's module name, ours: a name, `Rows` or None for no effect,
    update); unknown ones refused."""
    modules = dict(model.named_modules())
    found, missing = [], []
    for name, ours, update in named:
        rows = ours if isinstance(ours, Rows) else Rows((ours,))
        layers = [None if n is None else modules.get(n) for n in rows.modules]
        if all(n is None for n in rows.modules):
            continue
        if not all(n is None or isinstance(m, (nn.Linear, nn.Conv2d)) for n, m in zip(rows.modules, layers)):
            missing.append(name)
        else:
            try:                                           # shape errors now, before any weight changes
                fused_deltas(update, [None if m is None else m.weight.detach() for m in layers], rows.swap)
            except ValueError as err:
                raise ValueError(f"{source}: LoRA module {name!r}: {err} (is the LoRA for this base model?)") from None
            found.append((layers, rows.swap, update))
    if missing:
        raise ValueError(f"{source}: {len(missing)} LoRA modules have no linear/conv layer in this model, "
                         f"e.g. {missing[:3]} (is the LoRA for this base model?)")
    return found


def unet_module(name: str, cfg) -> str:
    """A LoRA file's U-Net module name (diffusers', or CompVis / sgm as kohya writes SDXL's) -> ours."""
    key = f"{name}.weight"
    ours = compvis_to_ours({key: None}, cfg) if name.startswith(_COMPVIS_TOP) else \
        diffusers_to_ours({key: None}, len(cfg.channels))
    return ours.popitem()[0][:-len(".weight")]


# ----------------------------------------------------------------------------- SD3's transformer
# (SD3's original module names -> diffusers': convert_mmdit's SD3_ORIGINAL_TOP / SD3_ORIGINAL_BLOCK tables)

_TEXT_QUERY = re.compile(r"transformer_blocks\.(\d+)\.attn\.add_q_proj")
_OUR_TEXT_QUERY = re.compile(r"blocks\.(\d+)\.text\.attn\.q")


def _rows(update: Update, parts: int, swap: bool, name: str) -> list[Update]:
    """The update cut into `parts` equal blocks of output rows (a fused qkv: q, k, v); with `swap` the two
    halves exchanged first ((shift, scale) rows, as SD3 orders an AdaLayerNormContinuous, -> (scale, shift))."""
    up = update.up
    if up.shape[0] % (2 if swap else parts):
        raise ValueError(f"LoRA module {name!r}: up has {up.shape[0]} rows, not {'two' if swap else parts} equal parts")
    if swap:
        up = torch.cat(up.chunk(2)[::-1])
    return [Update(update.down, rows, update.scale) for rows in up.chunk(parts)]


def mmdit_module(name: str) -> str:
    """A diffusers SD3Transformer2DModel module name -> ours (convert_mmdit's renaming; unknown names pass)."""
    m = _TEXT_QUERY.fullmatch(name)
    if m:   # diffusers_to_ours takes a lone key's block for the last one, and drops that block's text query
        return f"blocks.{m.group(1)}.text.attn.q"
    renamed = mmdit_diffusers_to_ours({f"{name}.weight": None})
    return next(iter(renamed), name).removesuffix(".weight")


def mmdit_updates(lora: dict[str, Update], net: MMDiT) -> list[tuple[str, str | Rows | None, Update]]:
    """(the file's module, ours, update) for a LoRA on SD3's transformer in diffusers' or SD3's original names;
    ours is None for the last block's text query, which our MMDiT drops: it does not reach the output. A LoHa /
    LoKr / DoRA update keeps its whole module: ours are `Rows`."""
    pre_only = {i for i, block in enumerate(net.blocks) if block.text.attn.q is None}   # the last block

    def ours(theirs: str) -> str | None:
        name = mmdit_module(theirs)
        q = _OUR_TEXT_QUERY.fullmatch(name)
        return None if q and int(q.group(1)) in pre_only else name

    out = []
    for name, update in lora.items():
        theirs = original_modules(name) or [name]                                 # else diffusers' names
        swap = original_swaps_halves(name, max(pre_only, default=-1))             # (shift, scale) rows there
        if not isinstance(update, Update):
            out.append((name, Rows(tuple(ours(t) for t in theirs), swap), update))
            continue
        updates = _rows(update, len(theirs), swap, name) if len(theirs) > 1 or swap else [update]
        out += [(name, ours(t), u) for t, u in zip(theirs, updates)]
    return out


@torch.no_grad()
def merge_lora(lora: dict[str, dict[str, Update]], unets: list[nn.Module], text_encoders: dict[str, nn.Module],
               scale: float = 1.0, source: str = "LoRA", saved: dict | None = None) -> int:
    """weight += scale * alpha / r * up @ down in each U-Net (ours, diffusers or CompVis names mapped), SD3
    MMDiT (`mmdit_updates`) or FLUX.1 transformer (lora_flux.flux_updates) and in the text encoders
    (`text_encoders`: part -> transformers module, its own names). Checks everything first: all or nothing.
    saved: {id: (weight, copy)} gets a copy of each weight before its first change, to restore it exactly."""
    plan = []
    for net in unets:
        if isinstance(net, Flux):
            from ldm.models.lora_flux import flux_updates, refuse_t5   # lora_flux builds on this module
            refuse_t5(lora, source)
            named = flux_updates(lora["unet"])
        elif isinstance(net, MMDiT):
            named = mmdit_updates(lora["unet"], net)
        else:
            named = [(n, unet_module(n, net.cfg), u) for n, u in lora["unet"].items()]
        plan += _targets(named, net, source)
    for part in TEXT_PARTS:
        if not lora.get(part):
            continue
        if part not in text_encoders:
            have = "no transformers CLIP model (ours is trained from scratch)" if not text_encoders else \
                f"only {sorted(text_encoders)}"
            raise ValueError(f"{source} has {part} weights, but this model's text encoders are {have}")
        model = text_encoders[part]
        plan += _targets([(n, clip_name(n, model), u) for n, u in lora[part].items()], model, source)
    for layers, swap, update in plan:
        weights = [None if m is None else m.weight for m in layers]
        for w in weights:
            if saved is not None and w is not None and id(w) not in saved:
                saved[id(w)] = (w, w.detach().clone())
        for w, dw in zip(weights, fused_deltas(update, weights, swap)):   # all blocks' dW before any changes
            if w is not None:
                w.copy_((w.float() + scale * dw.to(w.device)).to(w.dtype))
    return sum(w is not None for layers, _, _ in plan for w in layers)


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """'file.safetensors' or 'file.safetensors:0.8' -> (path, scale)."""
    path, sep, scale = arg.rpartition(":")
    if sep and path and not scale.startswith(("/", "\\")):
        try:
            return path, float(scale)
        except ValueError:
            pass
    return arg, 1.0
