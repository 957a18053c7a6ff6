"""The A1111 ControlNet extension's API (sd-webui-controlnet) for ldm.serve: the units of a request's
`alwayson_scripts.controlnet.args` read into the CLIs' --controlnet / --t2i-adapter flags, each unit's `model` found
by its folder's name in the --controlnet-dir folders, and the extension's routes (/controlnet/model_list, ...).

Field mapping (unit i is named alwayson_scripts.controlnet.args[i]): model -> --controlnet DIR or --t2i-adapter DIR
(the folder's config.json says which), image (also input_image, {"image": ...}, [image, null]) -> --control-image /
--adapter-image (none given in img2img: init_images[0], as the extension does), weight -> --control-scale /
--adapter-scale, guidance_start:guidance_end -> --control-range (an adapter acts from the first step:
guidance_end -> --adapter-factor). Only the preprocessor "none" exists here (the image is the hint already: draw
Sobel edges with python -m ldm.data.hints). Options that would change the image and that we lack are refused by name
unless given the extension's default; those that act only in a preprocessor (processor_res, threshold_a/b,
pixel_perfect), which "none" ignores in the extension too, are listed in the answer's unused_fields."""
from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass

from ldm.models.controlnet import OUR_CLASS, SHIPPED
from ldm.sdapi import RequestError, decode_base64

PREFIX = "alwayson_scripts.controlnet.args"
MODULES = ("none",)                     # preprocessors: none; the client sends the hint itself
CONTROLNET_CLASSES = {OUR_CLASS, "ControlNetModel", "FluxControlNetModel", "SD3ControlNetModel"}
API_VERSION = 2                         # what the extension's /controlnet/version answers
# Unit fields we do not implement, with the values accepted: the extension's defaults (old and new), what UIs send
UNIT_DEFAULTS = {"control_mode": (0, "Balanced"),   # 1 / 2 rescale its residuals (soft injection): not here
                 "resize_mode": (1, "Crop and Resize", "Inner Fit (Scale to Fit)", "Scale to Fit (Inner Fit)"),
                 "guess_mode": (False,), "guessmode": (False,), "hr_option": ("Both",), "advanced_weighting": (),
                 "mask": (), "mask_image": (), "effective_region_mask": (), "ipadapter_input": (), "is_ui": (False,),
                 "input_mode": ("simple",), "batch_images": ("",), "output_dir": ("",), "loopback": (False,),
                 "pulid_mode": ("Fidelity",)}
# Preprocessor settings: no effect with module "none" (the extension ignores them so too); listed if not default
PREPROCESSOR = {"processor_res": (-1, 64, 512), "threshold_a": (-1, 64), "threshold_b": (-1, 64),
                "pixel_perfect": (False,)}
# Fields that change no image: memory use, and the detected maps, which we never append to the answer's images
IGNORED = {"low_vram", "lowvram", "save_detected_map", "inpaint_crop_input_image"}
READ = {"enabled", "module", "model", "weight", "image", "input_image", "guidance_start", "guidance_end", "guidance"}


@dataclass
class Unit:
    """One enabled unit: its net, image (bytes as sent; None: img2img's init image) and when it acts."""
    kind: str                           # "controlnet" or "t2i-adapter"
    folder: str
    image: bytes | None
    weight: float
    start: float
    end: float


def net_kind(folder: str) -> str | None:
    """'t2i-adapter' or 'controlnet' as the folder's config.json tells; None for any other folder."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            name = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return "t2i-adapter" if name == "T2IAdapter" else "controlnet" if name in CONTROLNET_CLASSES else None


def default_dirs(model: str) -> list[str]:
    """Without --controlnet-dir: the model folder's controlnet/ when it has one, then ldm/assets (the shipped nets)."""
    own = os.path.join(model, "controlnet")
    return ([own] if os.path.isdir(own) else []) + [SHIPPED]


def model_index(dirs: list[str]) -> dict[str, tuple[str, str]]:
    """{folder name: (kind, folder)} of the ControlNet and T2I-Adapter folders in `dirs`; the first dir wins a name."""
    index = {}
    for top in dirs:
        for name in sorted(os.listdir(top)) if os.path.isdir(top) else []:
            kind = net_kind(os.path.join(top, name))
            if kind and name not in index:
                index[name] = (kind, os.path.abspath(os.path.join(top, name)))
    return index


def model_name(name: str) -> str:
    """A1111's "control_v11p_sd15_canny [d14c016b]" -> "control_v11p_sd15_canny": the hash suffix dropped."""
    return re.sub(r"\s*\[[^\]]*\]$", "", name.strip())


def find_model(name: str, index: dict, where: str) -> tuple[str, str]:
    """The (kind, folder) a unit's model names (exactly, else ignoring case); a RequestError with close matches."""
    key = model_name(name)
    folded = {k.lower(): k for k in index}
    if key in index or key.lower() in folded:
        return index[key if key in index else folded[key.lower()]]
    close = difflib.get_close_matches(key, list(index), n=3, cutoff=0.4)
    raise RequestError(f"{where}.model: no ControlNet or T2I-Adapter named {key!r} in the --controlnet-dir folders"
                       + (f"; close: {', '.join(close)}" if close else "") +
                       f" (GET /controlnet/model_list lists {len(index)})")


def unit_number(unit: dict, name: str, where: str, default: float, low: float, high: float) -> float:
    """A unit's numeric field, checked to be a number in [low, high]."""
    value = unit.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            not low <= value <= high:
        raise RequestError(f"{where}.{name}: expected a number in [{low:g}, {high:g}], got {json.dumps(value)[:40]}")
    return float(value)


def unit_image(unit: dict, where: str) -> bytes | None:
    """The unit's image bytes: `image` (base64, {"image": b64, "mask": null} or [b64, null]) or the old
    `input_image`; None when it has none."""
    key = "image" if unit.get("image") is not None else "input_image"
    image = unit.get(key)
    if isinstance(image, dict):
        mask, image = image.get("mask"), image.get("image")
    elif isinstance(image, list) and len(image) == 2:
        image, mask = image
    else:
        mask = None
    if mask is not None:
        raise RequestError(f"{where}.{key}: a mask is not supported (inpainting ControlNets: python -m ldm.inpaint)")
    return None if image is None else decode_base64(image, f"{where}.{key}")


def read_unit(unit: dict, where: str, index: dict) -> tuple[Unit, list[str]]:
    """One enabled unit -> Unit, and the names of its fields that act on nothing here."""
    module = unit.get("module") or "none"
    if not isinstance(module, str) or module.lower() not in MODULES:
        raise RequestError(f"{where}.module: preprocessor {json.dumps(module)[:60]} is not available here; send the "
                           "control image itself (e.g. Sobel edges from python -m ldm.data.hints) with module \"none\" "
                           "(GET /controlnet/module_list)")
    for name, accepted in UNIT_DEFAULTS.items():
        if unit.get(name) is not None and unit[name] not in accepted:
            raise RequestError(f"{where}.{name}: {json.dumps(unit[name])[:60]} is not supported by this server "
                               f"(accepted: {', '.join(json.dumps(v) for v in accepted + (None,))})")
    kind, folder = find_model(unit["model"], index, where)
    start = unit_number(unit, "guidance_start", where, 0.0, 0.0, 1.0)
    end_key = "guidance_end" if unit.get("guidance_end") is not None else "guidance"     # "guidance": the old name
    end = unit_number(unit, end_key, where, 1.0, 0.0, 1.0)
    if kind == "controlnet" and start >= end:
        raise RequestError(f"{where}.guidance_start: {start:g} must be below guidance_end ({end:g})")
    if kind == "t2i-adapter" and start != 0:
        raise RequestError(f"{where}.guidance_start: a T2I-Adapter acts from the first step here (--adapter-factor "
                           f"= guidance_end); send 0, got {start:g}")
    unused = [f"{where}.{k}" for k, v in unit.items() if v is not None and (
        k in PREPROCESSOR and v not in PREPROCESSOR[k] or
        k not in READ | set(UNIT_DEFAULTS) | set(PREPROCESSOR) | IGNORED)]
    return Unit(kind, folder, unit_image(unit, where), unit_number(unit, "weight", where, 1.0, 0.0, 2.0), start,
                end), unused


def is_enabled(unit: dict, where: str) -> bool:
    """`enabled` as sent; absent: on when the unit names a model (the extension's old default, which scripts rely
    on), so the placeholder units UIs send with model "None" are skipped."""
    enabled = unit.get("enabled")
    if enabled is None:
        return unit.get("model") not in (None, "", "None")
    if not isinstance(enabled, bool):
        raise RequestError(f"{where}.enabled: expected true or false, got {json.dumps(enabled)[:40]}")
    if enabled and unit.get("model") in (None, "", "None"):
        raise RequestError(f"{where}.model: an enabled unit needs a model (GET /controlnet/model_list)")
    return enabled


def read_units(req: dict, index: dict) -> tuple[list[Unit], list[str]]:
    """The enabled units of alwayson_scripts.controlnet (any other script refused by name) and the unit fields
    unused."""
    scripts = req.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise RequestError(f"alwayson_scripts: expected an object, got {json.dumps(scripts)[:40]}")
    for name, script in scripts.items():
        if name.lower() != "controlnet" and script not in ({}, {"args": []}):
            raise RequestError(f"alwayson_scripts.{name}: not supported by this server (only controlnet)")
    script = next((s for name, s in scripts.items() if name.lower() == "controlnet"), None) or {}
    units = script.get("args", []) if isinstance(script, dict) else None
    if not isinstance(units, list):
        raise RequestError("alwayson_scripts.controlnet: expected {\"args\": [unit, ...]}")
    read, unused = [], []
    for i, unit in enumerate(units):
        where = f"{PREFIX}[{i}]"
        if not isinstance(unit, dict):
            raise RequestError(f"{where}: expected a unit object, got {json.dumps(unit)[:40]}")
        if is_enabled(unit, where):
            one, names = read_unit(unit, where, index)
            read.append(one)
            unused += names
    return read, unused


def unit_flags(units: list[Unit], paths: list[str]) -> list[str]:
    """The CLI flags of the units whose images are at `paths`: ControlNets' then T2I-Adapters', one of each per-unit
    flag each; --control-range / --adapter-factor only where a unit acts on part of the steps."""
    nets = [(u, p) for u, p in zip(units, paths) if u.kind == "controlnet"]
    adapters = [(u, p) for u, p in zip(units, paths) if u.kind == "t2i-adapter"]
    flags = []
    for u, path in nets:
        flags += [f"--controlnet={u.folder}", f"--control-image={path}", f"--control-scale={u.weight!r}"]
    if any((u.start, u.end) != (0.0, 1.0) for u, _ in nets):
        flags += [f"--control-range={u.start!r}:{u.end!r}" for u, _ in nets]
    for u, path in adapters:
        flags += [f"--t2i-adapter={u.folder}", f"--adapter-image={path}", f"--adapter-scale={u.weight!r}"]
    if any(u.end != 1.0 for u, _ in adapters):
        flags += [f"--adapter-factor={u.end!r}" for u, _ in adapters]
    return flags


@contextlib.contextmanager
def unit_inputs(units: list[Unit], req: dict):
    """The units' flags, their images written (the bytes as sent, which the CLIs read as they read a file) to a
    temporary folder for the block; yields (flags, the folder's path prefix, to name the fields in messages)."""
    with tempfile.TemporaryDirectory(prefix="ldm-serve-") as tmp:
        paths = []
        for i, unit in enumerate(units):
            data = unit.image
            if data is None:                            # the extension's default: the img2img input itself
                images = req.get("init_images")
                if not isinstance(images, list) or not images:
                    raise RequestError(f"{PREFIX}[{i}].image: a unit needs an image (base64) in txt2img")
                data = decode_base64(images[0], "init_images[0]")
            paths.append(os.path.join(tmp, f"args[{i}].image"))
            with open(paths[-1], "wb") as f:
                f.write(data)
        yield unit_flags(units, paths), tmp + os.sep


def model_list(index: dict) -> dict:
    """GET /controlnet/model_list: the names a unit's model takes (no hashes: we compute none)."""
    return {"model_list": list(index)}


def module_list() -> dict:
    """GET /controlnet/module_list: the preprocessors, with the extension's details (none has no sliders)."""
    return {"module_list": list(MODULES),
            "module_detail": {m: {"model_free": False, "sliders": []} for m in MODULES}}
