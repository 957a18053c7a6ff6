"""One of our model folders with Stable Diffusion's architecture -> a diffusers StableDiffusionPipeline folder
(StableDiffusionXLPipeline for SDXL, StableDiffusion3Pipeline for SD3, FluxPipeline for FLUX.1).

    python -m ldm.models.to_diffusers runs/my-finetune/model --out exported/sd-finetune
    # then, with diffusers: StableDiffusionPipeline.from_pretrained("exported/sd-finetune")

The inverse of `ldm.models.from_diffusers`: a model imported from SD and fine-tuned here (stage 2,
LoRA merged or not) goes back to the layout the rest of the ecosystem loads. Exported: the U-Net and
the autoencoder (our names mapped to diffusers', configs written from ours), the CLIP text encoder
and tokenizer (saved through transformers), and a DDIMScheduler with our sampling grid (trailing
spacing, ending at clean data), so the pipeline's default call draws what `ldm.txt2img --teacher`
draws. SD3 (an MMDiT on the rectified-flow schedule): the transformer, the autoencoder, the text
encoders and tokenizers as imported (file for file), and a FlowMatchEulerDiscreteScheduler with the
folder's shift. That scheduler's default grid (n times from 1 down to near 0) is not ours (trailing:
1, 1 - 1/n, ..., 1/n), so call the pipeline with `sigmas=list(1 - np.arange(n) / n)` (it shifts them
itself) to draw what we draw; without T5, load it as diffusers' own such folders load,
`StableDiffusion3Pipeline.from_pretrained(DIR, text_encoder_3=None, tokenizer_3=None)`. FLUX.1 (dev or
schnell): the Flux transformer as FluxTransformer2DModel, the autoencoder, CLIP-L and T5 as imported, and a
FlowMatchEulerDiscreteScheduler with the folder's resolution-dependent shift (use_dynamic_shifting and its four
numbers) or fixed shift; FluxPipeline's default grid is our trailing one, so its default call draws what we draw
at guidance_scale = 1 + w (-dev's input; schnell: no guidance). Refused, by
name: what diffusers' pipeline cannot run as we do (a scratch text encoder, a continuous schedule on a
U-Net, rectified flow included, position features, a padding mask the U-Net was trained with).
Distilled students are not exported (they take w as an input: no diffusers pipeline does).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, NamedTuple

from ldm.flux_tools import PIPELINES
from ldm.models import text_flux, text_sd3
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.convert_flux import flux_config_to_diffusers
from ldm.models.convert_flux import ours_to_diffusers as flux_state_to_diffusers
from ldm.models.convert_mmdit import mmdit_config_to_diffusers
from ldm.models.convert_mmdit import ours_to_diffusers as mmdit_state_to_diffusers
from ldm.models.flux import Flux
from ldm.models.from_diffusers import DTYPES, FLUX_T5_TOKENS, PREDICTIONS, SCHEDULES, start_folder
from ldm.models.lora import ours_to_diffusers
from ldm.models.mmdit import MMDiT
from ldm.models.nets import CONFIG_NAME
from ldm.models.text import ClipTextEncoder
from ldm.models.unet import UNet, UNetConfig
from ldm.models.weights import save_state
from ldm.pipeline import load_index, load_text_encoder

WEIGHTS = "diffusion_pytorch_model.safetensors"
PIPELINE_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
    "feature_extractor": [None, None], "requires_safety_checker": False}
SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.30.0",
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"], "image_encoder": [None, None], "feature_extractor": [None, None]}
SD3_INDEX = {   # the text parts' classes are filled in from the folder's (T5's [None, None] when it has none)
    "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.30.0",
    "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "image_encoder": [None, None],
    "feature_extractor": [None, None]}
FLUX_INDEX = {   # the text parts' classes are filled in from the folder's
    "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0",
    "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "image_encoder": [None, None],
    "feature_extractor": [None, None]}
SD3_T5_TOKENS = 256          # StableDiffusion3Pipeline's max_sequence_length by default (T5's, or zeros, tokens)


# ----------------------------------------------------------------------------- U-Net

def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int) -> dict:
    """UNetConfig -> a UNet2DConditionModel config.json dict (inverse of convert_unet's reading)."""
    if cfg.pos_embed:
        raise ValueError("the U-Net has position features (unet.pos_embed): diffusers' UNet2DConditionModel has none")
    if not cfg.mid_attention:
        raise ValueError("the U-Net has no middle attention block: diffusers' SD U-Net always has one")
    levels = range(len(cfg.channels))
    heads = [cfg.per_level("num_heads", lvl) if cfg.num_heads is not None else cfg.channels[lvl] // cfg.head_dim
             for lvl in levels]   # diffusers' `attention_head_dim` holds the number of heads (its old name)
    depth = [cfg.per_level("transformer_depth", lvl) for lvl in levels]
    down = ["CrossAttnDownBlock2D" if lvl in cfg.attention_levels else "DownBlock2D" for lvl in levels]
    up = [name.replace("Down", "Up") for name in reversed(down)]
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": sample_size,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": list(cfg.channels), "layers_per_block": cfg.layers_per_block,
        "down_block_types": down, "up_block_types": up, "mid_block_type": "UNetMidBlock2DCrossAttn",
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
        "cross_attention_dim": cfg.context_dim, "use_linear_projection": cfg.linear_projection,
        "norm_num_groups": cfg.norm_groups, "norm_eps": cfg.norm_eps, "dropout": cfg.dropout,
        "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
        "downsample_padding": 1,
        **({"addition_embed_type": "text_time", "addition_time_embed_dim": cfg.added_id_dim,
            "projection_class_embeddings_input_dim": cfg.added_in_dim} if cfg.added_cond else {}),
    }


def unet_state_to_diffusers(state: dict, num_levels: int) -> dict:
    """Our U-Net's keys -> diffusers' (module names through ours_to_diffusers, the parameter name kept)."""
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        out[f"{ours_to_diffusers(module, num_levels)}.{param}"] = value
    return out


# ----------------------------------------------------------------------------- autoencoder

# convert_ae's diffusers rules, inverted; the attention's inner names first, while "mid.attn." still marks them
_AE_RULES = [
    (r"\.mid\.attn\.norm\.", ".mid.attn.group_norm."), (r"\.mid\.attn\.q\.", ".mid.attn.to_q."),
    (r"\.mid\.attn\.k\.", ".mid.attn.to_k."), (r"\.mid\.attn\.v\.", ".mid.attn.to_v."),
    (r"\.mid\.attn\.proj\.", ".mid.attn.to_out.0."), (r"\.mid\.attn\.", ".mid_block.attentions.0."),
    (r"\.mid\.res1\.", ".mid_block.resnets.0."), (r"\.mid\.res2\.", ".mid_block.resnets.1."),
    (r"\.down\.(\d+)\.res\.(\d+)\.", r".down_blocks.\1.resnets.\2."),
    (r"\.down\.(\d+)\.resample\.", r".down_blocks.\1.downsamplers.0."),
    (r"\.up\.(\d+)\.res\.(\d+)\.", r".up_blocks.\1.resnets.\2."),
    (r"\.up\.(\d+)\.resample\.", r".up_blocks.\1.upsamplers.0."),
    (r"\.skip\.", ".conv_shortcut."), (r"\.norm_out\.", ".conv_norm_out."),
]


def autoencoder_state_to_diffusers(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for pattern, repl in _AE_RULES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def autoencoder_config_to_diffusers(cfg: AutoencoderConfig) -> dict:
    levels = len(cfg.channel_mult)
    d = {"_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
         "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
         "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
         "layers_per_block": cfg.num_res_blocks, "act_fn": "silu", "latent_channels": cfg.z_channels,
         "norm_num_groups": cfg.num_groups, "sample_size": cfg.resolution, "scaling_factor": cfg.scaling_factor,
         "use_quant_conv": cfg.use_quant_conv, "use_post_quant_conv": cfg.use_quant_conv,
         "mid_block_add_attention": cfg.mid_attn}
    if cfg.shift_factor is not None:
        d["shift_factor"] = cfg.shift_factor
    return d


# ----------------------------------------------------------------------------- scheduler and text encoder

def scheduler_config(index) -> dict:
    """A DDIMScheduler that samples on our grid: trailing spacing (Lin et al. 2023), ending at alpha = 1."""
    s = index.schedule
    if s.get("name") not in SCHEDULES or index.time_scale != 1.0:
        raise ValueError(f"schedule {s.get('name')!r} (time_scale {index.time_scale:g}) has no diffusers scheduler "
                         f"for a U-Net: only the discrete {SCHEDULES} schedules of SD, with the U-Net seeing integer "
                         "steps (rectified flow exports with SD3's transformer, an MMDiT, alone)")
    prediction = {ours: theirs for theirs, ours in PREDICTIONS.items()}[index.prediction]
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": int(s.get("T", 1000)),
            "beta_start": float(s.get("beta_start", 0.0001)), "beta_end": float(s.get("beta_end", 0.02)),
            "beta_schedule": s["name"], "prediction_type": prediction, "clip_sample": False,
            "set_alpha_to_one": True, "steps_offset": 1, "timestep_spacing": "trailing",
            "rescale_betas_zero_snr": bool(s.get("zero_snr", False))}


def flow_scheduler_config(index, net: str = "an MMDiT exports to diffusers' SD3 pipeline") -> dict:
    """SD3's and FLUX.1's FlowMatchEulerDiscreteScheduler: sigma = t on the straight path, shifted by the folder's
    shift, or by FLUX.1's resolution-dependent one (index.dynamic_shift: the pipeline computes mu from the image's
    token count, as schedules.resolution_shift), the transformer fed 1000 sigma (our time_scale)."""
    s = index.schedule
    if (s.get("name"), index.prediction, index.time_scale) != ("rectified_flow", "flow", 1000.0):
        raise ValueError(f"schedule {s.get('name')!r}, prediction {index.prediction!r}, time_scale "
                         f"{index.time_scale:g}: {net} only with rectified flow, flow prediction and time_scale "
                         "1000 (its FlowMatchEulerDiscreteScheduler)")
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
              "shift": float(s.get("shift", 1.0)), "use_dynamic_shifting": index.dynamic_shift is not None}
    if index.dynamic_shift is not None:
        dynamic = {"base_seq_len": 256, "max_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15,
                   **index.dynamic_shift}                  # resolution_shift's defaults where the index has none
        config.update(base_image_seq_len=int(dynamic["base_seq_len"]), max_image_seq_len=int(dynamic["max_seq_len"]),
                      base_shift=float(dynamic["base_shift"]), max_shift=float(dynamic["max_shift"]),
                      time_shift_type="exponential")
    return config


def check_text_encoder(encoder) -> None:
    """A CLIP text model that diffusers' pipeline runs as we do: the last (or penultimate) layer, unmasked
    (or SDXL's pair)."""
    if hasattr(encoder, "model_2"):
        return                                   # SDXL's: diffusers' own encoding (ldm.models.text_sdxl)
    if not isinstance(encoder, ClipTextEncoder):
        raise ValueError(f"the text encoder is {type(encoder).__name__}: diffusers' StableDiffusionPipeline runs "
                         "a transformers CLIPTextModel (our scratch encoder is trained with the U-Net, not CLIP)")
    if encoder.cfg.mask_padding:
        raise ValueError("the U-Net was trained with the text padding masked (text mask_padding true); diffusers' "
                         "pipeline attends to every token, so its images would differ")


def save_text_encoder(encoder: ClipTextEncoder, out: Path) -> None:
    """text_encoder/ and tokenizer/ through transformers' save_pretrained (SDXL: and text_encoder_2/,
    tokenizer_2/)."""
    if hasattr(encoder, "model_2"):
        for suffix, model, tokenizer in (("", encoder.model, encoder.tokenizers[0]),
                                         ("_2", encoder.model_2, encoder.tokenizers[1])):
            model.save_pretrained(out / f"text_encoder{suffix}")
            tokenizer.save_pretrained(out / f"tokenizer{suffix}")
        return
    model = encoder.model
    if encoder.cfg.layer == "penultimate":   # SD 2.x ships its CLIP with the last layer dropped: the same output
        inner = getattr(model, "text_model", model)       # transformers 5 has no text_model level
        inner.encoder.layers = inner.encoder.layers[:-1]
        model.config.num_hidden_layers -= 1
    model.save_pretrained(out / "text_encoder")
    encoder.tokenizer.model_max_length = encoder.max_length
    encoder.tokenizer.save_pretrained(out / "tokenizer")


def check_sd3_text_encoder(encoder: text_sd3.Sd3TextEncoder) -> None:
    """SD3's encoders reading as many tokens as diffusers' pipeline does by default."""
    if encoder.max_length != encoder.tokenizer_l.model_max_length:
        raise ValueError(f"the CLIPs read {encoder.max_length} tokens (text max_length); diffusers' pipeline reads "
                         f"their tokenizer's model_max_length, {encoder.tokenizer_l.model_max_length}")
    if encoder.t5_max_length != SD3_T5_TOKENS:
        raise ValueError(f"T5's part of the context is {encoder.t5_max_length} tokens (text t5_max_length); "
                         f"diffusers' pipeline uses {SD3_T5_TOKENS} unless called with max_sequence_length")


def sd3_text_index(encoder: text_sd3.Sd3TextEncoder) -> dict:
    """model_index.json's entries of SD3's text parts: the classes loaded, T5's [None, None] when absent."""
    models = {"text_encoder": encoder.clip_l, "tokenizer": encoder.tokenizer_l, "text_encoder_2": encoder.clip_g,
              "tokenizer_2": encoder.tokenizer_g, "text_encoder_3": encoder.t5, "tokenizer_3": encoder.tokenizer_t5}
    return {part: ["transformers", type(m).__name__] if m is not None else [None, None] for part, m in models.items()}


def check_flux_text_encoder(encoder) -> None:
    """FLUX.1's CLIP-L and T5 (text kind flux), reading as many tokens as diffusers' FluxPipeline does by default."""
    if not isinstance(encoder, text_flux.FluxTextEncoder):
        raise ValueError(f"the text encoder is {type(encoder).__name__}: diffusers' FluxPipeline runs FLUX.1's CLIP-L "
                         "and T5 (text kind flux)")
    if encoder.max_length != encoder.tokenizer_l.model_max_length:
        raise ValueError(f"CLIP reads {encoder.max_length} tokens (text max_length); diffusers' pipeline reads its "
                         f"tokenizer's model_max_length, {encoder.tokenizer_l.model_max_length}")
    if encoder.t5_max_length != FLUX_T5_TOKENS:
        raise ValueError(f"T5 reads {encoder.t5_max_length} tokens (text t5_max_length), padding included, which the "
                         f"transformer attends to; diffusers' FluxPipeline reads {FLUX_T5_TOKENS} unless called with "
                         "max_sequence_length")


def flux_text_index(encoder: text_flux.FluxTextEncoder) -> dict:
    """model_index.json's entries of FLUX.1's text parts: the classes loaded."""
    models = {"text_encoder": encoder.clip_l, "tokenizer": encoder.tokenizer_l, "text_encoder_2": encoder.t5,
              "tokenizer_2": encoder.tokenizer_t5}
    return {part: ["transformers", type(m).__name__] for part, m in models.items()}


def copy_text_parts(path: str, parts: tuple[str, ...], out: Path) -> None:
    """The frozen text encoders' folders under `path` copied as imported, file for file (the released ones)."""
    for part in parts:
        if os.path.isdir(os.path.join(path, part)):
            shutil.copytree(os.path.join(path, part), out / part)


# ----------------------------------------------------------------------------- export

class Parts(NamedTuple):
    """What an export writes, gathered (and checked) before anything is written."""
    networks: dict                       # folder -> (config.json dict, state dict under diffusers' names)
    scheduler: dict                      # scheduler/scheduler_config.json
    pipeline: dict                       # model_index.json
    save_text: Callable[[Path], None]    # writes the text encoders and tokenizers into the folder


def vae_part(ae: AutoencoderKL) -> tuple[dict, dict]:
    return autoencoder_config_to_diffusers(ae.config), autoencoder_state_to_diffusers(ae.state_dict())


def sd_parts(model_dir: str, index) -> Parts:
    """SD 1.x / 2.x / SDXL: the U-Net, the autoencoder, CLIP (or SDXL's pair), a DDIMScheduler on our grid."""
    scheduler = scheduler_config(index)                # the cheap refusals first
    unet = UNet.from_pretrained(os.path.join(model_dir, index.unet))
    ae = AutoencoderKL.from_pretrained(os.path.join(model_dir, index.autoencoder))
    unet_config = unet_config_to_diffusers(unet.cfg, index.resolution // ae.config.downsample_factor)
    text = load_text_encoder(os.path.join(model_dir, index.text_encoder))
    check_text_encoder(text)
    pipeline = PIPELINE_INDEX if unet.cfg.added_cond is None else \
        {**SDXL_INDEX, "force_zeros_for_empty_prompt": text.cfg.zero_empty}
    networks = {"unet": (unet_config, unet_state_to_diffusers(unet.state_dict(), len(unet.cfg.channels))),
                "vae": vae_part(ae)}
    return Parts(networks, scheduler, pipeline, lambda out: save_text_encoder(text, out))


def sd3_parts(model_dir: str, index) -> Parts:
    """SD3: the MMDiT as SD3Transformer2DModel, the 16-channel autoencoder, the text parts copied, a
    FlowMatchEulerDiscreteScheduler with the folder's shift."""
    scheduler = flow_scheduler_config(index)
    net = MMDiT.from_pretrained(os.path.join(model_dir, index.unet))
    ae = AutoencoderKL.from_pretrained(os.path.join(model_dir, index.autoencoder))
    text = load_text_encoder(os.path.join(model_dir, index.text_encoder))
    if not isinstance(text, text_sd3.Sd3TextEncoder):
        raise ValueError(f"the text encoder is {type(text).__name__}: diffusers' StableDiffusion3Pipeline runs SD3's "
                         "two CLIPs and optional T5 (text kind sd3)")
    check_sd3_text_encoder(text)
    networks = {"transformer": (mmdit_config_to_diffusers(net.cfg), mmdit_state_to_diffusers(net.state_dict())),
                "vae": vae_part(ae)}
    return Parts(networks, scheduler, {**SD3_INDEX, **sd3_text_index(text)},
                 lambda out: copy_text_parts(text.cfg.path, text_sd3.PARTS + text_sd3.T5_PARTS, out))


def flux_parts(model_dir: str, index) -> Parts:
    """FLUX.1: the Flux net as FluxTransformer2DModel, the 16-channel autoencoder, CLIP-L and T5 copied, a
    FlowMatchEulerDiscreteScheduler with the folder's (dynamic) shift; a Fill, Depth / Canny or Kontext folder
    (`image_input`) as the pipeline class diffusers runs it with (ldm.flux_tools.PIPELINES)."""
    scheduler = flow_scheduler_config(index, "a Flux transformer exports to diffusers' FluxPipeline")
    net = Flux.from_pretrained(os.path.join(model_dir, index.unet))
    if net.cfg.guidance_embeds != index.guidance_embed:
        raise ValueError(f"unet/ has guidance_embeds={net.cfg.guidance_embeds} but model_index.json guidance_embed="
                         f"{index.guidance_embed}: the folder does not say how it is guided")
    ae = AutoencoderKL.from_pretrained(os.path.join(model_dir, index.autoencoder))
    text = load_text_encoder(os.path.join(model_dir, index.text_encoder))
    check_flux_text_encoder(text)
    networks = {"transformer": (flux_config_to_diffusers(net.cfg), flux_state_to_diffusers(net.state_dict())),
                "vae": vae_part(ae)}
    pipeline = {kind: name for name, kind in PIPELINES.items()}.get(index.image_input, "FluxPipeline")  # Fill, ...
    return Parts(networks, scheduler, {**FLUX_INDEX, "_class_name": pipeline, **flux_text_index(text)},
                 lambda out: copy_text_parts(text.cfg.path, text_flux.PARTS, out))


def net_kind(net_dir: str) -> str:
    """A network folder's kind: "unet", "mmdit" or "flux" (its config.json's; a U-Net's has none)."""
    with open(os.path.join(net_dir, CONFIG_NAME)) as f:
        return json.load(f).get("kind", "unet")


def export(model_dir: str, out: str, dtype: str = "float32") -> Path:
    """Write a diffusers pipeline folder at `out` (networks in `dtype`, text encoders as they are); atomic
    (`out`.tmp renamed at the end)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    index = load_index(model_dir)
    if index.aesthetic is not None:
        raise ValueError("an SDXL refiner folder (aesthetic scores): its export to diffusers is not written yet")
    kind = net_kind(os.path.join(model_dir, index.unet))
    parts = {"flux": flux_parts, "mmdit": sd3_parts}.get(kind, sd_parts)(model_dir, index)
    if os.path.exists(os.path.join(out, "model_index.json")):
        raise FileExistsError(f"{out} already holds a pipeline; remove it or pick another --out")
    tmp = start_folder(out)
    try:
        for name, (config, state) in parts.networks.items():
            (tmp / name).mkdir(parents=True)
            (tmp / name / "config.json").write_text(json.dumps(config, indent=2))
            save_state(state, tmp / name / WEIGHTS, DTYPES[dtype])
        parts.save_text(tmp)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(parts.scheduler, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(parts.pipeline, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)             # an empty or half-written folder from before
    os.replace(tmp, out)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm.models.to_diffusers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="our model folder (model_index.json, unet/, autoencoder/, text_encoder/; "
                        "unet/ a U-Net, SD3's MMDiT or FLUX.1's transformer)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the diffusers pipeline folder to write")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights (default float32)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        parser.error(f"{args.model!r} is not a model folder: model_index.json is missing")
    try:
        out = export(args.model, args.out, args.dtype)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        parser.error(str(err))
    name = json.loads((out / "model_index.json").read_text())["_class_name"]
    print(f"{out}: a diffusers {name} folder; load it with {name}.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    main()
