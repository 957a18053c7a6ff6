"""Session-23 check (docs/stage2-latent.md, "DreamBooth"): does the class prior keep the shipped teacher's other
prompts while it learns a subject?

    OMP_NUM_THREADS=2 python docs/provenance/dreambooth_drift.py [STEPS] [N]     # defaults 300, 500

The subject: "a sks circle" = an orange ring (a hollow circle, which the shapes world never draws) on gray,
8 pictures with jittered radius and centre, drawn here with PIL. Stage 2 fine-tunes the shipped teacher's
U-Net on them (text encoder frozen, batch 4, lr 5e-5, no EMA, STEPS updates), once without and once with
the prior (100 class pictures, weight 1) for two class prompts: "a circle" (not a caption of the shapes
world: the teacher draws it badly) and "a orange circle on a gray background" (the subject's class in the
captions' own words). Measured on each model, teacher
16 DDIM steps at w = 2: the share of 100 "a sks circle" drawings that are rings (the centre is gray, a
pixel ring at the radius is orange), and prompt accuracy / FD of N held-out prompts (as ldm.eval).
"""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldm.eval.metrics import heldout_prompts
from ldm.eval.oracle import Oracle
from ldm.eval.score import evaluate_images, real_images
from ldm.pipeline import TextToImage

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
n = int(sys.argv[2]) if len(sys.argv) > 2 else 500
root = Path("runs/dreambooth-drift")
ORANGE, GRAY = (240, 140, 30), (128, 128, 128)

# The subject's pictures.
images = root / "instance"
images.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
rows = []
for i in range(8):
    picture = Image.new("RGB", (64, 64), GRAY)
    r, cx, cy = rng.integers(13, 18), 32 + rng.integers(-3, 4), 32 + rng.integers(-3, 4)
    ImageDraw.Draw(picture).ellipse((cx - r, cy - r, cx + r, cy + r), outline=ORANGE, width=5)
    picture.save(images / f"{i}.png")
    rows.append(json.dumps({"file_name": f"{i}.png", "text": "a sks circle"}) + "\n")
(images / "metadata.jsonl").write_text("".join(rows))

spec = importlib.util.spec_from_file_location("train_latent", "stages/train_latent.py")
stage = importlib.util.module_from_spec(spec)
sys.modules["train_latent"] = stage
spec.loader.exec_module(stage)
common = ["--config", "configs/latent/shapes64.yaml", "init_from=ldm/assets/shapes64", "data.source=imagefolder",
          f"data.path={images}", "cache_latents=false", "train_text_encoder=false", "train.batch_size=4",
          "train.lr=5e-5", "train.warmup_steps=0", "train.lr_schedule=constant", "train.ema_decay=0",
          f"train.max_steps={steps}", "train.validate_every=0", f"train.checkpoint_every={steps}",
          "train.tracker=none", "save_dtype=float32"]


def fine_tune(name: str, *extra: str) -> str:
    """The run's model folder; a finished run is reused."""
    out = root / name
    if not (out / "model" / "model_index.json").is_file():
        stage.main([*common, f"train.output_dir={out}", *extra])
    return str(out / "model")


prior = ["prior.class_images=100", "prior.steps=16"]
folders = {"shipped teacher": "ldm/assets/shapes64", "fine-tuned": fine_tune("plain"),
           "fine-tuned + prior 'a circle'": fine_tune("prior", "prior.class_prompt=a circle", *prior),
           "fine-tuned + prior 'a orange circle on a gray background'":
               fine_tune("prior-orange", "prior.class_prompt=a orange circle on a gray background", *prior)}


def is_ring(image: np.ndarray) -> bool:
    """Gray at the centre, orange on most of the circle of radius 15 around it."""
    centre = image[28:36, 28:36].reshape(-1, 3).mean(0)
    angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    ys, xs = (32 + 15 * np.sin(angles)).astype(int), (32 + 15 * np.cos(angles)).astype(int)
    on_ring = np.abs(image[ys, xs] - ORANGE).max(1) < 60
    return bool(np.abs(centre - GRAY).max() < 40 and on_ring.mean() > 0.5)


prompts = heldout_prompts(n, 0)
oracle = Oracle.load()
reals = oracle.features(real_images(n, 0))
for name, folder in folders.items():
    pipe = TextToImage.from_folder(folder)
    subject, _ = pipe.generate(["a sks circle"] * 100, steps=16, seed=list(range(100)), teacher=True)
    pixels = ((subject.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    drawn = torch.cat([pipe.generate(prompts[i:i + 100], steps=16, seed=i, teacher=True)[0] for i in range(0, n, 100)])
    r = evaluate_images(oracle, drawn, prompts, reals)
    print(json.dumps({"model": name, "steps": steps, "rings": sum(map(is_ring, pixels)) / 100,
                      "accuracy": r["accuracy"], "fd": round(r["fd"], 3)}), flush=True)
