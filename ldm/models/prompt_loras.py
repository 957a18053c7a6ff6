"""LoRAs named in the prompt, in the A1111 web UI's extra-network syntax: `<lora:NAME:WEIGHT>`.

    "a corgi, pixel art <lora:pixel-art-v2:0.8>"   the file pixel-art-v2.safetensors merged x 0.8 for this prompt
    "<lora:style>"                                 weight 1
    "<lora:style:0.3:0.9>"                         text encoders x 0.3, U-Net / transformer x 0.9 (A1111 >= 1.5)
    "<lora:style:te=0.3:unet=0.9>"                 the same, named
    "<lyco:style:0.8>"                             the old LyCORIS extension's alias of <lora:...>

As A1111 (modules/extra_networks.py): every `<word:args>` is cut out of the prompt and replaced by nothing, the
text around it left as it is ("a, <lora:x> b" -> "a,  b"; the tokenizers drop the spaces, a comma stays a comma).
NAME is a file stem, looked up in the LoRA folders and all their subfolders with the extensions A1111 lists
(.safetensors, .pt, .ckpt; ldm.models.lora.read_lora reads all three). Where A1111 differs, we say so:
  - a stem is matched exactly, else case-insensitively when that finds one file (A1111: exactly only), else the
    file's alias, kohya's `ss_output_name` metadata (as A1111's alias lookup, only after the stems);
  - a stem found twice (two folders or subfolders) is refused, naming both files (A1111 takes the last it walked);
  - <hypernet:...>, a `dyn=` rank, unknown extra networks and unknown NAMEs are errors (A1111 logs and draws without);
  - tags in the negative prompt are refused by the CLIs (A1111 reads no tags there: they reach the text encoder as
    words, which is never what was meant).
The infotext's `Lora hashes: "NAME: HASH"` is A1111's: the first 12 hex digits of the file's `sshs_model_hash`
metadata, else of the sha256 of a .safetensors file's tensor bytes (after its JSON header; kohya's "addnet" hash,
which A1111 shows), else of the whole file.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass

TAG = re.compile(r"<(\w+):([^>]+)>")             # A1111's re_extra_net
LORA_KINDS = ("lora", "lyco")                      # <lyco:...>: the a1111-sd-webui-lycoris extension's name
LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")   # A1111's list for its Lora folder


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:...>` tag: the file stem it names and its two scales."""
    text: str       # the tag as written, for messages
    name: str
    te: float       # text encoders' scale
    unet: float     # the U-Net's / transformer's scale


def parse_tag(text: str, kind: str, body: str) -> LoraTag:
    """`<kind:body>` -> LoraTag, A1111's reading of its arguments (positional NAME:TE:UNET, named te= / unet=);
    ValueError naming the tag for what we do not run."""
    if kind == "hypernet":
        raise ValueError(f"{text}: hypernetworks are not supported (only LoRA: <lora:NAME:WEIGHT>)")
    if kind not in LORA_KINDS:
        raise ValueError(f"{text}: unknown extra network {kind!r} (read are <lora:NAME:WEIGHT> and <lyco:...>)")
    positional, named = [], {}
    for item in body.split(":"):
        parts = item.split("=")
        if len(parts) == 2:                        # A1111: "a=b" is named, "a=b=c" positional
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    if "dyn" in named or len(positional) > 3:
        raise ValueError(f"{text}: a dyn rank (the LoRA cut to its first N ranks) is not supported")
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown:
        raise ValueError(f"{text}: unknown argument(s) {unknown} (read are NAME:TE:UNET, te=, unet=)")
    if not positional or not positional[0].strip():
        raise ValueError(f"{text}: names no LoRA file (write <{kind}:NAME:WEIGHT>)")
    try:
        te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
        unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
    except ValueError:
        raise ValueError(f"{text}: a weight is not a number") from None
    if not (math.isfinite(te) and math.isfinite(unet)):
        raise ValueError(f"{text}: weights must be finite")
    return LoraTag(text, positional[0], te, unet)


def split_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """(the prompt with every `<word:args>` cut out, as A1111 cuts it, the LoRA tags in order); ValueError for a
    tag we do not run."""
    tags = []

    def cut(m: re.Match) -> str:
        tags.append(parse_tag(m[0], m[1], m[2]))
        return ""

    return TAG.sub(cut, prompt), tags


def strip_tags(prompt: str) -> str:
    """The prompt with every `<word:args>` cut out, unchecked (`split_tags` checks)."""
    return TAG.sub("", prompt)


def has_tags(prompt: str) -> bool:
    return TAG.search(prompt) is not None


# ----------------------------------------------------------------------------- the LoRA folders

_INDEX: dict[tuple[str, ...], dict[str, list[str]]] = {}     # scanned folders -> {stem: [paths]}


def scan(dirs: list[str]) -> dict[str, list[str]]:
    """{stem: [paths]} of the LoRA files under `dirs`, subfolders included (hidden ones not), in a stable order."""
    found: dict[str, list[str]] = {}
    for top in dirs:
        for root, subdirs, files in os.walk(top, followlinks=True):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if ext.lower() in LORA_EXTENSIONS and not name.startswith("."):
                    found.setdefault(stem, []).append(os.path.join(root, name))
    return found


def lora_index(dirs: list[str], refresh: bool = False) -> dict[str, list[str]]:
    """`scan(dirs)`, kept for the next call (a server answers many prompts); `refresh` scans again."""
    key = tuple(dirs)
    if refresh or key not in _INDEX:
        _INDEX[key] = scan(dirs)
    return _INDEX[key]


def _matches(name: str, index: dict[str, list[str]]) -> list[str]:
    """The files whose stem is `name`, else whose stem is `name` but for case, else whose alias (the kohya
    metadata's ss_output_name, which A1111 also looks tags up by) is `name`."""
    if name in index:
        return index[name]
    return [p for stem, paths in index.items() if stem.casefold() == name.casefold() for p in paths] or \
        [p for paths in index.values() for p in paths if _alias(p) == name]


def _alias(path: str) -> str | None:
    try:
        return lora_metadata(path).get("ss_output_name")
    except (OSError, ValueError):                  # a broken header: no alias, as in the listing
        return None


def find_lora(tag: LoraTag, dirs: list[str]) -> str:
    """The file `tag` names under `dirs` (scanned again once when not found: a file added since); ValueError with
    the close names and the folders looked in."""
    paths = _matches(tag.name, lora_index(dirs)) or _matches(tag.name, lora_index(dirs, refresh=True))
    if len(paths) == 1:
        return paths[0]
    if paths:
        raise ValueError(f"{tag.text}: {len(paths)} files are named {tag.name!r}: {paths}; rename one, or give "
                         "--lora FILE:WEIGHT")
    where = f"under {', '.join(dirs)} (subfolders included)" if dirs else \
        "anywhere: no --lora-dir given and the model folder has no loras/ folder"
    names = sorted(lora_index(dirs))
    close = difflib.get_close_matches(tag.name, names, n=5, cutoff=0.6)
    hint = f"; close: {', '.join(close)}" if close else f"; there are {', '.join(names)}" if len(names) <= 10 else ""
    raise ValueError(f"{tag.text}: no LoRA file {tag.name}{{{','.join(LORA_EXTENSIONS)}}} {where}{hint}")


# ----------------------------------------------------------------------------- metadata and hashes (A1111's)

def safetensors_header(path: str) -> tuple[int, dict]:
    """(the byte where a .safetensors file's tensors start, its JSON header)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def lora_metadata(path: str) -> dict:
    """A .safetensors file's `__metadata__` as A1111 lists it (JSON-looking values parsed, cover images left out);
    {} for other files."""
    if not path.lower().endswith(".safetensors"):
        return {}
    meta = dict(safetensors_header(path)[1].get("__metadata__") or {})
    meta.pop("ssmd_cover_images", None)
    for key, value in meta.items():
        if isinstance(value, str) and value.startswith("{"):
            try:
                meta[key] = json.loads(value)
            except ValueError:
                pass
    return meta


_HASHES: dict[tuple[str, int, int], str] = {}


def lora_hash(path: str) -> str:
    """A1111's short hash of a LoRA file (see the module docstring), 12 hex digits."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    if key not in _HASHES:
        safetensors = path.lower().endswith(".safetensors")
        stored = lora_metadata(path).get("sshs_model_hash") if safetensors else None
        if stored:
            _HASHES[key] = str(stored)[:12]
        else:
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                f.seek(safetensors_header(path)[0] if safetensors else 0)
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            _HASHES[key] = sha.hexdigest()[:12]
    return _HASHES[key]


def hashes_text(found: list[tuple[LoraTag, str]]) -> str:
    """A1111's `Lora hashes` value: "NAME: HASH, ..." for each (tag, its file), NAME as written less ':' and ','."""
    named = {tag.name.replace(":", "").replace(",", ""): lora_hash(path) for tag, path in found}
    return ", ".join(f"{name}: {h}" for name, h in named.items())


def lora_listing(dirs: list[str], refresh: bool = False) -> list[dict]:
    """A1111's GET /sdapi/v1/loras: {name (the stem), alias (ss_output_name, else the stem), path, metadata} per
    file under `dirs`."""
    out = []
    for stem, paths in sorted(lora_index(dirs, refresh).items()):
        for path in paths:
            try:
                meta = lora_metadata(path)
            except (OSError, ValueError):          # a broken header: listed, as A1111 does, without metadata
                meta = {}
            out.append({"name": stem, "alias": meta.get("ss_output_name", stem), "path": path, "metadata": meta})
    return out
