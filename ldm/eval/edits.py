"""Edit accuracy of an InstructPix2Pix model on held-out shapes-world triples (ldm.data.edits), read by the oracle.

    python -m ldm.eval edits --model DIR [--n 200] [--image-guidance 1,1.5,2] [--guidance 2,5] [--steps 25]

Each held-out before-image is edited as its held-out instruction says, and the edit is judged against the exact
after-scene:
- edit: the oracle reads the intended new attribute where it was asked for: a recoloured object's new colour on an
  object whose centre lies in the edited object's box; a new background;
- preserved: every other attribute of the after-scene holds (object count; each object's shape, size and colour; the
  background), read by the same judge as prompt accuracy (ldm.eval.reader.judge);
- pixel MAE (0-255) on the pixels the edit must not change (where the true before- and after-images agree).
Baselines from the same triples: `input` (the before-image returned untouched: edit ~0 by construction) and `target`
(the true after-image: the oracle's ceiling). Writes edits.json and edits.png (rows: before, target, then the edits
at each (w, s_I)) and instructions.txt (the grid's columns) to --out-dir.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

OUT_DIR = "docs/eval/instruct-shapes64"


def add_parser(commands) -> None:
    """The `edits` subcommand of python -m ldm.eval."""
    ed = commands.add_parser("edits", help="edit accuracy of an InstructPix2Pix model (held-out triples)",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ed.add_argument("--model", required=True, metavar="DIR", help="model folder with image_input instruct-pix2pix")
    ed.add_argument("--n", type=int, default=200, help="held-out triples (default: 200)")
    ed.add_argument("--image-guidance", default="1,1.5,2", metavar="LIST",
                    help="s_I values, comma-separated (default: 1,1.5,2)")
    ed.add_argument("--guidance", default=None, metavar="LIST",
                    help="text guidance w values, s_T = 1 + w, comma-separated (default: the model's)")
    ed.add_argument("--steps", type=int, default=25, help="DDIM steps (default: 25)")
    ed.add_argument("--seed", type=int, default=0, help="held-out stream and sampling noise (default: 0)")
    ed.add_argument("--batch", type=int, default=50, help="triples per sampling batch (default: 50)")
    ed.add_argument("--out-dir", default=OUT_DIR, metavar="DIR", help=f"default: {OUT_DIR}")


def heldout_triples(n: int, seed: int = 0):
    """The first n held-out (before, instruction, after) triples of the stream `seed`."""
    from ldm.data.edits import generate_edit
    return [generate_edit(seed, i, "heldout") for i in range(n)]


def after_asks(scene) -> dict:
    """What the after-scene shows, as the judge takes a caption's asks: every object's attributes, the background."""
    return {"objects": [{"colour": o.colour, "shape": o.shape, "size": o.size} for o in scene.objects],
            "zone": None, "relation": None, "background": scene.background}


def judge_edit(reading, triple) -> tuple[bool, bool, dict[str, bool]]:
    """(edit holds, everything else holds, each other attribute's judgement by key) for one image's oracle reading."""
    from ldm.eval.reader import judge
    judged = judge(reading, after_asks(triple.after))
    edit = triple.edit
    if edit.kind == "background":
        done, key = reading.background == edit.value, "background"
    else:
        x0, y0, x1, y1 = (v * 64 / triple.after.resolution for v in triple.after.objects[edit.target].bbox)
        there = [o for o in reading.objects if x0 <= o.centre[0] <= x1 and y0 <= o.centre[1] <= y1]
        done, key = any(o.colour == edit.value for o in there), f"colour_{edit.target}"
    others = {k: v for k, v in judged.items() if k != key}
    return done, all(others.values()), others


def score(oracle, images, triples, before, after) -> dict:
    """Edit accuracy, preservation (overall and per edit kind) and unchanged-pixel MAE of uint8 images (N, 3, H, W)."""
    judged = [judge_edit(r, t) for r, t in zip(oracle.read(images), triples)]
    outcomes = [(e, p) for e, p, _ in judged]
    from ldm.eval.reader import attribute
    others = [v for _, _, o in judged for v in o.values()]
    by_attribute: dict[str, list[bool]] = {}
    for _, _, o in judged:
        for k, v in o.items():
            by_attribute.setdefault(attribute(k), []).append(v)
    keep = (before == after).all(1, keepdim=True).expand_as(images)     # pixels the edit must leave alone
    mae = (images.float() - before.float()).abs()[keep].mean().item()

    def rates(rows):
        n = len(rows)
        return {"n": n, "edit": sum(e for e, _ in rows) / n, "preserved": sum(p for _, p in rows) / n,
                "both": sum(e and p for e, p in rows) / n}
    kinds = sorted({t.edit.kind for t in triples})
    out = {**rates(outcomes), "preserved_attributes": sum(others) / len(others),
           "preserved_by_attribute": {k: sum(v) / len(v) for k, v in sorted(by_attribute.items())},
           "unchanged_pixel_mae": mae,
           "per_kind": {k: rates([o for o, t in zip(outcomes, triples) if t.edit.kind == k]) for k in kinds}}
    out["outcomes"] = "".join(str(2 * e + p) for e, p in outcomes)   # per triple: 3 both, 2 edit only, 1, 0
    return out


def evaluate(model: str, n: int, image_scales: list[float], guidance: list[float] | None, steps: int, seed: int,
             batch: int, out_dir: str | None = None) -> dict:
    """Sample and score every (w, s_I), plus the input and target baselines; write edits.json and edits.png."""
    import numpy as np
    import torch
    from PIL import Image

    from ldm.data.shapes import render
    from ldm.data.transforms import to_tensor
    from ldm.eval.oracle import Oracle
    from ldm.eval.score import to_uint8
    from ldm.pipeline import TextToImage
    from ldm.training.images import make_grid

    triples = heldout_triples(n, seed)
    before, after = (torch.from_numpy(np.stack([render(getattr(t, part)) for t in triples])).permute(0, 3, 1, 2)
                     for part in ("before", "after"))
    oracle = Oracle.load()
    pipe = TextToImage.from_folder(model)
    ws = [pipe.index.guidance] if guidance is None else guidance
    result = {"model": model, "n": n, "seed": seed, "steps": steps, "sampler": "ddim",
              "kinds": {k: sum(t.edit.kind == k for t in triples) for k in sorted({t.edit.kind for t in triples})},
              "baselines": {"input": score(oracle, before, triples, before, after),
                            "target": score(oracle, after, triples, before, after)},
              "runs": []}
    inputs = torch.stack([to_tensor(render(t.before)) for t in triples])      # [-1, 1], what edit() takes
    rows = [before[:8].float() / 127.5 - 1, after[:8].float() / 127.5 - 1]
    for w, s_i in [(w, s_i) for w in ws for s_i in image_scales]:
        start, edited = time.time(), []
        for i in range(0, n, batch):
            images, _ = pipe.edit(inputs[i:i + batch], [t.instruction for t in triples[i:i + batch]], steps=steps,
                                  guidance=w, image_guidance=s_i, seed=seed + i)
            edited.append(to_uint8(images))
        edited = torch.cat(edited)
        run = {"guidance": w, "image_guidance": s_i, **score(oracle, edited, triples, before, after),
               "seconds": round(time.time() - start, 1)}
        result["runs"].append(run)
        rows.append(edited[:8].float() / 127.5 - 1)
        print(format_run(f"w {w:g} s_I {s_i:g}", run), flush=True)
    for name, run in result["baselines"].items():
        print(format_run(name, run))
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "edits.json").write_text(json.dumps(result, indent=2) + "\n")
        Image.fromarray(make_grid(torch.cat(rows), nrow=min(8, n))).save(out / "edits.png")
        (out / "instructions.txt").write_text("".join(f"{t.instruction}\n" for t in triples[:8]))
    return result


def format_run(name: str, run: dict) -> str:
    kinds = "  ".join(f"{k}: edit {100 * r['edit']:.1f}% kept {100 * r['preserved']:.1f}%"
                      for k, r in run["per_kind"].items())
    return (f"{name:>14}: edit {100 * run['edit']:5.1f}%  preserved {100 * run['preserved']:5.1f}% "
            f"({100 * run['preserved_attributes']:.1f}% of attributes)  both {100 * run['both']:5.1f}%  "
            f"unchanged-pixel MAE {run['unchanged_pixel_mae']:6.2f}  ({kinds})\n{'':>16}other attributes kept: "
            + "  ".join(f"{k} {100 * v:.1f}%" for k, v in run["preserved_by_attribute"].items()))


def main(parser: argparse.ArgumentParser, args) -> dict:
    """python -m ldm.eval edits: check the flags, run `evaluate`."""
    from ldm.pipeline import load_index
    try:
        scales = [float(v) for v in args.image_guidance.split(",") if v.strip()]
        ws = None if args.guidance is None else [float(v) for v in args.guidance.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--image-guidance, --guidance: expected comma-separated numbers, got {args.image_guidance!r}, "
                     f"{args.guidance!r}")
    if args.n < 1 or args.steps < 1 or args.batch < 1 or not scales:
        parser.error(f"need --n, --steps, --batch >= 1 and one s_I, got {args.n}, {args.steps}, {args.batch}, "
                     f"{args.image_guidance!r}")
    if not (Path(args.model) / "model_index.json").is_file():
        parser.error(f"--model {args.model!r} is not a model folder (no model_index.json)")
    if load_index(args.model).image_input != "instruct-pix2pix":
        parser.error(f"--model {args.model!r} is not an InstructPix2Pix model (model_index.json's image_input)")
    return evaluate(args.model, args.n, scales, ws, args.steps, args.seed, args.batch, args.out_dir)
