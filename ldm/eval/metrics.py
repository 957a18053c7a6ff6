"""Evaluation metrics on the shapes world: prompt accuracy, Frechet distance, held-out prompts.

Also the oracle's two-direction probes: for a held-out scene, its full true caption
(every attribute should hold) and, per attribute, a caption with only that attribute
changed to a value that clearly does not hold (that attribute should not hold).
"""
from __future__ import annotations

import numpy as np
import torch

from ldm.data.captions import BACKGROUND_NAMES, COLOUR_NAMES, SHAPE_NAMES, SIZE_NAMES
from ldm.data.captions import format_caption, parse_caption
from ldm.data.shapes import RELATIONS, ZONES, generate
from ldm.eval.reader import (RELATION_MARGIN, SIDE, ZONE_TOLERANCE, attribute, relation_gap,
                             zone_holds)

CLEARANCE = 2.0  # px beyond the reader's tolerance that an altered zone/relation must miss by


# --------------------------------------------------------------------- prompt accuracy

def prompt_accuracy(judgements: list[dict], captions: list[str]) -> dict:
    """Share of prompts whose asked attributes all hold (all, one-, two-object); per attribute.

    "outcomes" keeps each prompt's outcome in caption order (None: the prompt asks for nothing), for
    paired comparisons of two runs on the same prompts (compare.py).
    """
    if len(judgements) != len(captions):
        raise ValueError(f"{len(judgements)} judgements for {len(captions)} captions")
    passed = {"all": [], "one_object": [], "two_object": []}
    per_attr: dict[str, list[bool]] = {}
    outcomes: list[bool | None] = []
    for judged, text in zip(judgements, captions):
        n = len(parse_caption(text)["objects"])
        if n == 0 or not judged:
            outcomes.append(None)
            continue  # the empty prompt asks for nothing
        ok = bool(all(judged.values()))
        outcomes.append(ok)
        passed["all"].append(ok)
        passed["one_object" if n == 1 else "two_object"].append(ok)
        for key, holds in judged.items():
            per_attr.setdefault(attribute(key), []).append(bool(holds))
    out = {name: _mean(xs) for name, xs in passed.items()}
    out["count"] = len(passed["all"])
    out["per_attribute"] = {name: _mean(xs) for name, xs in sorted(per_attr.items())}
    out["outcomes"] = outcomes
    return out


def _mean(xs: list[bool]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


# -------------------------------------------------------------------- Frechet distance

def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigen-decomposition, negatives clipped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(w.clip(min=0))) @ v.T


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two (N, F) feature sets (Dowson & Landau 1982).

    d^2 = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), in float64.
    """
    a, b = (np.asarray(f.detach().cpu() if torch.is_tensor(f) else f, np.float64)
            for f in (feats_a, feats_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, F) with the same F, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples per set, got {len(a)} and {len(b)}")
    cov_a, cov_b = (np.atleast_2d(np.cov(f, rowvar=False)) for f in (a, b))  # F = 1 gives 0-d
    root_a = _sqrtm_psd(cov_a)
    # the symmetric form keeps the product PSD, so its trace root is a sum of eigen roots
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    diff = a.mean(axis=0) - b.mean(axis=0)
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


# -------------------------------------------------------------------- held-out prompts

def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    """n held-out captions, alternating one- and two-object ((n + 1) // 2 one-object)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    want = {1: (n + 1) // 2, 2: n // 2}
    found: dict[int, list[str]] = {1: [], 2: []}
    index = 0
    while any(len(found[k]) < want[k] for k in want):
        sample = generate(seed, index, "heldout")
        k = len(sample.scene.objects)
        if len(found[k]) < want[k]:
            found[k].append(sample.text)
        index += 1
    one, two = found[1], found[2]
    return [p for pair in zip(one, two) for p in pair] + one[len(two):]


# ------------------------------------------------------------------ oracle probes

def full_asks(scene) -> dict:
    """The asks of the caption that names every attribute the grammar can for this scene."""
    objects = [{"colour": o.colour, "shape": o.shape,
                "size": o.size if len(scene.objects) == 1 else None} for o in scene.objects]
    return {"objects": objects, "zone": scene.objects[0].zone if len(objects) == 1 else None,
            "relation": scene.relation, "background": scene.background}


def true_centres(obj, resolution: int) -> list[tuple[float, float]]:
    """Both centres a checker may measure, at 64 px: bbox centre and area centroid."""
    scale = SIDE / resolution
    x0, y0, x1, _ = (v * scale for v in obj.bbox)
    side = x1 - x0
    centres = [(x0 + side / 2, y0 + side / 2)]
    if obj.shape == "triangle":  # apex up: the centroid is 2/3 of the way down
        centres.append((x0 + side / 2, y0 + 2 * side / 3))
    return centres


def _wrong_values(scene, key: str) -> list:
    """Values of `key` that clearly do not hold for `scene`."""
    objs = scene.objects
    family, _, index = key.partition("_")
    if family == "colour":
        return [c for c in COLOUR_NAMES if c not in {o.colour for o in objs}]
    if family == "shape":
        return [s for s in SHAPE_NAMES if s != objs[int(index)].shape]
    if family == "size":
        return [s for s in SIZE_NAMES if s != objs[int(index)].size]
    if family == "background":
        return [b for b in BACKGROUND_NAMES if b != scene.background]
    if family == "zone":
        centres = true_centres(objs[0], scene.resolution)
        return [z for z in ZONES
                if not any(zone_holds(c, z, ZONE_TOLERANCE + CLEARANCE) for c in centres)]
    if family == "relation":
        # pair like with like (bbox with bbox, centroid with centroid), as the generator does
        c0, c1 = (true_centres(o, scene.resolution) for o in objs)
        pairs = [(c0[0], c1[0]), (c0[-1], c1[-1])]
        return [r for r in RELATIONS
                if all(relation_gap(a, b, r) <= RELATION_MARGIN - CLEARANCE for a, b in pairs)]
    raise ValueError(f"unknown attribute key {key!r}")


def probes(scene, rng: np.random.Generator) -> list[tuple[str, str, bool]]:
    """(caption, key, expected): full true caption per key (True), one altered per key (False)."""
    asks = full_asks(scene)
    keys = [f"{a}_{i}" for i in range(len(asks["objects"])) for a in ("colour", "shape")]
    keys += ["size_0"] if asks["objects"][0]["size"] else []
    keys += [k for k in ("zone", "relation", "background") if asks[k]]
    text = format_caption(asks)
    out = [(text, key, True) for key in keys]
    for key in keys:
        wrong = _wrong_values(scene, key)
        value = wrong[int(rng.integers(len(wrong)))]
        altered = {**asks, "objects": [dict(o) for o in asks["objects"]]}
        family, _, index = key.partition("_")
        if index:
            altered["objects"][int(index)][family] = value
        else:
            altered[family] = value
        out.append((format_caption(altered), key, False))
    return out
