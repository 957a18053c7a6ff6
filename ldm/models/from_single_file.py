"""One Stable Diffusion 1.x, 2.x, SDXL, SD3 / SD 3.5 or FLUX.1 checkpoint file (the CompVis / Stability AI layout most
fine-tunes ship in, .safetensors or .ckpt; FLUX.1 in Black Forest Labs' or ComfyUI's) -> one of our model folders.

    python -m ldm.models.from_single_file v1-5-pruned-emaonly.safetensors --out models/sd15
    python -m ldm.models.from_single_file v2-1_768-ema-pruned.safetensors --prediction v --resolution 768 --out models/sd21
    python -m ldm.models.from_single_file sd_xl_base_1.0.safetensors --out models/sdxl
    python -m ldm.models.from_single_file sd3_medium_incl_clips_t5xxlfp16.safetensors --t5-tokenizer t5 --out models/sd3
    python -m ldm.models.from_single_file sd3.5_large.safetensors --text-encoders sd3.5-diffusers --out models/sd35
    python -m ldm.models.from_single_file flux1-dev.safetensors --text-encoders FLUX.1-dev --out models/flux-dev
    python -m ldm.txt2img "a corgi on a beach" --model models/sd15 --steps 25 --sampler dpmpp_2m

The file holds three models under three prefixes: the U-Net (`model.diffusion_model.`), the
autoencoder (`first_stage_model.`) and the text encoder: SD 1.x's CLIP ViT-L/14 in transformers' layout
(`cond_stage_model.transformer.`), or SD 2.x's OpenCLIP ViT-H/14 in open_clip's (`cond_stage_model.model.`,
converted to a transformers CLIPTextModel that stops at the penultimate layer SD 2.x conditions on:
ldm.models.convert_openclip); SDXL's two, CLIP ViT-L/14 (`conditioner.embedders.0.transformer.`) and
OpenCLIP bigG/14 whole, with its projection (`conditioner.embedders.1.model.`). A file holds no configs: SD 1.x's, 2.x's and SDXL's are built in (Rombach et al.
2022's v1-inference.yaml, Stability AI's v2-inference.yaml and sd_xl_base.yaml, in diffusers' and
transformers' terms; an OpenCLIP tower's sizes are read off its weights), and `--unet-config`,
`--vae-config`, `--text-config` (CLIP ViT-L's) take config.json files for other sizes. The tokenizer is CLIP's (ldm.models.clip_bpe; SD 2.x pads with id 0
as open_clip does), the schedule SD's scaled-linear betas. A file says neither whether it predicts eps or
v (SD 2.x 768-v models do: `--prediction v`) nor its image size (`--resolution 768` for those).
SDXL's refiner (bigG alone under `conditioner.embedders.0.model.`) gets its aesthetic scores.

SD3 / SD 3.5 (Esser et al. 2024; a file whose `model.diffusion_model.` holds joint_blocks): the MMDiT in SD3's
original names becomes ours (ldm.models.convert_mmdit: fused qkv split, (shift, scale) modulations swapped; its
sizes read off the tensors, 64-channel heads, or `--unet-config` an SD3Transformer2DModel config.json), the
16-channel autoencoder under the CompVis names (SD3's config built in), the schedule rectified flow with shift 3
and flow prediction. Text encoders (text kind "sd3", ldm.models.text_sd3), in transformers' names when the file
has them: CLIP ViT-L (`text_encoders.clip_l.transformer.`, its pooled output unprojected, as SD3's reference
code reads it: an identity projection), bigG (`text_encoders.clip_g.transformer.`, sizes read off it) and T5-XXL
(`text_encoders.t5xxl.transformer.`, kept in the file's dtype). T5's sentencepiece tokenizer is not shipped
with the file nor writable offline: `--t5-tokenizer DIR` (google/t5-v1_1-xxl's, or an SD3 pipeline's
tokenizer_3/); without one the file's T5 is left out, with a warning (SD3 runs on zeros in its place). A file
without CLIPs (sd3_medium.safetensors, sd3.5_large.safetensors) takes them, and T5 and its tokenizer if there,
from `--text-encoders DIR`: a diffusers SD3 pipeline folder, or any folder with its text_encoder/, tokenizer/,
text_encoder_2/, tokenizer_2/ (optionally text_encoder_3/, tokenizer_3/); what the file holds wins.

FLUX.1-dev / -schnell (a file with BFL's double_blocks, bare or under `model.diffusion_model.`): read by
ldm.models.single_file_flux, which says what it reads; `--vae FILE` (BFL's ae.safetensors) is for these files.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

import torch

from ldm.models import convert_openclip
from ldm.models.convert_ae import read_checkpoint, diffusers_config_to_ours, load_compvis_autoencoder
from ldm.models.convert_unet import COMPVIS_PREFIX, load_compvis_unet, unet_config_from_diffusers
from ldm.models.from_diffusers import (CLIP_DIR, DEFAULT_GUIDANCE, DTYPES, PREDICTIONS, REFINER_AESTHETIC,
                                       add_output_args, copy_text_part, finish_folder, model_index_from_flow_scheduler,
                                       model_index_from_scheduler, save_networks, start_folder)
from ldm.models.text import clip_name
from ldm.models.text_sd3 import PARTS as SD3_TEXT_PARTS
from ldm.models.text_sd3 import T5_PARTS
from ldm.models.weights import load_state_dict_strict

VAE_PREFIX, CLIP_PREFIX = "first_stage_model.", "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."      # SD 2.x: open_clip's CLIP, text tower only
XL_CLIP_PREFIX, XL_BIGG_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."   # SDXL
REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."                   # SDXL's refiner: bigG alone
SD1_UNET = {   # diffusers' UNet2DConditionModel config of SD 1.x (v1-inference.yaml: 320 channels, 8 heads)
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "attention_head_dim": 8,
    "cross_attention_dim": 768, "norm_num_groups": 32,
}
SD2_UNET = {   # v2-inference.yaml: 64-wide heads (diffusers' attention_head_dim counts heads per level),
    **SD1_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,   # OpenCLIP-H tokens,
    "use_linear_projection": True,                                                     # Linear proj_in/out
}
SDXL_UNET = {  # sd_xl_base.yaml (Podell et al. 2023, Tab. 1): no attention at 128^2 latents, 2 / 10 blocks below
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2, "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
    "up_block_types": ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"], "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,   # bigG's pooled 1280 + 6 size numbers x 256
}
REFINER_UNET = {   # sd_xl_refiner.yaml: 384 channels, attention at the middle two levels, 4 blocks each
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "block_out_channels": [384, 768, 1536, 1536],
    "layers_per_block": 2, "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"], "attention_head_dim": [6, 12, 24, 24],
    "transformer_layers_per_block": 4, "cross_attention_dim": 1280, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2560,   # bigG's pooled 1280 + 5 numbers (size, crop, score) x 256
}
SD1_VAE = {    # diffusers' AutoencoderKL config of SD's f = 8 KL autoencoder
    "sample_size": 512, "in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2, "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215,
}
SDXL_VAE = {**SD1_VAE, "sample_size": 1024, "scaling_factor": 0.13025}   # retrained, same architecture
SD1_TEXT = {   # transformers' CLIPTextConfig of openai/clip-vit-large-patch14's text tower
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768, "hidden_act": "quick_gelu",
}
SD3_VAE = {**SD1_VAE, "sample_size": 1024, "latent_channels": 16, "use_quant_conv": False,   # SD3's 16 channels,
           "use_post_quant_conv": False, "scaling_factor": 1.5305, "shift_factor": 0.0609}   # no quant convs
SD3_TEXT = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
            "t5": "text_encoders.t5xxl.transformer."}     # transformers' CLIPTextModel / T5EncoderModel names below
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}   # SD3 medium's and SD 3.5's
SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
# position_ids is a buffer that older transformers saved and newer ones rebuild
CLIP_BUFFERS = ("text_model.embeddings.position_ids",)


def read_config(path: str | None, default: dict, what: str) -> dict:
    if path is None:
        return dict(default)
    if not Path(path).is_file():
        raise FileNotFoundError(f"--{what}-config {path}: no such file")
    return json.loads(Path(path).read_text())


TEXT_PREFIXES = {"sd1": (CLIP_PREFIX,), "sd2": (OPENCLIP_PREFIX,), "sdxl": (XL_CLIP_PREFIX, XL_BIGG_PREFIX),
                 "refiner": (REFINER_BIGG_PREFIX,)}
TEXT_PREFIXES["sd3"] = ()    # SD3's text encoders: optional (--text-encoders)
UNETS = {"sd1": SD1_UNET, "sd2": SD2_UNET, "sdxl": SDXL_UNET, "refiner": REFINER_UNET}
VAES = {"sd1": SD1_VAE, "sd2": SD1_VAE, "sdxl": SDXL_VAE, "refiner": SDXL_VAE}


def check_layout(state: dict, source: str) -> str:
    """"sd1", "sd2", "sdxl", "refiner" (by the text towers), "sd3" (by the MMDiT's joint blocks) or "flux" (by
    BFL's double blocks, with or without a prefix), or an error that says what the file is."""
    from ldm.models.single_file_flux import flux_prefix
    if flux_prefix(state) is not None:
        return "flux"
    if any(k.startswith(COMPVIS_PREFIX + "joint_blocks.") for k in state):
        version = "sd3"
    elif any(k.startswith("conditioner.embedders.") for k in state):
        version = "sdxl" if any(k.startswith(XL_CLIP_PREFIX) for k in state) else "refiner"
    else:
        version = "sd2" if any(k.startswith(OPENCLIP_PREFIX) for k in state) else "sd1"
    prefixes = (COMPVIS_PREFIX, VAE_PREFIX, *TEXT_PREFIXES[version])
    missing = [p for p in prefixes if not any(k.startswith(p) for k in state)]
    if missing:
        raise ValueError(f"{source}: no {missing} weights: not a full SD 1.x / 2.x / SDXL (base or refiner) / SD3 "
                         "checkpoint nor a FLUX.1 one "
                         "(a bare U-Net or VAE file loads with ldm.models.convert_unet / convert_ae)")
    return version


def load_clip(weights: dict, config: dict, source: str, projection: bool = False):
    """Text-tower weights under transformers' names into a CLIPTextModel (CLIPTextModelWithProjection),
    all-or-nothing."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))
    load_state_dict_strict(model, {clip_name(k, model): v.float() for k, v in weights.items()}, source)
    return model


def _bigg(state: dict, prefix: str, source: str):
    """SDXL's OpenCLIP bigG whole, with its projection (SDXL reads its layer -2 and the pooled end token)."""
    tower = convert_openclip.text_tower(state, prefix)
    return load_clip(convert_openclip.to_transformers(tower, drop_last=False, projection=True),
                     convert_openclip.clip_config(tower, drop_last=False), source, projection=True)


def text_encoders(state: dict, version: str, text_config: str | None, source: str) -> list[tuple]:
    """The file's text towers as (folder suffix: "" or "_2", transformers model, the token that pads its
    prompts, None: the end token). `text_config`: CLIP ViT-L's whole config (SD 1.x, SDXL's first), or
    entries over what an OpenCLIP tower's weights say (SD 2.x)."""
    if version == "sd2":
        tower = convert_openclip.text_tower(state, OPENCLIP_PREFIX)
        config = {**convert_openclip.clip_config(tower), **read_config(text_config, {}, "text")}
        return [("", load_clip(convert_openclip.to_transformers(tower), config, source), convert_openclip.PAD_TOKEN)]
    if version == "refiner":
        return [("_2", _bigg(state, REFINER_BIGG_PREFIX, source), convert_openclip.PAD_TOKEN)]
    prefix = XL_CLIP_PREFIX if version == "sdxl" else CLIP_PREFIX
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    weights = {k: v for k, v in weights.items() if k not in CLIP_BUFFERS}
    encoders = [("", load_clip(weights, read_config(text_config, SD1_TEXT, "text"), source), None)]
    if version == "sdxl":
        encoders.append(("_2", _bigg(state, XL_BIGG_PREFIX, source), convert_openclip.PAD_TOKEN))
    return encoders


def convert(checkpoint: str, out: str, *, prediction: str | None = None, guidance: float | None = None,
            dtype: str = "float32", resolution: int | None = None, unet_config: str | None = None,
            vae_config: str | None = None, text_config: str | None = None, text_encoders_from: str | None = None,
            t5_tokenizer: str | None = None, vae: str | None = None, flux_kind: str = "auto"):
    """Write a model folder at `out` from one CompVis-layout SD 1.x / 2.x / SDXL / SD3 checkpoint file, or a FLUX.1
    file (ldm.models.single_file_flux); atomic. prediction: "eps" (default) or "v", SD only; guidance: default w (SD
    6.5, SD3 6.0, FLUX.1-dev 2.5, -schnell 0); text_encoders_from (a folder), t5_tokenizer: SD3's and FLUX.1's text
    parts the file lacks (module docstring); vae: FLUX.1's autoencoder file; flux_kind: "kontext" for a FLUX.1
    Kontext file (else "auto")."""
    from ldm.models.clip_bpe import write_clip_tokenizer
    ours = {v: k for k, v in PREDICTIONS.items()}
    if prediction is not None and prediction not in ours:
        raise ValueError(f"prediction must be one of {sorted(ours)}, got {prediction!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if resolution is not None and (resolution <= 0 or resolution % 8):
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    for what, name in (("unet", unet_config), ("vae", vae_config), ("text", text_config)):
        read_config(name, {}, what)              # a missing config is named before the checkpoint is read
    for option, folder in (("--text-encoders", text_encoders_from), ("--t5-tokenizer", t5_tokenizer)):
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"{option} {folder}: no such folder")
    if vae is not None and not Path(vae).is_file():
        raise FileNotFoundError(f"--vae {vae}: no such file")
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found")
    tmp = start_folder(out)
    state = read_checkpoint(path)
    version = check_layout(state, checkpoint)
    if version == "flux":
        from ldm.models.single_file_flux import convert_flux_file
        if prediction is not None:
            raise ValueError("--prediction is for SD 1.x / 2.x files; FLUX.1 predicts the flow velocity")
        return convert_flux_file(state, tmp, out, checkpoint, guidance=guidance, dtype=dtype, resolution=resolution,
                                 unet_config=unet_config, vae_config=vae_config, text_config=text_config,
                                 donor=text_encoders_from, t5_tokenizer=t5_tokenizer, vae=vae, kind=flux_kind)
    if flux_kind != "auto":
        raise ValueError(f"{checkpoint} is not a FLUX.1 file ({version}): --flux-kind is for FLUX.1 files")
    if vae is not None:
        raise ValueError(f"{checkpoint} is not a FLUX.1 file ({version}): --vae is for FLUX.1 files (an SD file's "
                         "autoencoder is in it)")
    if version == "sd3":
        if prediction is not None:
            raise ValueError("--prediction is for SD 1.x / 2.x files; SD3 predicts the flow velocity")
        return convert_sd3(state, tmp, out, checkpoint, guidance=DEFAULT_GUIDANCE["sd3"] if guidance is None else guidance,
                           dtype=dtype, resolution=resolution, unet_config=unet_config, vae_config=vae_config,
                           text_config=text_config, donor=text_encoders_from, t5_tokenizer=t5_tokenizer)
    if text_encoders_from or t5_tokenizer:
        raise ValueError(f"{checkpoint} is not an SD3 file ({version}): --text-encoders and --t5-tokenizer are for "
                         "SD3 and FLUX.1 files")
    prediction, guidance = prediction or "eps", DEFAULT_GUIDANCE["sd"] if guidance is None else guidance
    unet = load_compvis_unet({k: v.float() for k, v in state.items() if k.startswith(COMPVIS_PREFIX)},
                             unet_config_from_diffusers(read_config(unet_config, UNETS[version], "unet")))
    autoencoder = load_compvis_autoencoder(state, diffusers_config_to_ours(read_config(vae_config, VAES[version],
                                                                                      "vae")))
    side = save_networks(tmp, unet, autoencoder, dtype)
    del unet, autoencoder
    for suffix, clip, pad_token in text_encoders(state, version, text_config, checkpoint):   # SDXL's bigG: _2
        clip.save_pretrained(str(tmp / "text_encoder" / CLIP_DIR / f"text_encoder{suffix}"))
        write_clip_tokenizer(tmp / "text_encoder" / CLIP_DIR / f"tokenizer{suffix}",
                             clip.config.max_position_embeddings, pad_token=pad_token)
    index = model_index_from_scheduler({**SD_SCHEDULER, "prediction_type": ours[prediction]}, resolution or side,
                                       guidance)
    if version == "refiner":
        index.aesthetic = list(REFINER_AESTHETIC)
    finish_folder(tmp, out, index, **({"kind": "sdxl", "zero_empty": version == "sdxl"}
                                      if version in ("sdxl", "refiner") else {}))
    return index


# ----------------------------------------------------------------------------- SD3 / SD 3.5

def _under(state: dict, prefix: str) -> dict:
    """The tensors under `prefix`, the prefix stripped; the CLIP position-id buffers left out."""
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in weights.items() if k not in CLIP_BUFFERS}


def clip_config_from_weights(weights: dict, what: str) -> dict:
    """transformers' CLIPTextConfig of a text tower in its own names (SD3's bigG), read off the shapes: 64-channel
    heads and GELU, as OpenCLIP's towers (convert_openclip)."""
    needed = ("text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
              "text_model.encoder.layers.0.mlp.fc1.weight", "text_projection.weight")
    missing = [k for k in needed if k not in weights]
    if missing:
        raise ValueError(f"{what}: the weights lack {missing}")
    vocab, width = weights[needed[0]].shape
    layers = {m.group(1) for k in weights if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    return {"vocab_size": vocab, "hidden_size": width, "num_attention_heads": width // convert_openclip.HEAD_WIDTH,
            "intermediate_size": weights[needed[2]].shape[0], "num_hidden_layers": len(layers),
            "max_position_embeddings": weights[needed[1]].shape[0], "projection_dim": weights[needed[3]].shape[0],
            "hidden_act": "gelu"}


def sd3_clips(state: dict, text_config: str | None, source: str) -> list[tuple]:
    """The file's two CLIPs as text_encoders() gives SD's: CLIP ViT-L (`text_config`, default SD 1.x's) with an
    identity projection (SD3 conditions on its pooled output unprojected; diffusers' single-file loader likewise),
    bigG with its own projection, padding with "!" as SD3's tokenizer_2."""
    clip_l = {k: v for k, v in _under(state, SD3_TEXT["clip_l"]).items() if k != "text_projection.weight"}
    config = read_config(text_config, SD1_TEXT, "text")
    config["projection_dim"] = config["hidden_size"]
    clip_l["text_projection.weight"] = torch.eye(config["hidden_size"])
    clip_g = _under(state, SD3_TEXT["clip_g"])
    return [("", load_clip(clip_l, config, source, projection=True), None),
            ("_2", load_clip(clip_g, clip_config_from_weights(clip_g, f"{source}: SD3's bigG"), source,
                             projection=True), convert_openclip.PAD_TOKEN)]


def t5_config_from_weights(weights: dict, source: str) -> dict:
    """transformers' T5Config of a T5 encoder (T5-XXL v1.1: gated GELU) read off its shapes; the rest T5's defaults
    (relative positions bucketed up to 128)."""
    attention = "encoder.block.0.layer.0.SelfAttention."
    needed = ("shared.weight", attention + "relative_attention_bias.weight", attention + "q.weight")
    missing = [k for k in needed if k not in weights]
    if missing:
        raise ValueError(f"{source}: T5-XXL: the weights lack {missing}")
    vocab, width = weights["shared.weight"].shape
    buckets, heads = weights[needed[1]].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in weights
    ff = weights[f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight"]
    layers = {m.group(1) for k in weights if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    return {"vocab_size": vocab, "d_model": width, "num_heads": heads, "d_kv": weights[needed[2]].shape[0] // heads,
            "d_ff": ff.shape[0], "num_layers": len(layers), "relative_attention_num_buckets": buckets,
            "feed_forward_proj": "gated-gelu" if gated else "relu", "dropout_rate": 0.0}


def load_t5(weights: dict, source: str):
    """A T5EncoderModel holding the file's tensors themselves (T5-XXL's 4.7B parameters stay in the file's
    dtype: no float32 copy), all-or-nothing."""
    from transformers import T5Config, T5EncoderModel
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**t5_config_from_weights(weights, source)))
    weights = {"encoder.embed_tokens.weight": weights["shared.weight"], **weights}   # tied to shared
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                        # "copying into a meta parameter is a no-op": it is
        load_state_dict_strict(model, weights, source)       # here only to check names and shapes
    model.load_state_dict(weights, assign=True)
    model.tie_weights()
    return model


def check_t5_tokenizer(folder: Path, vocab: int) -> None:
    """A T5 tokenizer that loads offline and whose ids fit the encoder's embedding table."""
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        raise ValueError(f"{folder}: not a T5 tokenizer folder ({type(err).__name__}: {err})") from err
    if len(tokenizer) > vocab:
        raise ValueError(f"{folder}: the tokenizer has {len(tokenizer)} tokens, more than T5's {vocab} embeddings")


def sd3_text_encoders(state: dict, folder: Path, source: str, text_config: str | None, donor: str | None,
                      t5_tokenizer: str | None) -> None:
    """SD3's text parts into `folder` as a diffusers SD3 pipeline names them: the file's CLIPs and T5 where it has
    them, else the `donor` folder's (--text-encoders); T5's tokenizer from `t5_tokenizer` or the donor's."""
    from ldm.models.clip_bpe import write_clip_tokenizer
    has = {name: any(k.startswith(prefix) for k in state) for name, prefix in SD3_TEXT.items()}
    donor = Path(donor) if donor else None
    if t5_tokenizer and not has["t5"]:
        raise ValueError(f"--t5-tokenizer {t5_tokenizer}: {source} holds no T5 ({SD3_TEXT['t5']})")
    if has["clip_l"] != has["clip_g"]:
        lacking = SD3_TEXT["clip_g" if has["clip_l"] else "clip_l"]
        raise ValueError(f"{source}: an SD3 file with one CLIP only: no {lacking} weights")
    if has["clip_l"]:
        for suffix, clip, pad_token in sd3_clips(state, text_config, source):
            clip.save_pretrained(str(folder / f"text_encoder{suffix}"))
            write_clip_tokenizer(folder / f"tokenizer{suffix}", clip.config.max_position_embeddings,
                                 pad_token=pad_token)
    elif donor is None:
        raise ValueError(f"{source}: an SD3 file without its text encoders (no {SD3_TEXT['clip_l']} / "
                         f"{SD3_TEXT['clip_g']} weights): give --text-encoders DIR, a diffusers SD3 pipeline folder "
                         f"(or one with its {list(SD3_TEXT_PARTS)})")
    else:
        missing = [part for part in SD3_TEXT_PARTS if not (donor / part).is_dir()]
        if missing:
            raise FileNotFoundError(f"--text-encoders {donor}: lacks {missing} (need {list(SD3_TEXT_PARTS)})")
        for part in SD3_TEXT_PARTS:
            copy_text_part(donor / part, folder / part, None)
    donor_t5 = [part for part in T5_PARTS if donor and (donor / part).is_dir()]
    if has["t5"]:
        tokenizer = Path(t5_tokenizer) if t5_tokenizer else donor / T5_PARTS[1] if T5_PARTS[1] in donor_t5 else None
        if tokenizer is None:
            warnings.warn(f"{source}: its T5 is left out, the folder conditions on zeros in its place: T5's tokenizer "
                          "is not in the file; give --t5-tokenizer DIR (google/t5-v1_1-xxl's, or an SD3 pipeline's "
                          "tokenizer_3/) to keep it", stacklevel=3)
            return
        t5 = load_t5(_under(state, SD3_TEXT["t5"]), source)
        check_t5_tokenizer(tokenizer, t5.config.vocab_size)
        t5.save_pretrained(str(folder / T5_PARTS[0]))
        copy_text_part(tokenizer, folder / T5_PARTS[1], None)
    elif donor_t5:
        if len(donor_t5) < len(T5_PARTS):
            raise FileNotFoundError(f"--text-encoders {donor}: has {donor_t5} only (need {list(T5_PARTS)} both or "
                                    "neither)")
        for part in T5_PARTS:
            copy_text_part(donor / part, folder / part, None)


def check_text_widths(folder: Path, cfg) -> None:
    """The text parts' widths against the MMDiT's: the pooled projections add up to pooled_dim, the CLIPs' tokens
    fit the context, T5's are as wide."""
    config = {part: json.loads((folder / part / "config.json").read_text())
              for part in ("text_encoder", "text_encoder_2", T5_PARTS[0]) if (folder / part).is_dir()}
    pooled = config["text_encoder"]["projection_dim"] + config["text_encoder_2"]["projection_dim"]
    tokens = config["text_encoder"]["hidden_size"] + config["text_encoder_2"]["hidden_size"]
    t5 = config.get(T5_PARTS[0], {}).get("d_model", cfg.context_dim)
    if (pooled, t5) != (cfg.pooled_dim, cfg.context_dim) or tokens > cfg.context_dim:
        raise ValueError(f"SD3's text encoders do not fit its transformer: pooled {pooled} (the transformer takes "
                         f"{cfg.pooled_dim}), CLIP tokens {tokens} and T5 tokens {t5} wide (context "
                         f"{cfg.context_dim}); is --text-encoders / --text-config this model's?")


def convert_sd3(state: dict, tmp: Path, out: str, source: str, *, guidance: float, dtype: str,
                resolution: int | None, unet_config: str | None, vae_config: str | None, text_config: str | None,
                donor: str | None, t5_tokenizer: str | None):
    """An SD3 / SD 3.5 file -> a model folder: our MMDiT in unet/, the 16-channel autoencoder, the text parts
    (sd3_text_encoders; `donor`: the --text-encoders folder), rectified flow with shift 3."""
    from ldm.models.convert_mmdit import load_original_mmdit, mmdit_config_from_diffusers, mmdit_config_from_original
    mmdit = {k[len(COMPVIS_PREFIX):]: v for k, v in state.items() if k.startswith(COMPVIS_PREFIX)}
    cfg = mmdit_config_from_diffusers(read_config(unet_config, {}, "unet")) if unet_config else \
        mmdit_config_from_original(mmdit)
    net = load_original_mmdit(mmdit, cfg, source)
    del mmdit
    autoencoder = load_compvis_autoencoder(state, diffusers_config_to_ours(read_config(vae_config, SD3_VAE, "vae")))
    side = save_networks(tmp, net, autoencoder, dtype)
    del autoencoder
    folder = tmp / "text_encoder" / CLIP_DIR
    sd3_text_encoders(state, folder, source, text_config, donor, t5_tokenizer)
    check_text_widths(folder, net.cfg)
    index = model_index_from_flow_scheduler(SD3_SCHEDULER, resolution or side, guidance)
    finish_folder(tmp, out, index, kind="sd3", joint_dim=net.cfg.context_dim)
    return index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm.models.from_single_file", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an SD 1.x / 2.x / SDXL (base or refiner) / SD3 / SD 3.5 checkpoint: "
                                           ".safetensors, or .ckpt (read with weights_only); or a FLUX.1-dev / "
                                           "-schnell file: BFL's transformer alone or ComfyUI's all-in-one")
    add_output_args(parser)
    parser.set_defaults(guidance=None)
    parser.add_argument("--prediction", choices=["eps", "v"],
                        help="what an SD U-Net predicts (default eps: SD 1.x, SD 2.x base; v for SD 2.x 768-v files; "
                             "the file does not say); SD3 and FLUX.1 files: flow, not an option")
    parser.add_argument("--resolution", type=int, metavar="PX",
                        help="the image side the model was trained at (default: the autoencoder config's: 512, "
                             "SDXL and SD3 1024; give 768 for SD 2.x 768-v files)")
    for part, what in (("unet", "diffusers UNet2DConditionModel (SD3: SD3Transformer2DModel, FLUX.1: "
                                "FluxTransformer2DModel) config.json (default: built in by the file's kind; an SD3 or "
                                "FLUX.1 transformer's sizes are read off its weights)"),
                       ("vae", "diffusers AutoencoderKL config.json (default: built in by the file's kind; FLUX.1: "
                               "entries over its built-in config)"),
                       ("text", "transformers CLIPTextModel config.json of CLIP ViT-L (default: SD 1.x's; SD 2.x's "
                                "OpenCLIP: entries over what its weights say)")):
        parser.add_argument(f"--{part}-config", metavar="JSON", help=f"a {what}")
    parser.add_argument("--text-encoders", metavar="DIR",
                        help="SD3: the text encoders the file lacks, from a diffusers SD3 pipeline folder "
                             "(text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, optionally text_encoder_3/, "
                             "tokenizer_3/); needed for files without CLIPs, e.g. sd3_medium.safetensors. FLUX.1: "
                             "CLIP-L, T5 and the autoencoder the file lacks, from a diffusers FLUX.1 pipeline folder "
                             "(text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, vae/); needed for BFL's "
                             "flux1-dev / flux1-schnell.safetensors")
    parser.add_argument("--t5-tokenizer", metavar="DIR",
                        help="SD3 and FLUX.1 files with T5-XXL: its tokenizer folder (google/t5-v1_1-xxl's, or an "
                             "SD3 pipeline's tokenizer_3/, a FLUX.1 pipeline's tokenizer_2/; default: --text-encoders' "
                             "tokenizer_3/ (FLUX.1: tokenizer_2/), else SD3 leaves T5 out, with a warning, and "
                             "FLUX.1 stops)")
    parser.add_argument("--vae", metavar="FILE",
                        help="FLUX.1: the autoencoder file, Black Forest Labs' ae.safetensors (CompVis names); wins "
                             "over the file's own and --text-encoders' vae/")
    parser.add_argument("--flux-kind", choices=["auto", "kontext"], default="auto",
                        help="FLUX.1: what the weights cannot tell; kontext: a FLUX.1 Kontext [dev] file (its shapes "
                             "are -dev's; ldm.img2img then edits with it). auto (default): -dev / -schnell, Fill or "
                             "Depth / Canny by the tensors' shapes")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        index = convert(args.checkpoint, args.out, prediction=args.prediction, guidance=args.guidance,
                        dtype=args.dtype, resolution=args.resolution, unet_config=args.unet_config,
                        vae_config=args.vae_config, text_config=args.text_config, text_encoders_from=args.text_encoders,
                        t5_tokenizer=args.t5_tokenizer, vae=args.vae, flux_kind=args.flux_kind)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        parser.error(str(err))
    flow = index.schedule["name"] == "rectified_flow"
    shift = "resolution-dependent shift" if index.dynamic_shift else f"shift {index.schedule.get('shift', 1):g}"
    schedule = f"rectified flow ({shift}), " if flow else ""
    flux = json.loads((Path(args.out) / "text_encoder" / "config.json").read_text())["kind"] == "flux"
    # FluxPipeline's default 28 steps for -dev; -schnell is distilled for 1-4; SD: a usual 25 with DPM++ 2M
    steps = ("--steps 28" if index.guidance_embed else "--steps 4") if flux else "--steps 25 --sampler dpmpp_2m"
    print(f"{args.out}: {index.resolution} px, {schedule}prediction {index.prediction}, w = {index.guidance:g}; try: "
          f"python -m ldm.txt2img \"a photo of a corgi\" --model {args.out} {steps}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
