"""Bake LoRA files into a copy of a model folder: the teacher's U-Net (or SD3 / FLUX.1 transformer), its students
and its CLIP text encoder(s).

    python -m ldm.models.merge_lora models/sd15 --lora style.safetensors:0.8 --out models/sd15-style
    accelerate launch stages/distill.py --config configs/distill/sd15.yaml teacher=models/sd15-style ...
    python -m ldm.models.to_diffusers models/sd15-style --out exported/sd15-style

The result is a plain model folder: what `--lora` does at every load, done once, so that stage 3 can
distil the styled teacher and `to_diffusers` can export it. Weights keep the dtype of the files they
replace; the source folder is not touched, and `--out` appears in one rename at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from safetensors import safe_open

from ldm.models.lora import TEXT_PARTS, parse_lora_arg, read_lora
from ldm.models.weights import edited_copy
from ldm.pipeline import TextToImage, load_index


def _dtype_of(path: Path):
    """The dtype of the first floating tensor of a safetensors file (None if it has none)."""
    import torch
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}.get(t.get_dtype())
            if dtype is not None:
                return dtype
    return None


def merge(model_dir: str, loras: list[tuple[str, float]], out: str) -> int:
    """Write `out`: `model_dir` with every LoRA merged in; returns the number of layers changed."""
    if os.path.exists(os.path.join(out, "model_index.json")):
        raise FileExistsError(f"{out} already holds a model folder; remove it or pick another --out")
    index = load_index(model_dir)
    pipe = TextToImage.from_folder(model_dir)
    for steps in pipe.student_steps:
        pipe.student(steps)                            # loaded now, so that each LoRA merges into it too
    text_dir = None
    files = [read_lora(path) for path, _ in loras]      # each read once
    if any(lora[part] for lora in files for part in TEXT_PARTS):
        config = json.loads((Path(model_dir) / index.text_encoder / "config.json").read_text())
        path = config.get("path") or ""                # as written: relative when it lives in the folder
        inside = os.path.join(model_dir, index.text_encoder, path)
        if not path or os.path.isabs(path) or not os.path.isdir(inside):
            raise ValueError(f"the text encoder ({path or config.get('kind')}) is not stored in "
                             f"{model_dir}: a LoRA for it cannot be baked into this folder (import the model with "
                             "ldm.models.from_diffusers, which copies CLIP into the folder)")
        text_dir = Path(index.text_encoder) / path
    changed = sum(pipe.add_lora(path, scale, lora) for (path, scale), lora in zip(loras, files))

    with edited_copy(model_dir, out) as tmp:           # an empty or half-written `out` from before is replaced
        unet_dir = tmp / index.unet
        pipe.unet.save_pretrained(str(unet_dir), dtype=_dtype_of(unet_dir / "model.safetensors"))
        for steps, rel in index.students.items():
            student_dir = tmp / rel
            pipe.student(int(steps)).save_pretrained(str(student_dir), dtype=_dtype_of(student_dir / "model.safetensors"))
        if text_dir is not None:
            for part, model in pipe.clip_models().items():
                enc = tmp / text_dir / part if (tmp / text_dir / part).is_dir() else tmp / text_dir
                weights = next(enc.glob("*.safetensors"), None)
                model.to(_dtype_of(weights) if weights is not None else model.dtype).save_pretrained(enc)
    return changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm.models.merge_lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the model folder to start from (left unchanged)")
    parser.add_argument("--lora", action="append", required=True, metavar="FILE[:SCALE]",
                        help="a LoRA file (diffusers/peft or kohya layout; SD 1.x/2.x, SDXL, SD3, FLUX.1, whose "
                             "BFL / ComfyUI and XLabs layouts too; LyCORIS LoHa / LoKr for SD 1.x/2.x, SDXL) and "
                             "its scale "
                             "(default 1); repeatable")
    parser.add_argument("--out", required=True, metavar="DIR", help="the new model folder")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        parser.error(f"{args.model!r} is not a model folder: model_index.json is missing")
    loras = [parse_lora_arg(arg) for arg in args.lora]
    for (path, _), arg in zip(loras, args.lora):
        if not os.path.isfile(path):
            parser.error(f"--lora {arg!r}: no file {path!r}")
    try:
        changed = merge(args.model, loras, args.out)
    except (FileExistsError, ValueError) as err:
        parser.error(str(err))
    print(f"{args.out}: {len(loras)} LoRA file(s) merged, {changed} layers changed")


if __name__ == "__main__":
    main()
