"""The AUTOMATIC1111 web UI's API requests (/sdapi/v1/...) read for ldm.serve: fields type-checked, translated into
the CLIs' flags (their parsers' usage errors become RequestError, HTTP 422, naming the request field), A1111
features we lack refused by name unless given their "off" value; base64 images in and out; infotext parsed."""
from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import math
import random
import re

from PIL import Image

from ldm.cli import CLI_SAMPLERS, SAMPLER_NAMES, SPACING_NAMES, grid_image, png_info
from ldm.diffusion.schedules import SPACINGS
from ldm.diffusion.variation import grid_seeds

# A1111 fields we do not implement, with the values we accept: "off", or A1111's default that clients send unasked
# (mask_blur 4: our mask stays hard, as ldm.inpaint's); other values are refused by name
UNSUPPORTED = {"restore_faces": (False,), "tiling": (False,), "styles": ([],), "script_name": ("",),
               "script_args": ([],), "save_images": (False,), "s_churn": (0,),
               "s_tmin": (0,), "s_tmax": (0, math.inf), "s_noise": (1,), "s_min_uncond": (0,),
               "seed_resize_from_h": (-1, 0), "seed_resize_from_w": (-1, 0), "firstphase_width": (0,),
               "firstphase_height": (0,), "hr_upscaler": ("Latent", ""), "hr_second_pass_steps": (0,),
               "hr_resize_x": (0,), "hr_resize_y": (0,), "hr_checkpoint_name": ("",), "hr_sampler_name": ("",),
               "hr_scheduler": ("",), "hr_prompt": ("",), "hr_negative_prompt": ("",), "refiner_checkpoint": ("",),
               "refiner_switch_at": (0,), "disable_extra_networks": (False,), "firstpass_image": ("",),
               "latent_mask": ("",), "image_cfg_scale": (1.5,),
               "initial_noise_multiplier": (1,), "mask_blur": (0, 4), "mask_blur_x": (0, 4), "mask_blur_y": (0, 4),
               "hr_additional_modules": ([],)}
# The fields we read (beside the UNSUPPORTED ones at their "off" value and the IGNORED ones)
COMMON_FIELDS = {"prompt", "negative_prompt", "steps", "cfg_scale", "sampler_name", "scheduler", "seed", "subseed",
                 "subseed_strength", "width", "height", "batch_size", "n_iter", "eta", "override_settings",
                 "send_images", "sampler_index",     # sampler_index: A1111's old name of sampler_name
                 "alwayson_scripts"}                 # its controlnet units: ldm.sdapi_controlnet
TXT2IMG_FIELDS = COMMON_FIELDS | {"enable_hr", "hr_scale", "denoising_strength"}
IMG2IMG_FIELDS = COMMON_FIELDS | {"init_images", "resize_mode", "denoising_strength", "mask", "inpainting_mask_invert",
                                  "include_init_images", "inpaint_full_res", "inpainting_fill"}
# A1111's inpainting_fill ("masked content") -> ldm.inpaint's --masked-content; 2 (latent noise) is what strength 1
# draws (the masked latents from pure noise), 3 (latent nothing) is not offered
MASKED_CONTENT = {0: "fill", 1: "original"}
# Fields that change nothing here, whatever their value: we save nothing, keep no tasks, always restore settings
IGNORED = {"do_not_save_samples", "do_not_save_grid", "override_settings_restore_afterwards", "force_task_id",
           "comments", "infotext", "user", "mask_round", "inpaint_full_res_padding"}
FLAG_FIELDS = {"--steps": "steps", "--guidance": "cfg_scale", "--seed": "seed", "--subseed": "subseed",
               "--subseed-strength": "subseed_strength", "--sampler": "sampler_name", "--spacing": "scheduler",
               "--eta": "eta", "--negative": "negative_prompt", "--size": "width/height", "--n": "batch_size",
               "--hires": "hr_scale/denoising_strength", "--strength": "denoising_strength",
               "--clip-skip": "CLIP_stop_at_last_layers"}
SCHEDULER_NAMES = {"karras": "karras", "exponential": "exponential", "beta": "beta", "ays": "align_your_steps",
                   "kl_optimal": "kl_optimal"}      # A1111's scheduler names (the labels are ldm.cli.SPACING_NAMES)


class RequestError(ValueError):
    """A request we refuse: HTTP 422 with this message (A1111 answers validation errors so)."""


def raise_usage(message: str):
    """A CLI parser's error as a RequestError, its flags named by the request fields they come from."""
    raise RequestError(re.sub(r"--[a-z][a-z0-9-]*", lambda m: f"{FLAG_FIELDS[m[0]]} ({m[0]})"
                              if m[0] in FLAG_FIELDS else m[0], message))


def cli_parser(module) -> argparse.ArgumentParser:
    """The CLI's parser whose usage errors raise RequestError instead of exiting."""
    parser = module.build_parser()
    parser.error = raise_usage
    return parser


TYPES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
         dict: "an object"}


def field(req: dict, name: str, kind: type, default=None):
    """req[name] checked to be of `kind` (an int passes as a float, a bool as neither); `default` when absent or
    null."""
    value = req.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind) and \
            not (kind is float and isinstance(value, int)):
        raise RequestError(f"{name}: expected {TYPES[kind]}, got {json.dumps(value)[:60]}")
    return float(value) if kind is float else value


def refuse_unsupported(req: dict, honoured: set[str]) -> list[str]:
    """RequestError for a feature we lack given a non-default value; the names of fields nobody reads."""
    for name, off in UNSUPPORTED.items():
        if name not in honoured and req.get(name) is not None and req[name] not in off:
            raise RequestError(f"{name}: {json.dumps(req[name])[:60]} is not supported by this server (accepted: "
                               f"{', '.join(json.dumps(v) for v in off)} or null)")
    return sorted(set(req) - honoured - set(UNSUPPORTED) - IGNORED)


def sampler_flags(name: str | None, scheduler: str | None) -> list[str]:
    """A1111's sampler_name (or ours; "DPM++ 2M Karras" carries its schedule) and scheduler -> --sampler / --spacing."""
    ours = {s.lower(): s for s in CLI_SAMPLERS} | {v.lower(): k for k, v in SAMPLER_NAMES.items()}
    labels = {v.lower(): k for k, v in SPACING_NAMES.items()} | {s: s for s in SPACINGS} | \
        {v: k for k, v in SCHEDULER_NAMES.items()}
    flags, spacing = [], None
    if name:
        key = name.strip().lower()
        if key not in ours:                                 # the old style: "DPM++ 2M Karras"
            key, spacing = next(((key[:-len(label) - 1], sp) for label, sp in labels.items()
                                 if key.endswith(" " + label) and key[:-len(label) - 1] in ours), (key, None))
        if key not in ours:
            raise RequestError(f"sampler_name: unknown sampler {name!r}; GET /sdapi/v1/samplers lists them: "
                               f"{', '.join(SAMPLER_NAMES.get(s, s) for s in CLI_SAMPLERS)}")
        flags.append(f"--sampler={ours[key]}")
    if scheduler and scheduler.strip().lower() != "automatic":
        if scheduler.strip().lower() not in labels:
            raise RequestError(f"scheduler: unknown scheduler {scheduler!r}; GET /sdapi/v1/schedulers lists them")
        if spacing not in (None, labels[scheduler.strip().lower()]):
            raise RequestError(f"scheduler: {scheduler!r} contradicts sampler_name {name!r}")
        spacing = labels[scheduler.strip().lower()]
    return flags + ([f"--spacing={spacing}"] if spacing else [])


def decode_image(text, name: str, mode: str = "RGB") -> Image.Image:
    """A base64 image (a data-URL prefix allowed) as an upright PIL image in `mode`."""
    from ldm.data.transforms import open_image
    data = decode_base64(text, name)
    try:
        return open_image(data, mode=mode)
    except Exception as err:                        # PIL's decode errors vary by format
        raise RequestError(f"{name}: not an image ({type(err).__name__}: {err})") from None


def decode_base64(text, name: str) -> bytes:
    """A base64 string's bytes; a data-URL prefix ("data:image/png;base64,") is dropped."""
    if not isinstance(text, str):
        raise RequestError(f"{name}: expected a base64 string, got {json.dumps(text)[:40]}")
    try:
        return base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"{name}: not base64 ({err})") from None


def encode_png(image, run: dict) -> str:
    """(3, H, W) in [-1, 1] -> base64 PNG with the CLI's text chunks."""
    buffer = io.BytesIO()
    grid_image(image[None]).save(buffer, format="PNG", pnginfo=png_info(run, (image.shape[-1], image.shape[-2])))
    return base64.b64encode(buffer.getvalue()).decode()


def parse_infotext(text: str) -> dict:
    """A1111 `parameters` text -> {"Prompt", "Negative prompt", "Steps", "Sampler", ...} (values as written)."""
    *head, last = text.strip().split("\n")
    if not re.match(r"\s*Steps: ", last):
        head, last = head + [last], ""
    negative = next((i for i, line in enumerate(head) if line.startswith("Negative prompt: ")), len(head))
    items = {"Prompt": "\n".join(head[:negative]),
             "Negative prompt": "\n".join(head[negative:])[len("Negative prompt: "):]}
    for key, value in re.findall(r'\s*([^,:]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', last):
        items[key] = unquote(value) if value.startswith('"') else value
    if re.fullmatch(r"\d+x\d+", items.get("Size", "")):
        items["Size-1"], items["Size-2"] = items["Size"].split("x")
    return items


def unquote(value: str) -> str:
    """A quoted infotext value ("mid,down.1", JSON's escapes) -> its text; as written where it is not JSON."""
    try:
        return json.loads(value)
    except ValueError:
        return value.strip('"')


def seeds(req: dict) -> tuple[list[int], list[int], float, int, int]:
    """All seeds and subseeds of a batch_size x n_iter request (-1: random, as A1111), the variation strength."""
    batch, n_iter = field(req, "batch_size", int, 1), field(req, "n_iter", int, 1)
    for name, value in (("batch_size", batch), ("n_iter", n_iter)):
        if value < 1:
            raise RequestError(f"{name} must be >= 1, got {value}")
    seed, subseed = field(req, "seed", int, -1), field(req, "subseed", int, -1)
    for name, value in (("seed", seed), ("subseed", subseed)):
        if value < -1:
            raise RequestError(f"{name} must be >= 0, or -1 for a random one; got {value}")
    strength = field(req, "subseed_strength", float, 0.0)
    if not 0.0 <= strength <= 1.0:
        raise RequestError(f"subseed_strength must be in [0, 1], got {strength}")
    seed = random.randrange(4294967294) if seed == -1 else seed
    subseed = random.randrange(4294967294) if subseed == -1 else subseed
    seeds, subseeds = grid_seeds(seed, batch * n_iter, subseed, strength)
    return seeds, subseeds, strength, batch, n_iter


def size_flags(req: dict, resolution: int) -> list[str]:
    """width, height -> --size (the other side the model's resolution); none given: no flag."""
    width, height = field(req, "width", int), field(req, "height", int)
    for name, value in (("width", width), ("height", height)):
        if value is not None and value < 1:
            raise RequestError(f"{name} must be >= 1, got {value}")
    if width is None and height is None:
        return []
    return [f"--size={width or resolution}x{height or resolution}"]


def sampler_list() -> list:
    """/sdapi/v1/samplers: A1111's name of each sampler (ours where it has none), ours as the alias."""
    return [{"name": SAMPLER_NAMES.get(s, s), "aliases": [s], "options": {}} for s in CLI_SAMPLERS]


def scheduler_list() -> list:
    """/sdapi/v1/schedulers: the spacings, A1111's names and labels where it has them (the fixed 'automatic' first)."""
    return [{"name": "automatic", "label": "Automatic", "aliases": [], "default_rho": -1,
             "need_inner_model": False}] + \
           [{"name": SCHEDULER_NAMES.get(s, s), "label": SPACING_NAMES.get(s, s), "aliases": [s],
             "default_rho": 7.0 if s == "karras" else -1, "need_inner_model": False} for s in SPACINGS]


def read_png_info(req: dict) -> dict:
    """A1111's png-info: the `parameters` text, the other text chunks, and the text parsed."""
    data = decode_base64(req.get("image"), "image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            chunks = dict(getattr(im, "text", None) or {})
    except OSError as err:
        raise RequestError(f"image: not an image ({err})") from None
    text = chunks.pop("parameters", "")
    return {"info": text, "items": chunks, "parameters": parse_infotext(text) if text else {}}


def hires_flags(req: dict) -> list[str]:
    """enable_hr, hr_scale (A1111's default 2) and denoising_strength (default 0.7) -> --hires SCALE:STRENGTH."""
    if not field(req, "enable_hr", bool, False):
        return []
    return [f"--hires={field(req, 'hr_scale', float, 2.0)!r}:{field(req, 'denoising_strength', float, 0.7)!r}"]


def edit_inputs(req: dict) -> tuple[str, Image.Image, Image.Image | None, list[str]]:
    """An img2img request's kind ("img2img", or "inpaint" with a mask), its image, its mask (or None) and the
    CLI flags it sets; A1111's options we do not have refused."""
    images = field(req, "init_images", list, [])
    if len(images) != 1:
        raise RequestError(f"init_images: give one base64 image (got {len(images)}); batch_size draws more from it")
    image = decode_image(images[0], "init_images[0]")
    if field(req, "resize_mode", int, 0) not in (0, 1):
        raise RequestError(f"resize_mode: {req['resize_mode']} is not supported (0: just resize, 1: crop and resize)")
    if field(req, "inpainting_mask_invert", int, 0) not in (0, 1):
        raise RequestError("inpainting_mask_invert must be 0 or 1")
    strength = field(req, "denoising_strength", float)
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise RequestError(f"denoising_strength must be in [0, 1], got {strength}")
    if not field(req, "mask", str):
        return "img2img", image, None, ["--image=sdapi:init_images[0]"] + \
            ([] if strength is None else [f"--strength={strength!r}"])
    if req.get("inpaint_full_res") not in (None, False, 0):
        raise RequestError("inpaint_full_res: only the whole picture is inpainted here; send false")
    fill = field(req, "inpainting_fill", int, 0)            # A1111's default: fill
    if fill not in MASKED_CONTENT and not (fill == 2 and strength in (None, 1.0)):
        raise RequestError(f"inpainting_fill: {fill} is not supported (0: fill, 1: original; 2: latent noise at "
                           "denoising_strength 1)")
    flags = ["--image=sdapi:init_images[0]", "--mask=sdapi:mask", f"--masked-content={MASKED_CONTENT.get(fill, 'original')}"]
    if strength is not None:
        flags.append(f"--strength={strength!r}")
    return "inpaint", image, decode_image(req["mask"], "mask", mode="L"), flags
