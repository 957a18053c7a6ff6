"""Composable prompts (AND, Liu et al. 2022) against the plain prompt on the shipped shapes64 teacher.

150 held-out two-object prompts (`heldout_prompts(300, 0)[1::2]`: the two-object half), 16 DDIM steps, w = 2 (sd
scale 3), the same noise per prompt in every run (seed = the prompt's index), judged by the oracle against the plain
caption (all asked attributes: both objects' colour and shape, the relation, the background when named) and paired
prompt by prompt with ldm.eval.compare's McNemar test. Runs (sub-prompts of "a red circle above a blue square"):

    plain        a red circle above a blue square                              CFG, 2 rows a step
    and-objects  a red circle AND a blue square                               3 rows; the relation is not asked for
    and-full     a red circle above a blue square AND a red circle AND a blue square        4 rows
    and-full-norm  the same at weights 0.5 / 0.25 / 0.25 (sum 1: plain CFG's total guidance)  4 rows
    plain-w8     the plain prompt at w = 8: the guidance and-full's weights sum to (3 x sd scale 3 = sd scale 9)

A background named in the caption ("... on a gray background") goes into every object sub-prompt too.
OMP_NUM_THREADS=1 python docs/eval/composable/run.py  -> images/<run>/NNNN.png, prompts.txt, results.json, report.md
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ldm.data.captions import parse_caption
from ldm.eval.compare import paired
from ldm.eval.metrics import heldout_prompts
from ldm.eval.oracle import Oracle
from ldm.eval.reader import attribute
from ldm.cli import save_images
from ldm.data.shapes import render
from ldm.eval.score import evaluate_images, heldout_samples, load_images, percent
from ldm.pipeline import TextToImage

OUT = Path(__file__).parent
N, STEPS, W, BATCH = int(os.environ.get("COMPOSABLE_N", 150)), 16, 2.0, 50


def object_prompts(caption: str) -> list[str]:
    """One one-object caption per object of `caption`, with its background."""
    parsed = parse_caption(caption)
    background = f" on a {parsed['background']} background" if parsed["background"] else ""
    return [f"a {o['colour']} {o['shape']}{background}" for o in parsed["objects"]]


RUNS = {  # name -> (caption -> prompt, w)
    "plain": (lambda c: c, W),
    "and-objects": (lambda c: " AND ".join(object_prompts(c)), W),
    "and-full": (lambda c: " AND ".join([c, *object_prompts(c)]), W),
    "and-full-norm": (lambda c: " AND ".join([f"{c} :0.5", *(f"{o} :0.25" for o in object_prompts(c))]), W),
    "plain-w8": (lambda c: c, 8.0),
}


def objects_right(judgements: list[dict]) -> float:
    """Share of prompts whose colours and shapes (and background) all hold, the relation left out."""
    held = [all(v for k, v in j.items() if attribute(k) != "relation") for j in judgements]
    return sum(held) / len(held)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    only = sys.argv[1:] or list(RUNS)
    captions = heldout_prompts(2 * N, 0)[1::2]
    assert all(len(parse_caption(c)["objects"]) == 2 for c in captions)
    (OUT / "prompts.txt").write_text("\n".join(captions) + "\n")
    pipe = TextToImage.from_folder(decoder_precision="fp32")
    pipe.prompt_weights = True
    for name in only:
        make, w = RUNS[name]
        folder = OUT / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        prompts = [make(c) for c in captions]
        (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
        start, nfe = time.perf_counter(), 0
        for lo in range(0, N, BATCH):
            images, info = pipe.generate(prompts[lo:lo + BATCH], steps=STEPS, teacher=True, guidance=w,
                                         seed=list(range(lo, min(lo + BATCH, N))))
            nfe = info["nfe"]
            for k, image in enumerate(images):
                save_images(image[None], str(folder / f"{lo + k:04d}.png"))
        (folder / "time.json").write_text(json.dumps({"seconds": time.perf_counter() - start, "nfe": nfe}))
        print(name, f"{time.perf_counter() - start:.0f} s, NFE {nfe}", flush=True)

    # score every run found, from the PNGs, against the plain captions; pair each with the plain prompt
    oracle = Oracle.load()
    reals = np.stack([render(s.scene, 64) for s in heldout_samples(2 * N, 0)[1::2]])    # the same 150 scenes
    real_features = oracle.features(torch.from_numpy(reals).permute(0, 3, 1, 2).contiguous())
    results = {}
    for name in RUNS:
        folder = OUT / "images" / name
        if not (folder / "time.json").is_file():
            continue
        images = load_images(folder, list(range(N)))
        result = evaluate_images(oracle, images, captions, real_features)
        result["objects_right"] = objects_right(oracle.judge_batch(images, captions))
        result.update(json.loads((folder / "time.json").read_text()))
        result["example"] = (folder / "prompts.txt").read_text().splitlines()[0]
        results[name] = result
    for name in results:
        if name != "plain" and "plain" in results:
            results[name]["vs_plain"] = paired(results["plain"]["correct"], results[name]["correct"])
    setup = {"prompts": N, "steps": STEPS, "sampler": "ddim", "model": "ldm/assets/shapes64 teacher",
             "threads": torch.get_num_threads(), "torch": torch.__version__}
    (OUT / "results.json").write_text(json.dumps({"setup": setup, "runs": results}, indent=1))
    attrs = sorted({a for r in results.values() for a in r["per_attribute"]})
    lines = ["| run | w | NFE | all right | objects right (no relation) | " + " | ".join(attrs) +
             " | FD | vs plain (paired, McNemar p) |", "|" + "---|" * (7 + len(attrs))]
    for name, r in results.items():
        vs = r.get("vs_plain")
        cmp = "" if vs is None else f"{100 * vs['diff']:+.1f} pts (p {vs['p']:.2g})"
        lines.append(f"| {name} | {RUNS[name][1]:g} | {r['nfe']} | {percent(r['accuracy'])} | "
                     f"{percent(r['objects_right'])} | " +
                     " | ".join(percent(r["per_attribute"][a]["accuracy"]) for a in attrs) +
                     f" | {r['fd']:.2f} | {cmp} |")
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
