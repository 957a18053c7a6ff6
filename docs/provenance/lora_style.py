"""Session-21 LoRA check (docs/stage2-latent.md, "LoRA fine-tuning"): teach the shipped teacher a style
it never saw, through stage 2's LoRA mode and the imagefolder loader, and measure what it learned and
what it kept.

    python docs/provenance/lora_style.py data runs/lora-gray-data 4000 [SHARE]  # SHARE of them -> grayscale + suffix
    OMP_NUM_THREADS=2 python stages/train_latent.py --config configs/latent/shapes64.yaml \
        init_from=ldm/assets/shapes64 lora.rank=8 data.source=imagefolder data.path=runs/lora-gray-data ...
    python docs/provenance/lora_style.py eval runs/lora-gray/lora.safetensors runs/lora-gray-eval 200

The style: every training image in grayscale, its caption ending in ", in grayscale". Measured on
held-out prompts, with and without the suffix, without and with the LoRA: colour saturation
(mean over pixels of max(R, G, B) - min(R, G, B), 0 for gray) and the oracle's per-attribute accuracy.
"""
import json
import sys
from pathlib import Path

import torch
from PIL import Image

SUFFIX = ", in grayscale"


def make_data(out: str, n: int, share: float = 1.0) -> None:
    """n shapes images; the first share * n of them in grayscale with the suffix, the rest as they were."""
    from ldm.data.shapes import export
    folder = export(out, n, seed=7)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for row in rows[:round(share * n)]:
        path = folder / row["file_name"]
        Image.open(path).convert("L").convert("RGB").save(path)
        row["text"] += SUFFIX
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{round(share * n)} of {len(rows)} images in grayscale in {folder}")


def saturation(images: torch.Tensor) -> float:
    """images (N, 3, H, W) in [-1, 1] -> mean of max - min over channels, in [0, 1] units."""
    x = images * 0.5 + 0.5
    return (x.amax(1) - x.amin(1)).mean().item()


def evaluate(lora: str, out: str, n: int) -> None:
    from ldm.eval.metrics import heldout_prompts
    from ldm.eval.oracle import Oracle
    from ldm.eval.score import evaluate_images, real_images
    from ldm.pipeline import TextToImage
    prompts = heldout_prompts(n, seed=0)
    oracle = Oracle.load()
    reals = oracle.features(real_images(n, 0))
    rows = {}
    for with_lora in (False, True):
        pipe = TextToImage.from_folder("ldm/assets/shapes64", decoder_precision="fp32")
        if with_lora:
            pipe.add_lora(lora)
        for model, steps, teacher in (("teacher-25", 25, True), ("student-4", 4, False)):
            for suffix in ("", SUFFIX):
                images = torch.cat([pipe.generate([p + suffix for p in prompts[i:i + 50]], steps=steps, seed=i,
                                                  teacher=teacher)[0] for i in range(0, n, 50)])
                name = f"{model}{' +lora' if with_lora else ''}{' +suffix' if suffix else ''}"
                result = evaluate_images(oracle, images, prompts, reals)   # judged on the prompt without suffix
                attributes = {k: round(v["accuracy"], 3) for k, v in result["per_attribute"].items()}
                rows[name] = {"saturation": round(saturation(images), 4), "accuracy": result["accuracy"],
                              "fd": round(result["fd"], 2), "per_attribute": attributes}
                print(name, json.dumps(rows[name]), flush=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "result.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "data":
        make_data(args[0], int(args[1]), float(args[2]) if len(args) > 2 else 1.0)
    else:
        evaluate(args[0], args[1], int(args[2]))
