"""Textual inversion on the shapes world: how often does the shipped teacher draw "a <zig>" as a large red circle,
before (the word at its init, "square" in each vector) and after stages/train_embedding.py taught it from pictures
of one? The session's runs (2-core CPU shared with other jobs; 300 steps of batch 16, lr 1e-2):

    # 3 vectors (the preset): 7.3 min wall
    OMP_NUM_THREADS=2 python stages/train_embedding.py --config configs/embedding/shapes64.yaml train.tracker=none \
        train.output_dir=runs/embedding-shapes64-k3 train.validate_every=300
    OMP_NUM_THREADS=2 python docs/provenance/textual_inversion_eval.py runs/embedding-shapes64-k3/learned_embeds.safetensors \
        runs/ti-eval-k3 50 docs/eval/textual-inversion/k3 after,after-left,after-student4
    OMP_NUM_THREADS=2 python docs/provenance/textual_inversion_eval.py runs/embedding-shapes64-k3/learned_embeds.safetensors \
        runs/ti-eval-k3 50 docs/eval/textual-inversion/k3 before,words
    # 1 vector: 19.2 min wall under a load of ~6
    OMP_NUM_THREADS=2 python stages/train_embedding.py --config configs/embedding/shapes64.yaml train.tracker=none \
        embedding.vectors=1
    OMP_NUM_THREADS=2 python docs/provenance/textual_inversion_eval.py runs/embedding-shapes64/learned_embeds.safetensors \
        runs/ti-eval 50 docs/eval/textual-inversion/k1

Each case draws N images, image i from seed i, exactly as `python -m ldm.txt2img PROMPT --seed i --teacher --steps 25
--embedding FILE` does (DDIM, the folder's w = 2; checked: the same pixels for seed 3; "student" rows: `--steps 4`
without --teacher, the 4-step student, which reads the word through the same text encoder), writes them as
OUT/<case>/{i:04d}.png with OUT/<case>/prompts.txt holding the caption it should show, and scores them with the
shapes-world oracle through the CLI `python -m ldm.eval score --images OUT/<case> --prompts OUT/<case>/prompts.txt`
(in-process). Rows go to ROWS/results.json and ROWS/results.md, sample grids (seeds 0-15) to ROWS/<case>.png. A
fifth argument picks cases (comma-separated names); rows of other cases already in ROWS/results.json are kept.
"""
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open

from ldm.pipeline import DEFAULT_MODEL, TextToImage
from ldm.training.images import make_grid, save_image_grid

CONCEPT = "a large red circle"
# (case, prompt, embedding: "init" | "learned" | None, the caption it should show, steps, teacher)
CASES = [
    ("before", "a <zig>", "init", CONCEPT, 25, True),
    ("after", "a <zig>", "learned", CONCEPT, 25, True),
    ("after-left", "a <zig> on the left", "learned", CONCEPT + " on the left", 25, True),
    ("words", CONCEPT, None, CONCEPT, 25, True),
    ("after-student4", "a <zig>", "learned", CONCEPT, 4, False),
]


def init_file(learned: Path, out: Path) -> Path:
    """The word at step 0: the init word's row of the shipped model's token table, in the learned file's layout."""
    from safetensors.torch import load_file, save_file
    with safe_open(str(learned), "pt") as f:
        meta = f.metadata()
    (word, vectors), = load_file(str(learned)).items()
    pipe = TextToImage.from_folder(DEFAULT_MODEL)
    row = pipe.text_encoder.token_embedding.weight[pipe.text_encoder.token_ids(meta["init_word"])[0]].detach()
    path = out / "init_embeds.safetensors"
    save_file({word: row.expand_as(vectors).contiguous()}, str(path), {**meta, "step": "0"})
    return path


def main(learned: str, out: str, n: int, rows: str, cases: str = "") -> None:
    from ldm.eval.__main__ import main as eval_cli
    learned, out, rows = Path(learned), Path(out), Path(rows)
    out.mkdir(parents=True, exist_ok=True)
    rows.mkdir(parents=True, exist_ok=True)
    files = {"init": init_file(learned, out), "learned": learned}
    results = []
    for case, prompt, embedding, target, steps, teacher in CASES:
        if cases and case not in cases.split(","):
            continue
        pipe = TextToImage.from_folder(DEFAULT_MODEL)          # fresh: a word is added once per encoder
        if embedding:
            pipe.add_embedding(str(files[embedding]))
        folder = out / case
        folder.mkdir(exist_ok=True)
        images = []
        for start in range(0, n, 25):
            seeds = list(range(start, min(n, start + 25)))
            batch, info = pipe.generate([prompt] * len(seeds), steps=steps, seed=seeds, teacher=teacher)
            images.append(batch.cpu())
        images = torch.cat(images)
        for i, image in enumerate(images):
            Image.fromarray(make_grid(image[None], nrow=1, padding=0)).save(folder / f"{i:04d}.png")
        (folder / "prompts.txt").write_text((target + "\n") * n)
        eval_cli(["score", "--images", str(folder), "--prompts", str(folder / "prompts.txt"),
                  "--out", str(folder / "result.json")])
        score = json.loads((folder / "result.json").read_text())
        results.append({"case": case, "prompt": prompt, "embedding": str(files[embedding]) if embedding else None,
                        "judged_against": target, "n": n, "steps": steps, "model": info["model"],
                        "accuracy": score["accuracy"], "per_attribute": score["per_attribute"],
                        "correct": score["correct"]})
        save_image_grid(images[:16], rows / f"{case}.png", nrow=16)
        print(f"{case:15s} {prompt!r:24} -> {target!r}: {100 * score['accuracy']:.1f}% of {n}")
    if (rows / "results.json").is_file():                  # rows of cases run before, this run's replacing theirs
        done = {r["case"] for r in results}
        order = [case for case, *_ in CASES]
        earlier = [r for r in json.loads((rows / "results.json").read_text()) if r["case"] not in done]
        results = sorted(earlier + results, key=lambda r: order.index(r["case"]))
    (rows / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| case | prompt | embedding | judged against | model | steps | accuracy |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | `{r['prompt']}` | {Path(r['embedding']).name if r['embedding'] else '-'} | "
              f"{r['judged_against']} | {r['model']} | {r['steps']} | {100 * r['accuracy']:.1f}% of {r['n']} |"
              for r in results]
    (rows / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], *sys.argv[5:6])
