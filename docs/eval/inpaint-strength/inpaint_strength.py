"""Inpainting at a denoising strength, and "fill" masked content, on the shipped shapes64 teacher, scored on the
shapes world's held-out edit triples (ldm.data.edits) by the InstructPix2Pix edit scorer (ldm.eval.edits.score).

    OMP_NUM_THREADS=1 python docs/eval/inpaint-strength/inpaint_strength.py [--n 200] [--steps 25] [--batch 50] \
        [--out docs/eval/inpaint-strength/inpaint_strength.jsonl]
    python docs/eval/inpaint-strength/inpaint_strength.py --table      # the report's tables from the JSONL only

For each held-out triple (before, instruction, after): the image is the before-image; the prompt is the
after-scene's full caption (ldm.data.captions.format_caption: every object's colour and shape, a lone object's
size and zone, a pair's relation, and always the background, so that a background edit is asked for); the mask is
where the before- and after-images differ, dilated by DILATE px (pipe.inpaint max-pools it to whole latent cells for
the sampler and pastes the input back outside the pixel mask). Every setting (strength, masked content) runs the
teacher (teacher=True), DDIM on the default trailing grid, `--steps` steps (strength s runs round(s * steps) of
them), the model's guidance, the same per-triple seed (seed + index) in every row. masked content "fill" paints the
masked pixels with ldm.inpaint.fill_masked before inpainting, as `python -m ldm.inpaint --masked-content fill`.

Writes one JSON line per row (the two baselines, input and target, then each setting, with edit / preserved /
both / unchanged-pixel MAE overall and per edit kind, the per-triple outcomes string, and the paired comparison
(ldm.eval.compare.paired) of the per-triple edit and both outcomes against strength 1) to --out, and a PNG grid
(rows: before, after target, mask, then each setting) beside it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
DILATE = 2                                                  # px the difference mask grows by on each side
SETTINGS = [(1.0, "original"), (0.75, "original"), (0.75, "fill"), (0.5, "original"), (0.5, "fill"),
            (0.3, "original")]
MODEL = "ldm/assets/shapes64"


def after_caption(scene) -> str:
    """The after-scene's caption that asks for everything the grammar can say about it, background included."""
    from ldm.data.captions import format_caption
    one = len(scene.objects) == 1
    asks = {"objects": [{"colour": o.colour, "shape": o.shape, "size": o.size if one else None}
                        for o in scene.objects],
            "zone": scene.objects[0].zone if one else None, "relation": None if one else scene.relation,
            "background": scene.background}
    return format_caption(asks)


def diff_masks(before: torch.Tensor, after: torch.Tensor, dilate: int = DILATE) -> torch.Tensor:
    """uint8 (N, 3, H, W) pairs -> float (N, 1, H, W) in {0, 1}: where they differ, grown by `dilate` px."""
    differ = (before != after).any(1, keepdim=True).float()
    return F.max_pool2d(differ, 2 * dilate + 1, stride=1, padding=dilate) if dilate else differ


def edit_string(outcomes: str, both: bool = False) -> str:
    """score()'s per-triple outcomes (3 both, 2 edit only, 1 preserved only, 0) -> paired()'s '1' / '0' string."""
    return "".join("1" if (o == "3" if both else o in "23") else "0" for o in outcomes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--out", default=str(HERE / "inpaint_strength.jsonl"))
    parser.add_argument("--grid", default=str(HERE / "inpaint_strength.png"))
    parser.add_argument("--table", action="store_true", help="only print the markdown tables of --out")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return

    from PIL import Image

    from ldm.data.shapes import render
    from ldm.eval.compare import paired
    from ldm.eval.edits import heldout_triples, score
    from ldm.eval.oracle import Oracle
    from ldm.eval.score import to_uint8
    from ldm.inpaint import fill_masked
    from ldm.pipeline import TextToImage
    from ldm.training.images import make_grid

    torch.manual_seed(0)
    triples = heldout_triples(args.n, args.seed)
    before, after = (torch.from_numpy(np.stack([render(getattr(t, part)) for t in triples])).permute(0, 3, 1, 2)
                     .contiguous() for part in ("before", "after"))
    masks = diff_masks(before, after)
    prompts = [after_caption(t.after) for t in triples]
    images = before.float() / 127.5 - 1                     # what pipe.inpaint takes: [-1, 1]
    oracle = Oracle.load()
    pipe = TextToImage.from_folder(args.model)
    guidance = pipe.index.guidance
    kinds = {k: sum(t.edit.kind == k for t in triples) for k in sorted({t.edit.kind for t in triples})}
    mask_share = {k: float(masks[[i for i, t in enumerate(triples) if t.edit.kind == k]].mean()) for k in kinds}

    # a few examples for the grid: both kinds
    rec = [i for i, t in enumerate(triples) if t.edit.kind == "recolour"]
    bg = [i for i, t in enumerate(triples) if t.edit.kind == "background"]
    show = (rec[:5] + bg[:3])[:8]
    grid_rows = [images[show], after[show].float() / 127.5 - 1, masks[show].expand(-1, 3, -1, -1) * 2 - 1]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    common = {"model": args.model, "n": args.n, "seed": args.seed, "steps": args.steps, "sampler": "ddim",
              "spacing": "trailing", "teacher": True, "guidance": guidance, "dilate_px": DILATE, "kinds": kinds,
              "mask_share_by_kind": mask_share}
    for name, imgs in (("input", before), ("target", after)):
        lines.append({"row": f"baseline-{name}", **common, **score(oracle, imgs, triples, before, after)})
        print(name, {k: lines[-1][k] for k in ("edit", "preserved", "both", "unchanged_pixel_mae")}, flush=True)
    reference = None
    for strength, content in SETTINGS:
        start, painted, nfe = time.time(), [], 0
        for i in range(0, args.n, args.batch):
            sl = slice(i, i + args.batch)
            source = fill_masked(images[sl], masks[sl]) if content == "fill" else images[sl]
            result, info = pipe.inpaint(source, masks[sl], prompts[sl], steps=args.steps, strength=strength,
                                        teacher=True, sampler="ddim", guidance=guidance,
                                        seed=[args.seed + j for j in range(i, min(i + args.batch, args.n))])
            nfe = info["nfe"]
            painted.append(to_uint8(result))
        painted = torch.cat(painted)
        row = {"row": f"s{strength:g}-{content}", "strength": strength, "masked_content": content, **common,
               "nfe_per_batch": nfe, **score(oracle, painted, triples, before, after),
               "seconds": round(time.time() - start, 1)}
        if reference is None:
            reference = row
        else:
            row["paired_edit_vs_s1"] = paired(edit_string(reference["outcomes"]), edit_string(row["outcomes"]))
            row["paired_both_vs_s1"] = paired(edit_string(reference["outcomes"], True),
                                              edit_string(row["outcomes"], True))
        lines.append(row)
        grid_rows.append(painted[show].float() / 127.5 - 1)
        print(row["row"], {k: row[k] for k in ("edit", "preserved", "both", "unchanged_pixel_mae", "seconds")},
              {k: (v["edit"], v["preserved"]) for k, v in row["per_kind"].items()}, flush=True)
        out.write_text("".join(json.dumps(line) + "\n" for line in lines))
        Image.fromarray(make_grid(torch.cat(grid_rows), nrow=len(show))).save(args.grid)
    (HERE / "inpaint_strength_prompts.txt").write_text("".join(f"{prompts[i]}    [{triples[i].instruction}]\n"
                                                               for i in show))
    print(table(args.out))


def table(path: str) -> str:
    """Markdown tables of a JSONL written by main: overall and per edit kind, with paired differences against
    strength 1 on the per-triple edit and edit-and-preserved outcomes (per kind recomputed from the outcome strings
    and the triples' kinds)."""
    from ldm.eval.compare import paired
    from ldm.eval.edits import heldout_triples
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    triples = heldout_triples(rows[0]["n"], rows[0]["seed"])
    reference = next(r for r in rows if r.get("strength") == 1.0)

    def diff(r, kind, both):
        keep = [i for i, t in enumerate(triples) if kind is None or t.edit.kind == kind]
        pick = lambda o: "".join(edit_string(o, both)[i] for i in keep)                  # noqa: E731
        p = paired(pick(reference["outcomes"]), pick(r["outcomes"]))
        return f"{100 * p['diff']:+.1f} [{100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f}] p={p['p']:.2g}"

    out = ["| row | edit | preserved | both | attributes kept | unchanged-px MAE | edit vs s=1 (pp, 95% CI) "
           "| both vs s=1 (pp, 95% CI) | s |", "|---" * 9 + "|"]
    for r in rows:
        base = "strength" not in r or r is reference
        out.append(f"| {r['row']} | {100 * r['edit']:.1f} | {100 * r['preserved']:.1f} | {100 * r['both']:.1f} | "
                   f"{100 * r['preserved_attributes']:.1f} | {r['unchanged_pixel_mae']:.2f} | "
                   f"{'' if base else diff(r, None, False)} | {'' if base else diff(r, None, True)} | "
                   f"{r.get('seconds', '')} |")
    for kind in sorted(rows[0]["kinds"]):
        out += ["", f"{kind} ({rows[0]['kinds'][kind]} triples, mask {100 * rows[0]['mask_share_by_kind'][kind]:.0f}% "
                "of the pixels):", "",
                "| row | edit | preserved | both | edit vs s=1 | both vs s=1 |", "|---" * 6 + "|"]
        for r in rows:
            k = r["per_kind"][kind]
            base = "strength" not in r or r is reference
            out.append(f"| {r['row']} | {100 * k['edit']:.1f} | {100 * k['preserved']:.1f} | {100 * k['both']:.1f} | "
                       f"{'' if base else diff(r, kind, False)} | {'' if base else diff(r, kind, True)} |")
    out += ["", "attributes kept (ldm.eval.reader's attribute classes, over the other attributes of every triple):",
            "", "| row | " + " | ".join(rows[0]["preserved_by_attribute"]) + " |",
            "|---" * (1 + len(rows[0]["preserved_by_attribute"])) + "|"]
    out += [f"| {r['row']} | " + " | ".join(f"{100 * v:.1f}" for v in r["preserved_by_attribute"].values()) + " |"
            for r in rows]
    return "\n".join(out)


if __name__ == "__main__":
    main()
