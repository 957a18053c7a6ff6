"""Scoring generated images with the oracle: prompt accuracy and Frechet distance to real images.

`python -m ldm.eval score --images DIR --prompts FILE` reads what txt2img's batch mode writes
(`DIR/{line:04d}.png` for each non-blank line of FILE, line 0 first). The real reference set
is the held-out split, drawn the way `metrics.heldout_prompts` draws prompts (alternating one-
and two-object scenes), so images generated from `heldout_prompts(n, seed)` are compared with
the very scenes their prompts describe when the seeds agree.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.data.captions import parse_caption
from ldm.data.shapes import REFERENCE, Sample, generate, render
from ldm.eval.metrics import frechet_distance, prompt_accuracy
from ldm.eval.reader import attribute


# ------------------------------------------------------------------------------ inputs

def read_prompt_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number from 0, prompt) per non-blank line: the numbering of txt2img --from-file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    lines = [(i, line.strip()) for i, line in
             enumerate(path.read_text(encoding="utf-8").splitlines()) if line.strip()]
    if not lines:
        raise ValueError(f"no prompts in {path}: every line is blank")
    for i, text in lines:
        try:
            parse_caption(text)
        except ValueError as err:
            raise ValueError(f"{path}, line {i}: {err}") from None
    return lines


def load_images(folder: str | Path, lines: list[int]) -> torch.Tensor:
    """uint8 (N, 3, H, W) from folder/{line:04d}.png for each line; all one square size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder not found: {folder}")
    if not any(folder.glob("*.png")):
        raise FileNotFoundError(f"no PNG images in {folder}")
    images = []
    for line in lines:
        path = folder / f"{line:04d}.png"
        if not path.is_file():
            raise FileNotFoundError(f"missing image {path} for prompt line {line}")
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # (H, W, 3)
        size = f"{pixels.shape[1]}x{pixels.shape[0]}"
        if pixels.shape[0] != pixels.shape[1]:
            raise ValueError(f"{path} is {size}: expected one square image per file, not a grid")
        if images and pixels.shape != images[0].shape:
            raise ValueError(f"{path} is {size}, but {folder / f'{lines[0]:04d}.png'} is "
                             f"{images[0].shape[1]}x{images[0].shape[0]}: all images must be one size")
        images.append(pixels)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------- real reference

def heldout_samples(n: int, seed: int = 0) -> list[Sample]:
    """The held-out samples behind `heldout_prompts(n, seed)`, in its order (one-, two-object, ...)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    want = {1: (n + 1) // 2, 2: n // 2}
    found: dict[int, list[Sample]] = {1: [], 2: []}
    index = 0
    while any(len(found[k]) < want[k] for k in want):
        sample = generate(seed, index, "heldout")
        k = len(sample.scene.objects)
        if len(found[k]) < want[k]:
            found[k].append(sample)
        index += 1
    one, two = found[1], found[2]
    return [s for pair in zip(one, two) for s in pair] + one[len(two):]


def real_images(n: int, seed: int = 0, resolution: int = REFERENCE) -> torch.Tensor:
    """uint8 (n, 3, R, R): the held-out scenes of `heldout_samples`, rendered at R px."""
    # the scenes are drawn at the reference 64 px (that fixes the split) and only painted at R
    pixels = np.stack([render(s.scene, resolution) for s in heldout_samples(n, seed)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8 on the CPU: what a PNG of the image holds."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


# ------------------------------------------------------------------------------ scoring

def attribute_counts(judgements: list[dict]) -> dict[str, int]:
    """How many judgements of each attribute family the prompts asked for."""
    counts: dict[str, int] = {}
    for judged in judgements:
        for key in judged:
            counts[attribute(key)] = counts.get(attribute(key), 0) + 1
    return dict(sorted(counts.items()))


def evaluate_images(oracle, images: torch.Tensor, captions: list[str],
                    real_features: torch.Tensor) -> dict:
    """Prompt accuracy (all, one-, two-object, per attribute with counts) and FD to the reals.

    "correct" holds each prompt's outcome as one character, "1" held, "0" not, "-" asked nothing:
    500 prompts stay one line of report.json, and two runs pair up prompt by prompt (compare.py).
    """
    judgements = oracle.judge_batch(images, captions)
    acc = prompt_accuracy(judgements, captions)
    objects = [len(parse_caption(c)["objects"]) for c in captions]
    counts = attribute_counts(judgements)
    return {
        "accuracy": acc["all"], "one_object": acc["one_object"], "two_object": acc["two_object"],
        "counts": {"all": acc["count"], "one_object": objects.count(1), "two_object": objects.count(2)},
        "per_attribute": {name: {"accuracy": acc["per_attribute"][name], "n": counts[name]}
                          for name in counts},
        "fd": frechet_distance(oracle.features(images), real_features),
        "fd_n": len(real_features),
        "correct": "".join("-" if ok is None else "01"[ok] for ok in acc["outcomes"]),
    }


def score_folder(images_dir: str | Path, prompts_file: str | Path, fd_n: int | None = None,
                 fd_seed: int = 0, oracle=None) -> dict:
    """Score DIR/{line:04d}.png against the prompts of FILE; see the module docstring."""
    from ldm.eval.oracle import Oracle

    lines = read_prompt_lines(prompts_file)
    images = load_images(images_dir, [i for i, _ in lines])
    fd_n = len(images) if fd_n is None else fd_n
    if fd_n < 2 or len(images) < 2:
        raise ValueError(f"Frechet distance needs >= 2 images per set, got {len(images)} "
                         f"generated and --fd-n {fd_n}")
    oracle = oracle or Oracle.load()
    reals = real_images(fd_n, fd_seed, images.shape[-1])
    result = evaluate_images(oracle, images, [t for _, t in lines], oracle.features(reals))
    return {"images": str(images_dir), "prompts": str(prompts_file), "fd_seed": fd_seed, **result}


# ------------------------------------------------------------------------------ output

def percent(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def format_table(result: dict) -> str:
    """The score as a plain-text table."""
    counts = result["counts"]
    rows = [("prompt accuracy (all attributes right)", percent(result["accuracy"]), counts["all"]),
            ("  one-object prompts", percent(result["one_object"]), counts["one_object"]),
            ("  two-object prompts", percent(result["two_object"]), counts["two_object"])]
    rows += [(f"  {name}", percent(row["accuracy"]), row["n"])
             for name, row in result["per_attribute"].items()]
    lines = [f"{'metric':<40}{'value':>9}{'n':>7}"]
    lines += [f"{name:<40}{value:>9}{n:>7}" for name, value, n in rows[:3]]
    lines += ["per attribute (share of asks that hold)"] + [f"{name:<40}{value:>9}{n:>7}"
                                                        for name, value, n in rows[3:]]
    lines.append(f"FD (oracle features) vs {result['fd_n']} held-out real images: {result['fd']:.4g}")
    return "\n".join(lines)


def finite(value):
    """NaN -> None, recursively: strict JSON has no NaN (e.g. no two-object prompts)."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def write_json(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(result), indent=2, allow_nan=False) + "\n")
