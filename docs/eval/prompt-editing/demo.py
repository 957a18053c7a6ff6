"""Prompt editing on the shipped shapes64 teacher: what the oracle reads when 'red' turns 'blue' (or 'circle' turns
'square') after a fraction of the steps. Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python docs/eval/prompt-editing/demo.py [--n 32] [--steps 16]

Writes docs/eval/prompt-editing/results.json and grid.png (a row a prompt, a column a seed)."""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from ldm.eval.oracle import Oracle
from ldm.pipeline import TextToImage

HERE = Path(__file__).parent
FRACTIONS = ("0.0625", "0.125", "0.25", "0.5", "0.75", "0.875")
PROMPTS = ["a red circle", *(f"a [red:blue:{f}] circle" for f in FRACTIONS), "a blue circle", "a [red|blue] circle",
           "a red circle", *(f"a red [circle:square:{f}]" for f in FRACTIONS), "a red square"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=32, help="seeds a prompt (0 .. n-1)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--grid", type=int, default=8, help="seeds a row in grid.png")
    args = parser.parse_args()
    pipe = TextToImage.from_folder(decoder_precision="fp32")
    pipe.prompt_weights = True
    oracle = Oracle.load()
    results, rows = [], []
    for prompt in dict.fromkeys(PROMPTS):
        start = time.perf_counter()
        images, info = pipe.generate([prompt] * args.n, steps=args.steps, teacher=True, seed=list(range(args.n)))
        seconds = time.perf_counter() - start
        readings = oracle.read(((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        seen = Counter(" ".join(f"{o.colour} {o.shape}" for o in r.objects) or "nothing" for r in readings)
        results.append({"prompt": prompt, "n": args.n, "steps": info["steps"], "guidance": info["guidance"],
                        "sampler": info["sampler"], "seconds": round(seconds, 1), "oracle_reads": dict(seen.most_common())})
        print(f"{prompt!r}: {dict(seen.most_common())} ({seconds:.0f} s)", flush=True)
        rows.append(images[: args.grid])
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)      # (3, rows * H, cols * W)
    pixels = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(HERE / "grid.png")


if __name__ == "__main__":
    main()
