"""FLUX.1-dev and -schnell as people download them, one .safetensors file -> one of our model folders
(`python -m ldm.models.from_single_file`, which tells the layout and calls `convert_flux_file`).

    python -m ldm.models.from_single_file flux1-dev.safetensors --text-encoders FLUX.1-dev --out models/flux-dev
    python -m ldm.models.from_single_file flux1-schnell.safetensors --vae ae.safetensors \\
        --text-encoders FLUX.1-schnell --out models/flux-schnell
    python -m ldm.models.from_single_file flux1-dev-fp8.safetensors --t5-tokenizer FLUX.1-dev/tokenizer_2 \\
        --out models/flux-dev
    python -m ldm.txt2img "a corgi on a beach" --model models/flux-schnell --steps 4

Two layouts are read:
- Black Forest Labs' transformer alone (flux1-dev.safetensors, flux1-schnell.safetensors): BFL's module names at
  the top level (img_in, double_blocks.N.img_attn.qkv, single_blocks.N.linear1, ...), no autoencoder, no text
  encoders. Converted by ldm.models.convert_flux (fused projections split, sizes read off the tensors).
- ComfyUI's all-in-one checkpoints: the same transformer under `model.diffusion_model.` (newer ComfyUI writes the
  q/k RMSNorm gains as `.weight` instead of BFL's `.scale`: both are read), the autoencoder under `vae.` in the
  CompVis names that BFL's ae.safetensors also uses (encoder.down.N.block.M, mid.attn_1 with 1x1-conv q/k/v, no
  quant_conv), CLIP-L under `text_encoders.clip_l.transformer.` and T5-XXL under `text_encoders.t5xxl.transformer.`,
  both in transformers' names (what diffusers' single-file loader reads too).

Dev or schnell is told by the guidance input (guidance_in): -dev gets FLUX.1-dev's scheduler (the shift dynamic in
the image's token count) and w = 2.5 (its distilled scale 3.5) as the net's input; -schnell a fixed shift 1 and w = 0.
The scheduler settings are those of black-forest-labs' diffusers repos (the file holds none); the rest of
model_index.json is written by the same code as ldm.models.from_diffusers writes for a FLUX.1 pipeline.
FLUX.1 Fill (img_in: 384 packed channels: the latents, the masked image's and the 8 x 8-folded mask) and Depth /
Canny (128: the latents and the control image's) are told by img_in's width against the autoencoder's channels and
factor, and recorded as model_index.json's image_input (ldm.flux_tools; Fill's default w is 29, Depth / Canny's 9);
FLUX.1 Kontext has -dev's shapes: `--flux-kind kontext` says what the file is (else it is read as -dev). FLUX.2, Chroma, and
ComfyUI's scaled fp8 (weights with `scale_weight` factors) are refused. float8 tensors (e4m3fn / e5m2 files) are cast on load: the
transformer, autoencoder and CLIP into float32 (then stored in --dtype), T5, kept in the file's dtype elsewhere,
into bfloat16 (exact).

What the file lacks is taken from elsewhere: the autoencoder from `--vae FILE` (BFL's ae.safetensors; it wins over
the file's own) or the `--text-encoders DIR` folder's vae/; CLIP-L and T5 from that folder's text_encoder/,
tokenizer/, text_encoder_2/, tokenizer_2/ (a diffusers FLUX.1 pipeline folder, either family's). A file's own T5
needs its tokenizer: `--t5-tokenizer DIR` or the folder's tokenizer_2/. `--vae-config` gives entries over FLUX.1's
built-in autoencoder config (FLUX_VAE), `--text-config` CLIP-L's whole config, `--unet-config` a
FluxTransformer2DModel config.json (for heads of other than FLUX.1's 128 channels).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ldm.flux_tools import image_input_from_channels
from ldm.models.convert_ae import diffusers_config_to_ours, load_compvis_autoencoder, load_diffusers_autoencoder, \
    read_checkpoint
from ldm.models.convert_flux import (ORIGINAL_PREFIXES, flux_config_from_diffusers, flux_config_from_original,
                                     load_original_flux, strip_original_prefix)
from ldm.models.from_diffusers import CLIP_DIR, copy_text_part, finish_flux_folder, save_networks
from ldm.models.from_single_file import (SD1_TEXT, SD3_TEXT, SD3_VAE, VAE_PREFIX, _under, check_t5_tokenizer,
                                         load_clip, load_t5, read_config)
from ldm.models.text_flux import PARTS as TEXT_PARTS

MARKER = "double_blocks.0.img_attn.qkv.weight"      # every FLUX.1 (BFL's names), at the top or under a prefix
PREFIXES = ORIGINAL_PREFIXES + ("",)
OTHERS = {"single_stream_modulation.lin.weight": "FLUX.2",                 # diffusers' detection keys of
          "distilled_guidance_layer.in_proj.bias": "Chroma"}               # relatives we do not build
CLIP_L, T5 = SD3_TEXT["clip_l"], SD3_TEXT["t5"]     # ComfyUI's text encoder prefixes (SD3's names)
COMFY_VAE_PREFIX = "vae."
CLIP_EXTRAS = ("text_projection.weight", "logit_scale")   # FLUX.1 reads CLIP-L's pooled output unprojected
# black-forest-labs/FLUX.1-dev and -schnell's scheduler/scheduler_config.json (BFL's sampling.get_schedule: shift
# mu from 0.5 at 256 tokens to 1.15 at 4096 for dev; schnell unshifted)
SCHEDULERS = {"dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                      "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                      "base_image_seq_len": 256, "max_image_seq_len": 4096},
              "schnell": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                          "shift": 1.0, "use_dynamic_shifting": False}}
# diffusers' AutoencoderKL config of FLUX.1's autoencoder = BFL's ae_params (ch 128, ch_mult 1 2 4 4, 2 res blocks,
# z 16): SD3's layout, its own latent statistics; the diffusion model works on (z - shift) * scale
FLUX_VAE = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FLUX_KINDS = ("auto", "kontext")                    # --flux-kind: what the shapes cannot tell


def flux_prefix(state: dict) -> str | None:
    """The prefix FLUX.1's transformer sits under in `state` ("" for BFL's own files), or None: not FLUX.1-like."""
    return next((p for p in PREFIXES if p + MARKER in state), None)


def widen_fp8(state: dict) -> dict:
    """float8 tensors as bfloat16: exact (bf16 has more exponent and mantissa bits than e4m3 and e5m2), for T5,
    which keeps its file's dtype (load_t5); the other loaders cast to float32 themselves."""
    return {k: v.to(torch.bfloat16) if v.dtype in FP8 else v for k, v in state.items()}


def check_flux_file(state: dict, source: str) -> None:
    """Refuse, by name, the files that look like FLUX.1 but are not FLUX.1-dev / -schnell or their image-conditioned
    relatives (Fill, Depth / Canny: told by img_in later, `flux_image_input`)."""
    prefix = flux_prefix(state)
    for key, family in OTHERS.items():
        if prefix + key in state:
            raise ValueError(f"{source}: a {family} transformer ({prefix}{key}); only FLUX.1-dev and -schnell are read")
    scaled = [k for k in state if k.endswith(".scale_weight") or k.rpartition(".")[2] == "scaled_fp8"]
    if scaled:
        raise ValueError(f"{source}: ComfyUI's scaled fp8 (per-tensor factors such as {scaled[0]}) is not read; "
                         "use a plain bf16 / fp16 / fp8 file")


def transformer_weights(state: dict) -> dict:
    """The file's transformer in BFL's names, prefix stripped, the q/k RMSNorm gains under BFL's `.scale`."""
    return {re.sub(r"_norm\.weight$", "_norm.scale", k): v for k, v in strip_original_prefix(state).items()}


def flux_autoencoder(state: dict, vae: str | None, donor: Path | None, vae_config: str | None, source: str):
    """The autoencoder: --vae FILE (BFL's ae.safetensors: CompVis names, bare or under `vae.` /
    `first_stage_model.`), else the file's `vae.`, else the --text-encoders folder's vae/ (diffusers)."""
    config = diffusers_config_to_ours({**FLUX_VAE, **read_config(vae_config, {}, "vae")})
    if vae is not None:
        weights = read_checkpoint(Path(vae))
        for prefix in (COMFY_VAE_PREFIX, VAE_PREFIX):
            if any(k.startswith(prefix) for k in weights):
                weights = _under(weights, prefix)
        return load_compvis_autoencoder(weights, config)
    for prefix in (COMFY_VAE_PREFIX, VAE_PREFIX):
        if any(k.startswith(prefix) for k in state):
            return load_compvis_autoencoder(_under(state, prefix), config)
    if donor is None or not (donor / "vae").is_dir():
        where = f"--text-encoders {donor} has no vae/" if donor else "no --text-encoders folder"
        raise ValueError(f"{source}: a FLUX.1 file without its autoencoder (no {COMFY_VAE_PREFIX} weights) and "
                         f"{where}: give --vae ae.safetensors (BFL's) or --text-encoders DIR, a diffusers FLUX.1 "
                         "pipeline folder")
    if vae_config:
        raise ValueError(f"--vae-config {vae_config}: the autoencoder comes from {donor / 'vae'}, with its own config")
    return load_diffusers_autoencoder(donor, subfolder="vae")


def flux_text_encoders(state: dict, folder: Path, source: str, text_config: str | None, donor: Path | None,
                       t5_tokenizer: str | None) -> None:
    """CLIP-L and T5 into `folder` as diffusers' FLUX.1 pipeline names them (text_encoder/, tokenizer/,
    text_encoder_2/, tokenizer_2/): the file's where it has them, else the donor folder's (--text-encoders)."""
    from ldm.models.clip_bpe import write_clip_tokenizer
    has_clip, has_t5 = (any(k.startswith(p) for k in state) for p in (CLIP_L, T5))
    if t5_tokenizer and not has_t5:
        raise ValueError(f"--t5-tokenizer {t5_tokenizer}: {source} holds no T5 ({T5}); T5 and its tokenizer come "
                         "from --text-encoders")
    needed = TEXT_PARTS[:2] * (not has_clip) + TEXT_PARTS[2:] * (not has_t5)
    if needed and donor is None:
        lacking = [p for p, has in ((CLIP_L, has_clip), (T5, has_t5)) if not has]
        raise ValueError(f"{source}: a FLUX.1 file without its text encoders (no {lacking} weights): give "
                         f"--text-encoders DIR, a diffusers FLUX.1 pipeline folder (with {list(TEXT_PARTS)})")
    missing = [part for part in needed if not (donor / part).is_dir()]
    if missing:
        raise FileNotFoundError(f"--text-encoders {donor}: lacks {missing} (need {list(needed)})")
    if text_config and not has_clip:
        raise ValueError(f"--text-config {text_config}: {source} holds no CLIP-L; CLIP-L comes from --text-encoders' "
                         "text_encoder/, with its own config")
    for part in needed:
        copy_text_part(donor / part, folder / part, None)
    if has_clip:
        weights = {k: v for k, v in _under(state, CLIP_L).items() if k not in CLIP_EXTRAS}
        clip = load_clip(weights, read_config(text_config, SD1_TEXT, "text"), source)
        clip.save_pretrained(str(folder / TEXT_PARTS[0]))
        write_clip_tokenizer(folder / TEXT_PARTS[1], clip.config.max_position_embeddings)   # pads with the end token
    if has_t5:
        tokenizer = Path(t5_tokenizer) if t5_tokenizer else donor / TEXT_PARTS[3] if donor else None
        if tokenizer is None or not tokenizer.is_dir():
            raise ValueError(f"{source}: its T5 needs T5's tokenizer, which the file does not hold: give "
                             "--t5-tokenizer DIR (google/t5-v1_1-xxl's, or a FLUX.1 pipeline's tokenizer_2/) or "
                             "--text-encoders DIR")
        t5 = load_t5(widen_fp8(_under(state, T5)), source)
        check_t5_tokenizer(tokenizer, t5.config.vocab_size)
        t5.save_pretrained(str(folder / TEXT_PARTS[2]))
        copy_text_part(tokenizer, folder / TEXT_PARTS[3], None)


def check_text_widths(folder: Path, cfg) -> None:
    """CLIP-L's width must be the transformer's pooled input, T5's its context width."""
    config = {part: json.loads((folder / part / "config.json").read_text()) for part in TEXT_PARTS[::2]}
    pooled, context = config[TEXT_PARTS[0]].get("hidden_size"), config[TEXT_PARTS[2]].get("d_model")
    if (pooled, context) != (cfg.pooled_dim, cfg.context_dim):
        raise ValueError(f"FLUX.1's text encoders do not fit its transformer: CLIP-L {pooled} wide (the pooled input "
                         f"is {cfg.pooled_dim}), T5 {context} wide (the context is {cfg.context_dim}); is "
                         "--text-encoders / --text-config this model's (a FLUX.1 pipeline's)?")


def convert_flux_file(state: dict, tmp: Path, out: str, source: str, *, guidance: float | None, dtype: str,
                      resolution: int | None, unet_config: str | None, vae_config: str | None,
                      text_config: str | None, donor: str | None, t5_tokenizer: str | None, vae: str | None,
                      kind: str = "auto"):
    """A FLUX.1 file -> a model folder at `out` (written in `tmp`): our Flux net in unet/, the 16-channel
    autoencoder, CLIP-L and T5 (text kind "flux"), the family's scheduler; the options as from_single_file's.
    kind: "auto" (-dev / -schnell, Fill or Depth / Canny by the tensors' shapes) or "kontext" (FLUX.1 Kontext,
    which has -dev's shapes: only the user can say)."""
    if kind not in FLUX_KINDS:
        raise ValueError(f"--flux-kind must be one of {FLUX_KINDS}, got {kind!r}")
    check_flux_file(state, source)
    donor = Path(donor) if donor else None
    weights = transformer_weights(state)
    cfg = flux_config_from_diffusers(read_config(unet_config, {}, "unet")) if unet_config else \
        flux_config_from_original(weights)
    folder = tmp / "text_encoder" / CLIP_DIR          # the text parts first: a wrong donor fails before the big load
    flux_text_encoders(state, folder, source, text_config, donor, t5_tokenizer)
    check_text_widths(folder, cfg)
    autoencoder = flux_autoencoder(state, vae, donor, vae_config, source)
    try:                                              # Fill / Depth / Canny by img_in's width
        image_input = image_input_from_channels(cfg.in_channels, autoencoder.config.z_channels,
                                                autoencoder.config.downsample_factor)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    if kind == "kontext":
        if image_input or not cfg.guidance_embeds:
            raise ValueError(f"{source}: --flux-kind kontext, but this is no -dev-shaped FLUX.1 "
                             f"({image_input or 'schnell: no guidance input'}); FLUX.1 Kontext [dev] has -dev's shapes")
        image_input = "kontext"
    side = save_networks(tmp, load_original_flux(weights, cfg, source), autoencoder, dtype)
    family = "dev" if cfg.guidance_embeds else "schnell"
    return finish_flux_folder(tmp, out, SCHEDULERS[family], resolution or side, guidance, cfg.guidance_embeds,
                              image_input)
