"""CLIP score of generated images against their prompts (Hessel et al. 2021), as torchmetrics computes it.

    python -m ldm.eval clip-score --images DIR --prompts FILE --clip DIR_OR_HUB_NAME

Images are matched to prompts as `python -m ldm.eval score` matches them: DIR/{line:04d}.png for
each non-blank line of FILE, lines numbered from 0 with blank lines counted (txt2img --from-file's
names). Every prompt needs its image and every numbered PNG its prompt; unreadable images are
skipped and counted.

With E_I, E_T a transformers CLIPModel's projected image and text embeddings (get_image_features,
get_text_features) of the CLIPProcessor's inputs (the folder's preprocessing: resize, center crop,
CLIP's mean/std; the tokenizer padding the batch):

- clip_score: max(100 * mean_i cos(E_I(image_i), E_T(prompt_i)), 0), torchmetrics' CLIPScore, which
  clamps the mean (its default model is openai/clip-vit-large-patch14);
- clip_score_clamped: mean_i 100 * max(cos_i, 0), Hessel et al.'s per-image clamp (their w = 2.5
  replaced by 100). The two agree whenever no cosine is negative ("negative" counts those that are).

Prompts longer than the text model's positions (77 for CLIP) are truncated by the tokenizer, which
keeps the end token ("truncated" counts them); torchmetrics instead cuts the token ids, dropping it.
Nothing is downloaded: --clip is a local folder or a hub name already in the Hugging Face cache.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from ldm.eval.fid import read_rgb

NUMBERED = re.compile(r"^(\d{4,})\.png$")  # the names txt2img --from-file writes


# ------------------------------------------------------------------------------ inputs

def read_prompts(path: str | Path) -> list[tuple[int, str]]:
    """(line number from 0, prompt) per non-blank line: the numbering of txt2img --from-file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    lines = [(i, line.strip()) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines())
             if line.strip()]
    if not lines:
        raise ValueError(f"no prompts in {path}: every line is blank")
    return lines


def match_images(folder: str | Path, lines: list[int]) -> list[Path]:
    """folder/{line:04d}.png per line; an error when a prompt has no image or a numbered PNG no prompt."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder not found: {folder}")
    numbered = {int(m.group(1)): p for p in folder.iterdir() if (m := NUMBERED.match(p.name))}
    missing = [i for i in lines if i not in numbered]
    extra = sorted(set(numbered) - set(lines))
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"{len(missing)} prompts have no image (" +
                            ", ".join(f"line {i}: {i:04d}.png" for i in missing[:5]) + (", ..." if len(missing) > 5 else "") + ")")
        if extra:
            problems.append(f"{len(extra)} images have no prompt (" +
                            ", ".join(numbered[i].name for i in extra[:5]) + (", ..." if len(extra) > 5 else "") + ")")
        raise ValueError(f"{len(lines)} prompts but {len(numbered)} numbered PNGs in {folder}: " + "; ".join(problems))
    return [numbered[i] for i in lines]


def load_clip(name: str, device="cpu"):
    """(CLIPModel in fp32, CLIPProcessor) from a folder or a hub name in the local cache, never downloaded."""
    from transformers import CLIPModel, CLIPProcessor
    try:
        model = CLIPModel.from_pretrained(name, local_files_only=True, dtype=torch.float32)
        processor = CLIPProcessor.from_pretrained(name, local_files_only=True)
    except OSError as err:
        raise FileNotFoundError(
            f"--clip {name!r}: no CLIPModel with its processor there ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0]}). Nothing is downloaded here: give a local folder (save_pretrained "
            f"of CLIPModel and CLIPProcessor) or a hub name already in the Hugging Face cache, e.g. "
            f"openai/clip-vit-large-patch14 (torchmetrics' default)") from None
    return model.to(device).eval(), processor


# ------------------------------------------------------------------------------ scoring

def _embedding(out) -> torch.Tensor:
    """get_*_features' projected embedding: a tensor, or (transformers 5) the output's pooler_output."""
    return out if torch.is_tensor(out) else out.pooler_output


@torch.no_grad()
def clip_cosines(model, processor, images: list, texts: list[str]) -> tuple[torch.Tensor, int]:
    """cos(E_I(image_i), E_T(text_i)) for PIL images / uint8 (H, W, 3) arrays; and how many texts were cut."""
    device = next(model.parameters()).device
    positions = model.config.text_config.max_position_embeddings
    tokens = processor.tokenizer(texts, padding=True, truncation=True, max_length=positions, return_tensors="pt")
    truncated = sum(len(ids) > positions for ids in processor.tokenizer(texts)["input_ids"])
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    image = _embedding(model.get_image_features(pixel_values=pixels.to(device)))
    text = _embedding(model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                              attention_mask=tokens["attention_mask"].to(device)))
    return torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1).cpu(), truncated


def clip_score(images_dir, prompts_file, clip: str, batch_size: int = 32, device="cpu") -> dict:
    """CLIP score of DIR/{line:04d}.png against the prompts of FILE; see the module docstring."""
    from tqdm.auto import tqdm

    lines = read_prompts(prompts_file)
    files = match_images(images_dir, [i for i, _ in lines])
    model, processor = load_clip(clip, device)
    per_prompt, skipped, truncated = [], [], 0
    for start in tqdm(range(0, len(lines), batch_size), desc="clip score", unit="batch", leave=False):
        batch = []
        for (line, text), path in zip(lines[start:start + batch_size], files[start:start + batch_size]):
            pixels = read_rgb(path)
            if pixels is None:
                skipped.append(path.name)
            else:
                batch.append((line, text, pixels))
        if not batch:
            continue
        cos, cut = clip_cosines(model, processor, [p for _, _, p in batch], [t for _, t, _ in batch])
        truncated += cut
        per_prompt += [{"line": line, "score": 100 * float(c)} for (line, _, _), c in zip(batch, cos)]
    if not per_prompt:
        raise ValueError(f"no readable images in {images_dir} ({len(skipped)} unreadable)")
    scores = np.array([row["score"] for row in per_prompt])
    return {"clip_score": max(float(scores.mean()), 0.0), "clip_score_clamped": float(scores.clip(min=0).mean()),
            "n": len(scores), "negative": int((scores < 0).sum()), "truncated": truncated,
            "skipped": len(skipped), "skipped_files": skipped, "clip": str(clip), "images": str(images_dir),
            "prompts": str(prompts_file), "per_prompt": per_prompt}


def format_clip_score(result: dict) -> str:
    """The CLIP score result as a plain-text table."""
    rows = [("CLIP score (torchmetrics: max(mean 100 cos, 0))", result["clip_score"]),
            ("CLIP score, per-image clamp (mean 100 max(cos, 0))", result["clip_score_clamped"])]
    lines = [f"{'metric':<54}{'value':>9}"] + [f"{name:<54}{value:>9.4f}" for name, value in rows]
    lines.append(f"{result['n']} image-prompt pairs ({result['clip']}); {result['negative']} negative cosines, "
                 f"{result['truncated']} prompts truncated")
    if result["skipped"]:
        names = ", ".join(result["skipped_files"][:5]) + (", ..." if result["skipped"] > 5 else "")
        lines.append(f"{result['skipped']} unreadable images skipped: {names}")
    spread = np.std([r["score"] for r in result["per_prompt"]], ddof=1) if result["n"] > 1 else math.nan
    lines.append(f"per-image 100 cos: std {spread:.4f}")
    return "\n".join(lines)
