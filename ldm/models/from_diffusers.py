"""A diffusers Stable Diffusion pipeline (SD 1.x / 2.x / SDXL base and refiner / SD3 layout / InstructPix2Pix) -> one of
our model folders.

    python -m ldm.models.from_diffusers runwayml/stable-diffusion-v1-5 --out models/sd15
    python -m ldm.models.from_diffusers /data/my-sd-pipeline --out models/mine --dtype float16
    python -m ldm.models.from_diffusers stabilityai/stable-diffusion-xl-base-1.0 --variant fp16 --out models/sdxl
    python -m ldm.models.from_diffusers stabilityai/stable-diffusion-3-medium-diffusers --out models/sd3 --guidance 6
    python -m ldm.txt2img "a corgi on a beach" --model models/sd15 --steps 25
    accelerate launch stages/distill.py --config configs/distill/sd15.yaml teacher=models/sd15 ...

The source is a local pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/) or a hub repo id, downloaded, or found in the local Hugging Face cache when offline.
The U-Net and the autoencoder are converted to our modules (ldm.models.convert_unet, convert_ae);
the CLIP text encoder and its tokenizer are copied as they are into text_encoder/clip/ and run
through transformers (`TextEncoderConfig(kind="clip")`); SDXL's two encoders and tokenizers likewise
(`kind="sdxl"`, ldm.models.text_sdxl), its U-Net with the added size/pooled-text embedding. SD3 (Esser et al.
2024): its transformer becomes our MMDiT (ldm.models.convert_mmdit), its two CLIPs and optional T5 are copied
(`kind="sd3"`, ldm.models.text_sd3), its flow-matching scheduler becomes the rectified-flow schedule with the
scheduler's shift and flow prediction. An InstructPix2Pix pipeline (SD's or SDXL's) is an SD one whose U-Net takes the
input image's latents too: image_input "instruct-pix2pix" (ldm.instruct_pix2pix). The scheduler's betas and prediction type
become model_index.json's schedule and prediction. Sampling uses our trailing-spaced grids (Lin et
al. 2023), not the scheduler's "leading" spacing, and ends at clean data.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from ldm.instruct_pix2pix import INSTRUCT
from ldm.instruct_pix2pix import PIPELINES as INSTRUCT_PIPELINES
from ldm.instruct_pix2pix import check_unet as check_instruct_unet
from ldm.models.convert_ae import load_diffusers_autoencoder
from ldm.models.convert_unet import load_diffusers_unet
from ldm.models.text import TextEncoderConfig
from ldm.pipeline import ModelIndex, save_index

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}   # diffusers' names -> ours
SCHEDULES = ("scaled_linear", "linear")                                # beta_schedule values we build
TEXT_ENCODERS = ("CLIPTextModel",)
TEXT_ENCODERS_2 = ("CLIPTextModelWithProjection",)   # SDXL's second encoder
REFINER_AESTHETIC = [6.0, 2.5]             # the SDXL refiner's scores for the prompt and the unconditional
                                           # half (diffusers' defaults of its call)
CLIP_DIR = "clip"                          # text_encoder/clip/{text_encoder,tokenizer}: the copied CLIP
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HUB_FILES = ["model_index.json", "scheduler/*", "text_encoder/config.json", "text_encoder/model.safetensors",
             "tokenizer/*", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder_2/config.json",
             "text_encoder_2/model.safetensors", "tokenizer_2/*",
             # SD3: the transformer (one file, or shards and their index), the optional T5 likewise
             "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
             "transformer/diffusion_pytorch_model.safetensors.index.json", "transformer/diffusion_pytorch_model-*",
             "text_encoder_3/config.json", "text_encoder_3/model.safetensors", "text_encoder_3/model.safetensors.index.json",
             "text_encoder_3/model-*", "tokenizer_3/*",
             "text_encoder_2/model.safetensors.index.json", "text_encoder_2/model-*"]   # FLUX.1's T5 in shards
SD3_PARTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
SD3_OPTIONAL = ("text_encoder_3", "tokenizer_3")            # T5: SD3 runs without it (zeros in its place)
SD3_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
FLUX_PARTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
FLUX_T5_TOKENS = 512                                      # FluxPipeline's default max_sequence_length
DEFAULT_GUIDANCE = {"sd": 6.5,            # SD's guidance scale 7.5 = 1 + w
                    "sd3": 6.0,           # SD3's 7.0
                    "flux-dev": 2.5,      # FLUX.1-dev's distilled guidance 3.5 (an input of the net, not CFG)
                    "flux": 0.0}          # FLUX.1-schnell: timestep-distilled, no guidance


def hub_files(variant: str | None = None) -> list[str]:
    """The files of a pipeline that the import reads, with each weight file's `variant` (e.g. "fp16", half
    the download) instead of the full-precision one."""
    if not variant:
        return HUB_FILES
    return [f.replace(".safetensors", f".{variant}.safetensors") if f.endswith("model.safetensors") else f
            for f in HUB_FILES]


def copy_text_part(src: Path, dst: Path, variant: str | None) -> None:
    """A text encoder or tokenizer folder; with `variant`, its model.<variant>.safetensors is copied as
    model.safetensors (the name transformers loads by default) and the other weight files are left out."""
    if not variant or not (src / "config.json").is_file():
        shutil.copytree(src, dst)
        return
    weights = src / f"model.{variant}.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{src}: no model.{variant}.safetensors (--variant {variant})")
    shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if n.startswith(("model.", "model-",
                                                                                           "pytorch_model"))])
    shutil.copy2(weights, dst / "model.safetensors")


def resolve_source(source: str, patterns: list[str] = HUB_FILES, what: str = "a diffusers pipeline folder") -> Path:
    """A local folder, else a hub repo id: its files matching `patterns` downloaded, or taken from the local
    cache when offline."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{source}: expected {what}, got a file")
        return path
    if source.count("/") != 1:
        raise FileNotFoundError(f"{source!r} is neither a folder nor a hub repo id 'org/name'")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as err:  # no network: the cache may still hold it
        try:
            return Path(snapshot_download(source, allow_patterns=patterns, local_files_only=True))
        except Exception:
            raise FileNotFoundError(f"{source!r}: not downloadable ({type(err).__name__}: {err}) "
                                    "and not in the local Hugging Face cache") from err


def is_sd3(pipeline: dict) -> bool:
    """Whether a model_index.json is an SD3 pipeline's (its denoiser is a transformer, not Flux's)."""
    return not is_flux(pipeline) and ("transformer" in pipeline or
                                      str(pipeline.get("_class_name", "")).startswith("StableDiffusion3"))


def is_flux(pipeline: dict) -> bool:
    """Whether a model_index.json is a FLUX.1 pipeline's."""
    return str(pipeline.get("_class_name", "")).startswith("Flux")


def check_sd3_pipeline(src: Path, pipeline: dict) -> bool:
    """Whether an SD3 pipeline folder has its parts (the missing ones named) and holds T5."""
    t5 = [part for part in SD3_OPTIONAL if (pipeline.get(part) or [None])[0] and (src / part).is_dir()]
    missing = [part for part in SD3_PARTS if not (src / part).is_dir()]
    missing += [part for part in SD3_OPTIONAL if t5 and part not in t5]
    if missing:
        raise FileNotFoundError(f"{src}: the SD3 pipeline lacks {missing} (need {list(SD3_PARTS)}, and "
                                f"{list(SD3_OPTIONAL)} both or neither)")
    return bool(t5)


def model_index_from_flow_scheduler(scheduler: dict, resolution: int, guidance: float,
                                    dynamic: bool = False) -> ModelIndex:
    """A flow-matching scheduler in model_index.json's terms: rectified flow with its shift, flow prediction,
    the transformer fed 1000 t (diffusers' timestep = 1000 sigma). dynamic: FLUX.1's resolution-dependent
    shift (`use_dynamic_shifting`, exponential) is read too; SD3's scheduler has a fixed shift."""
    name = scheduler.get("_class_name")
    if name not in SD3_SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is not supported; only {SD3_SCHEDULERS}")
    for key in ("use_dynamic_shifting",) * (not dynamic) + ("use_karras_sigmas", "use_exponential_sigmas",
                                                            "use_beta_sigmas", "invert_sigmas", "stochastic_sampling"):
        if scheduler.get(key):
            raise ValueError(f"scheduler {key}=true is not supported (SD3 and SD 3.5 use a fixed shift)")
    if scheduler.get("shift_terminal"):
        raise ValueError("scheduler shift_terminal is not supported")
    schedule = {"name": "rectified_flow", "shift": float(scheduler.get("shift", 1.0))}
    index = ModelIndex(schedule=schedule, prediction="flow", time_scale=float(scheduler.get("num_train_timesteps", 1000)),
                       resolution=resolution, guidance=guidance, student_prediction="flow")
    if dynamic and scheduler.get("use_dynamic_shifting"):
        if scheduler.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"scheduler time_shift_type {scheduler['time_shift_type']!r}: only 'exponential'")
        schedule["shift"] = 1.0                        # the dynamic shift replaces it (diffusers ignores it too)
        index.dynamic_shift = {"base_seq_len": int(scheduler.get("base_image_seq_len", 256)),
                               "max_seq_len": int(scheduler.get("max_image_seq_len", 4096)),
                               "base_shift": float(scheduler.get("base_shift", 0.5)),
                               "max_shift": float(scheduler.get("max_shift", 1.15))}
    return index


def check_pipeline(src: Path) -> dict:
    """The pipeline's model_index.json, once its folders are found to hold the parts and classes we convert
    (the missing ones are named)."""
    index_path = src / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} is missing: not a diffusers pipeline folder")
    index = json.loads(index_path.read_text())
    parts = PARTS + (SDXL_PARTS if index.get("text_encoder_2") else ())
    if index.get("text_encoder_2") and not (index.get("text_encoder") or [None])[0]:   # SDXL's refiner: bigG alone
        parts = tuple(p for p in parts if p not in ("text_encoder", "tokenizer"))
    missing = [part for part in parts if not (src / part).is_dir()]
    if missing:
        raise FileNotFoundError(f"{src}: the pipeline lacks {missing} (need {list(parts)})")
    for part, classes in (("text_encoder", TEXT_ENCODERS), ("text_encoder_2", TEXT_ENCODERS_2)):
        text_class = (index.get(part) or [None, None])[1]
        if part in parts and text_class not in classes:
            raise ValueError(f"{src}: {part} is {text_class!r}; only {classes} (SD 1.x / 2.x / SDXL) are supported")
    return index


def model_index_from_scheduler(scheduler: dict, resolution: int, guidance: float) -> ModelIndex:
    """The scheduler's discrete VP schedule and prediction type in model_index.json's terms."""
    beta_schedule = scheduler.get("beta_schedule", "linear")
    if beta_schedule not in SCHEDULES:
        raise ValueError(f"scheduler beta_schedule {beta_schedule!r} is not supported; only {SCHEDULES}")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise ValueError(f"scheduler prediction_type {prediction!r} is not supported; only {sorted(PREDICTIONS)}")
    if scheduler.get("trained_betas"):
        raise ValueError("scheduler trained_betas (explicit betas) are not supported")
    schedule = {"name": beta_schedule, "T": int(scheduler.get("num_train_timesteps", 1000)),
                "beta_start": float(scheduler.get("beta_start", 0.0001)),
                "beta_end": float(scheduler.get("beta_end", 0.02))}
    if scheduler.get("rescale_betas_zero_snr"):   # Lin et al. 2024: trained with alpha = 0 at the last step
        schedule["zero_snr"] = True
    # time_scale 1: a discrete schedule's t is already the integer timestep the U-Net was trained on
    return ModelIndex(schedule=schedule, prediction=PREDICTIONS[prediction], time_scale=1.0,
                      resolution=resolution, guidance=guidance)


def start_folder(out: str) -> Path:
    """A fresh `out`.tmp to write into; refuses to replace a model folder."""
    if os.path.exists(os.path.join(out, "model_index.json")):
        raise FileExistsError(f"{out} already holds a model folder; remove it or pick another --out")
    tmp = Path(f"{out}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def save_networks(tmp: Path, unet, autoencoder, dtype: str) -> int:
    """unet/ and autoencoder/ in `dtype`; the model's image side (the autoencoder's resolution)."""
    unet.save_pretrained(str(tmp / "unet"), dtype=DTYPES[dtype])
    autoencoder.to(DTYPES[dtype]).save_pretrained(tmp / "autoencoder")
    return autoencoder.config.resolution


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """--out, --guidance, --dtype: what both importers write."""
    parser.add_argument("--out", required=True, metavar="DIR", help="the model folder to write")
    parser.add_argument("--guidance", type=float, default=6.5, metavar="W",
                        help="default w written to model_index.json (our (1 + w) convention: SD's scale 7.5 is "
                             "6.5); from_diffusers: the family's own unless given (SD 6.5, SD3 6.0, FLUX.1-dev 2.5 = "
                             "its distilled scale 3.5, schnell 0)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="weights of unet/ and autoencoder/ (default float32: no rounding)")


def finish_folder(tmp: Path, out: str, index: ModelIndex, **text_options) -> None:
    """The CLIP text encoder's config (the model sits in text_encoder/clip/; `text_options`: e.g. SDXL's
    kind), model_index.json, then `out`.tmp becomes `out` in one rename."""
    text_cfg = TextEncoderConfig(**{"kind": "clip", "path": CLIP_DIR, "max_length": 77, "local_files_only": True,
                                    "mask_padding": False,     # SD's U-Net attends to all 77 tokens
                                    **text_options})
    (tmp / "text_encoder" / "config.json").write_text(json.dumps(dataclasses.asdict(text_cfg), indent=2))
    save_index(str(tmp), index)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)          # an empty or half-written folder from before
    os.replace(tmp, out)


def convert(source: str, out: str, *, guidance: float | None = None, dtype: str = "float32",
            variant: str | None = None) -> ModelIndex:
    """Write a model folder at `out` (autoencoder/, text_encoder/, unet/, model_index.json); atomic.
    guidance: the default w written to model_index.json; None: the family's (DEFAULT_GUIDANCE).
    variant: read the pipeline's <name>.<variant>.safetensors weights (e.g. "fp16") instead of the plain ones."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tmp = start_folder(out)
    src = resolve_source(source, hub_files(variant))
    found = json.loads((src / "model_index.json").read_text()) if (src / "model_index.json").is_file() else {}
    if is_flux(found):
        return convert_flux(src, found, tmp, out, guidance=guidance, dtype=dtype, variant=variant)
    if is_sd3(found):
        return convert_sd3(src, found, tmp, out, guidance=DEFAULT_GUIDANCE["sd3"] if guidance is None else guidance,
                           dtype=dtype, variant=variant)
    guidance = DEFAULT_GUIDANCE["sd"] if guidance is None else guidance
    pipeline = check_pipeline(src)
    sdxl = bool(pipeline.get("text_encoder_2"))
    scheduler = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    unet = load_diffusers_unet(str(src), subfolder="unet", variant=variant)
    autoencoder = load_diffusers_autoencoder(src, subfolder="vae", variant=variant)
    instruct = pipeline.get("_class_name") in INSTRUCT_PIPELINES     # InstructPix2Pix: 4 + 4 input channels
    if instruct:
        check_instruct_unet(unet.cfg.in_channels, autoencoder.config.z_channels, str(src))
    resolution = save_networks(tmp, unet, autoencoder, dtype)
    for part in ("text_encoder", "tokenizer") + (SDXL_PARTS if sdxl else ()):
        if (src / part).is_dir():                      # the SDXL refiner has no first encoder
            copy_text_part(src / part, tmp / "text_encoder" / CLIP_DIR / part, variant)
    index = model_index_from_scheduler(scheduler, resolution, guidance)
    if pipeline.get("requires_aesthetics_score"):      # the refiner
        index.aesthetic = list(REFINER_AESTHETIC)
    if instruct:                                       # edits an image (ldm.instruct_pix2pix)
        index.image_input = INSTRUCT
    # SDXL draws the unconditional half from zeroed embeddings unless its pipeline says otherwise
    finish_folder(tmp, out, index, **({"kind": "sdxl", "zero_empty": bool(pipeline.get("force_zeros_for_empty_prompt",
                                                                                        True))} if sdxl else {}))
    return index


def convert_sd3(src: Path, pipeline: dict, tmp: Path, out: str, *, guidance: float, dtype: str,
                variant: str | None) -> ModelIndex:
    """An SD3 / SD 3.5 pipeline folder -> a model folder: the transformer as our MMDiT in unet/, the 16-channel
    autoencoder, the text encoders copied (T5 if the pipeline has it), the rectified-flow schedule. pipeline:
    its model_index.json."""
    from ldm.models.convert_mmdit import load_diffusers_mmdit
    t5 = check_sd3_pipeline(src, pipeline)
    scheduler = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    net = load_diffusers_mmdit(str(src), subfolder="transformer", variant=variant)
    resolution = save_networks(tmp, net, load_diffusers_autoencoder(src, subfolder="vae", variant=variant), dtype)
    for part in SD3_PARTS[3:] + (SD3_OPTIONAL if t5 else ()):
        copy_text_part(src / part, tmp / "text_encoder" / CLIP_DIR / part, variant)
    index = model_index_from_flow_scheduler(scheduler, resolution, guidance)
    finish_folder(tmp, out, index, kind="sd3", joint_dim=net.cfg.context_dim)
    return index


def flux_image_input(pipeline: dict, net, autoencoder, src: Path) -> str:
    """What image a FLUX.1 pipeline's net takes besides the noise (ldm.flux_tools.PIPELINES; "" for FluxPipeline
    and the other pipelines of the text-to-image net), its class and its input channels agreeing."""
    from ldm.flux_tools import PIPELINES, image_input_from_channels
    name = pipeline.get("_class_name")
    kind = PIPELINES.get(name, "")
    from_channels = image_input_from_channels(net.cfg.in_channels, autoencoder.config.z_channels,
                                              autoencoder.config.downsample_factor)
    if from_channels != ("" if kind == "kontext" else kind):
        raise ValueError(f"{src}: a {name} whose transformer takes {4 * net.cfg.in_channels} packed channels, "
                         f"which is {from_channels or 'text-to-image FLUX.1'}'s input")
    return kind


def convert_flux(src: Path, pipeline: dict, tmp: Path, out: str, *, guidance: float | None, dtype: str,
                 variant: str | None) -> ModelIndex:
    """A FLUX.1 pipeline folder (dev or schnell; Fill, Depth / Canny, Kontext) -> a model folder: the transformer
    as our Flux net in unet/, the 16-channel autoencoder, CLIP-L and T5 copied (text kind "flux"), rectified flow
    with the scheduler's resolution-dependent shift, and for -dev the guidance scale as the net's input
    (`guidance_embed`); the image the net takes besides the noise in `image_input` (ldm.flux_tools)."""
    from ldm.models.convert_flux import load_diffusers_flux
    missing = [part for part in FLUX_PARTS if not (src / part).is_dir()]
    if missing:
        raise FileNotFoundError(f"{src}: the FLUX.1 pipeline lacks {missing} (need {list(FLUX_PARTS)})")
    scheduler = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    net = load_diffusers_flux(str(src), subfolder="transformer", variant=variant)
    autoencoder = load_diffusers_autoencoder(src, subfolder="vae", variant=variant)
    image_input = flux_image_input(pipeline, net, autoencoder, src)
    resolution = save_networks(tmp, net, autoencoder, dtype)
    for part in FLUX_PARTS[3:]:
        copy_text_part(src / part, tmp / "text_encoder" / CLIP_DIR / part, variant)
    return finish_flux_folder(tmp, out, scheduler, resolution, guidance, net.cfg.guidance_embeds, image_input)


def finish_flux_folder(tmp: Path, out: str, scheduler: dict, resolution: int, guidance: float | None,
                       guidance_embeds: bool, image_input: str = "") -> ModelIndex:
    """A FLUX.1 folder's model_index.json and text config, then finish_folder: rectified flow with the scheduler's
    (resolution-dependent) shift; -dev (`guidance_embeds`) takes the guidance scale as the net's input; guidance
    None: the family's default w (Fill, Depth / Canny, Kontext: ldm.flux_tools.DEFAULT_GUIDANCE); T5 reads
    FLUX_T5_TOKENS; image_input: "fill", "control", "kontext" or "". Shared by the pipeline and the single-file
    import."""
    from ldm.flux_tools import DEFAULT_GUIDANCE as TOOL_GUIDANCE
    family = "flux-dev" if guidance_embeds else "flux"
    default = TOOL_GUIDANCE.get(image_input, DEFAULT_GUIDANCE[family])
    index = model_index_from_flow_scheduler(scheduler, resolution, default if guidance is None else guidance,
                                            dynamic=True)
    index.guidance_embed = guidance_embeds
    index.image_input = image_input
    finish_folder(tmp, out, index, kind="flux", t5_max_length=FLUX_T5_TOKENS)
    return index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm.models.from_diffusers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="diffusers pipeline folder or hub repo id (e.g. runwayml/stable-diffusion-v1-5)")
    add_output_args(parser)
    parser.set_defaults(guidance=None)      # each family's own default (DEFAULT_GUIDANCE)
    parser.add_argument("--variant", metavar="NAME", help="read the weight files of this variant (e.g. fp16: half "
                        "the download; stored as --dtype says)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        index = convert(args.source, args.out, guidance=args.guidance, dtype=args.dtype, variant=args.variant)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        parser.error(str(err))
    print(f"{args.out}: {index.resolution} px, schedule {index.schedule['name']}, prediction {index.prediction}, "
          f"w = {index.guidance:g}; try: python -m ldm.txt2img \"a photo of a corgi\" --model {args.out} --steps 25")


if __name__ == "__main__":
    main()
