"""One Stable Diffusion 1.x, 2.x or SDXL base checkpoint file (the CompVis / Stability AI layout most
fine-tunes ship in, .safetensors or .ckpt) -> one of our model folders.

    python -m ldm.models.from_single_file v1-5-pruned-emaonly.safetensors --out models/sd15
    python -m ldm.models.from_single_file v2-1_768-ema-pruned.safetensors --prediction v --resolution 768 --out models/sd21
    python -m ldm.models.from_single_file sd_xl_base_1.0.safetensors --out models/sdxl
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
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ldm.models import convert_openclip
from ldm.models.convert_ae import read_checkpoint, diffusers_config_to_ours, load_compvis_autoencoder
from ldm.models.convert_unet import COMPVIS_PREFIX, load_compvis_unet, unet_config_from_diffusers
from ldm.models.from_diffusers import (CLIP_DIR, DTYPES, PREDICTIONS, REFINER_AESTHETIC, add_output_args,
                                       finish_folder, model_index_from_scheduler, save_networks, start_folder)
from ldm.models.text import clip_name
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
UNETS = {"sd1": SD1_UNET, "sd2": SD2_UNET, "sdxl": SDXL_UNET, "refiner": REFINER_UNET}
VAES = {"sd1": SD1_VAE, "sd2": SD1_VAE, "sdxl": SDXL_VAE, "refiner": SDXL_VAE}


def check_layout(state: dict, source: str) -> str:
    """"sd1", "sd2", "sdxl" or "refiner" (by the text towers), or an error that says what the file is."""
    if any(k.startswith("conditioner.embedders.") for k in state):
        version = "sdxl" if any(k.startswith(XL_CLIP_PREFIX) for k in state) else "refiner"
    else:
        version = "sd2" if any(k.startswith(OPENCLIP_PREFIX) for k in state) else "sd1"
    prefixes = (COMPVIS_PREFIX, VAE_PREFIX, *TEXT_PREFIXES[version])
    missing = [p for p in prefixes if not any(k.startswith(p) for k in state)]
    if missing:
        raise ValueError(f"{source}: no {missing} weights: not a full SD 1.x / 2.x / SDXL (base or refiner) checkpoint "
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


def convert(checkpoint: str, out: str, *, prediction: str = "eps", guidance: float = 6.5, dtype: str = "float32",
            resolution: int | None = None, unet_config: str | None = None, vae_config: str | None = None,
            text_config: str | None = None):
    """Write a model folder at `out` from one CompVis-layout SD 1.x / 2.x / SDXL checkpoint file; atomic."""
    from ldm.models.clip_bpe import write_clip_tokenizer
    ours = {v: k for k, v in PREDICTIONS.items()}
    if prediction not in ours:
        raise ValueError(f"prediction must be one of {sorted(ours)}, got {prediction!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if resolution is not None and (resolution <= 0 or resolution % 8):
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    for what, name in (("unet", unet_config), ("vae", vae_config), ("text", text_config)):
        read_config(name, {}, what)              # a missing config is named before the checkpoint is read
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found")
    tmp = start_folder(out)
    state = read_checkpoint(path)
    version = check_layout(state, checkpoint)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm.models.from_single_file", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an SD 1.x / 2.x / SDXL base checkpoint: .safetensors, or .ckpt "
                                           "(read with weights_only)")
    add_output_args(parser)
    parser.add_argument("--prediction", default="eps", choices=["eps", "v"],
                        help="what the U-Net predicts (default eps: SD 1.x, SD 2.x base; v for SD 2.x 768-v files; "
                             "the file does not say)")
    parser.add_argument("--resolution", type=int, metavar="PX",
                        help="the image side the model was trained at (default: the autoencoder config's: 512, "
                             "SDXL 1024; give 768 for SD 2.x 768-v files)")
    for part, what in (("unet", "diffusers UNet2DConditionModel"), ("vae", "diffusers AutoencoderKL"),
                       ("text", "transformers CLIPTextModel")):
        parser.add_argument(f"--{part}-config", metavar="JSON",
                            help=f"a {what} config.json (default: SD 1.x's or 2.x's, by the file's text tower)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        index = convert(args.checkpoint, args.out, prediction=args.prediction, guidance=args.guidance,
                        dtype=args.dtype, resolution=args.resolution, unet_config=args.unet_config, vae_config=args.vae_config,
                        text_config=args.text_config)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        parser.error(str(err))
    print(f"{args.out}: {index.resolution} px, prediction {index.prediction}, w = {index.guidance:g}; try: "
          f"python -m ldm.txt2img \"a photo of a corgi\" --model {args.out} --steps 25 --sampler dpmpp_2m")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
