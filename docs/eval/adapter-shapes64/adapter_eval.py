"""An edges T2I-Adapter against the shipped edges ControlNet, measured as docs/provenance/controlnet_eval.py measures
the ControlNet (same scenes, seeds, sampler, edge F1 and oracle), with per-prompt outcomes for `ldm.eval compare`.

    OMP_NUM_THREADS=1 python docs/eval/adapter-shapes64/adapter_eval.py sample RUN [N]   # RUN: teacher, controlnet,
                                                               # adapter, adapter-empty (empty prompt); N = 500
    ADAPTER=runs/adapter-shapes64/adapter-1000 python .../adapter_eval.py sample adapter 500 adapter-step1000  # a row name
    OMP_NUM_THREADS=1 python docs/eval/adapter-shapes64/adapter_eval.py timing           # seconds per image
    python docs/eval/adapter-shapes64/adapter_eval.py report                             # report.json + grid.png
    python -m ldm.eval compare docs/eval/adapter-shapes64/report.json:controlnet-w2 \\
        docs/eval/adapter-shapes64/report.json:adapter-w2 [--out ...]

N held-out scenes (the oracle's held-out split, never trained on); the control image is each scene's Sobel edge
map (ldm.data.hints, threshold 0.1); the teacher draws each caption with 16 DDIM steps at w = 2, seeds 0, 100,
... per batch of 100, alone, with the ControlNet (ldm/assets/shapes64-edges) and with the adapter (ADAPTER, default
runs/adapter-shapes64/adapter), each at scale 1. Edge F1: the drawn image's edges against the control edges, an
edge pixel matched when the other map has one within 1 px. Images are kept in runs/adapter-eval/ for the grid.
"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.data.hints import edge_map
from ldm.eval.oracle import Oracle
from ldm.eval.score import evaluate_images, heldout_samples, real_images
from ldm.models.controlnet import load_controlnet
from ldm.models.t2i_adapter import load_t2i_adapter
from ldm.models.unet import count_params
from ldm.pipeline import TextToImage
from ldm.training.images import save_image_grid

HERE = Path(__file__).resolve().parent
CACHE = Path("runs/adapter-eval")
CONTROLNET = "ldm/assets/shapes64-edges"
ADAPTER = os.environ.get("ADAPTER", "runs/adapter-shapes64/adapter")
THRESHOLD, STEPS, GUIDANCE, BATCH = 0.1, 16, 2.0, 100


def f1(drawn: torch.Tensor, control: torch.Tensor) -> float:
    """Mean per-image F1 of two {0, 1} edge maps (B, H, W) with a 1-px tolerance (controlnet_eval.py's)."""
    near = lambda m: F.max_pool2d(m[:, None], 3, stride=1, padding=1)[:, 0]  # noqa: E731
    precision = (drawn * near(control)).sum((1, 2)) / drawn.sum((1, 2)).clamp(min=1)
    recall = (control * near(drawn)).sum((1, 2)) / control.sum((1, 2)).clamp(min=1)
    return float((2 * precision * recall / (precision + recall).clamp(min=1e-8)).mean())


def load_net(run: str):
    return {"teacher": lambda: None, "controlnet": lambda: load_controlnet(CONTROLNET),
            "adapter": lambda: load_t2i_adapter(ADAPTER)}[run]()


def steering(run: str, nets: dict, hints: torch.Tensor) -> dict:
    """generate's keyword for `run`: nothing, the ControlNet, or the adapter, at scale 1."""
    if run == "teacher":
        return {}
    return {"control" if run == "controlnet" else "adapter": [(nets[run], hints, 1.0)]}


def sample(run: str, n: int, name: str) -> None:
    captions = [s.text for s in heldout_samples(n, 0)]
    reals = real_images(n, 0)                                   # uint8 (n, 3, 64, 64): the same scenes
    hints = edge_map(reals.float() / 127.5 - 1, THRESHOLD)
    pipe = TextToImage.from_folder("ldm/assets/shapes64")
    prompts = [""] * n if run.endswith("-empty") else captions
    base = run.removesuffix("-empty")
    nets, images = {base: load_net(base)}, []
    for i in range(0, n, BATCH):
        extra = steering(base, nets, hints[i:i + BATCH])
        images.append(pipe.generate(prompts[i:i + BATCH], steps=STEPS, guidance=GUIDANCE, seed=i, teacher=True,
                                    **extra)[0])
    images = torch.cat(images)
    oracle = Oracle.load()
    row = {"model": name, "folder": ADAPTER if run.startswith("adapter") else None, "steps": STEPS, "guidance": GUIDANCE, "n": n,
           "edge_f1": round(f1(edge_map(images, THRESHOLD)[:, 0], hints[:, 0]), 4),
           **evaluate_images(oracle, images, captions, oracle.features(reals))}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(images[:8].clone(), CACHE / f"{name}.pt")
    (CACHE / f"{name}.json").write_text(json.dumps(row))
    print(json.dumps({k: row[k] for k in ("model", "edge_f1", "accuracy", "fd")}), flush=True)


def timing(repeats: int = 5) -> None:
    """Seconds per image at 16 teacher steps, w = 2: one picture (median of `repeats`) and a batch of 100 (one run);
    the three runs interleaved so that machine load hits each alike."""
    captions = [s.text for s in heldout_samples(BATCH, 0)]
    hints = edge_map(real_images(BATCH, 0).float() / 127.5 - 1, THRESHOLD)
    pipe = TextToImage.from_folder("ldm/assets/shapes64")
    nets = {run: load_net(run) for run in ("teacher", "controlnet", "adapter")}
    times = {run: {"one": [], "batch": []} for run in nets}
    kw = dict(steps=STEPS, guidance=GUIDANCE, teacher=True)
    for run in nets:                                            # warm-up
        pipe.generate(captions[:1], seed=0, **steering(run, nets, hints[:1]), **kw)
    for r in range(repeats):
        for run in nets:
            start = time.perf_counter()
            pipe.generate(captions[:1], seed=r, **steering(run, nets, hints[:1]), **kw)
            times[run]["one"].append(time.perf_counter() - start)
    for run in nets:
        start = time.perf_counter()
        pipe.generate(captions, seed=0, **steering(run, nets, hints), **kw)
        times[run]["batch"].append((time.perf_counter() - start) / BATCH)
    out = {"threads": torch.get_num_threads(), "steps": STEPS, "guidance": GUIDANCE,
           "params": {run: (count_params(net) if net is not None else 0) for run, net in nets.items()},
           "unet_params": count_params(pipe.unet),
           "seconds_per_image": {run: {"batch_1_median": round(statistics.median(t["one"]), 4),
                                       "batch_1_all": [round(x, 4) for x in t["one"]],
                                       "batch_100": round(t["batch"][0], 4)} for run, t in times.items()}}
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "timing.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


def report() -> None:
    """report.json (`ldm.eval compare`'s layout: n, seed, rows) and grid.png: rows = scene, its edges, the teacher,
    + ControlNet, + adapter, on the first 8 held-out scenes."""
    order = ["teacher", "controlnet", "adapter", "adapter-empty"]
    runs = sorted((f.stem for f in CACHE.glob("*.json") if f.stem != "timing"),
                  key=lambda r: (order.index(r) if r in order else len(order), r))
    rows = [json.loads((CACHE / f"{r}.json").read_text()) for r in runs]
    n = {row["n"] for row in rows}
    if len(n) != 1:
        raise ValueError(f"the runs drew different numbers of scenes: {sorted(n)}")
    out = {"n": n.pop(), "seed": 0, "controlnet": CONTROLNET, "rows": rows}
    if (CACHE / "timing.json").is_file():
        out["timing"] = json.loads((CACHE / "timing.json").read_text())
    (HERE / "report.json").write_text(json.dumps(out, indent=2))
    reals = real_images(8, 0).float() / 127.5 - 1
    grid = [reals, edge_map(reals, THRESHOLD) * 2 - 1] + [torch.load(CACHE / f"{r}.pt") for r in runs
                                                            if r in ("teacher", "controlnet", "adapter")]
    save_image_grid(torch.cat(grid), HERE / "grid.png", nrow=8)
    for row in rows:
        print(f"{row['model']:14s} edge F1 {row['edge_f1']:.3f}  accuracy {100 * row['accuracy']:.1f}%  "
              f"FD {row['fd']:.2f}")


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "sample":
        sample(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 500, sys.argv[4] if len(sys.argv) > 4 else sys.argv[2])
    elif command == "timing":
        timing()
    elif command == "report":
        report()
    else:
        sys.exit(__doc__)
