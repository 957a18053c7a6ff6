"""Session-23 check (docs/controlnet.md): does an edges ControlNet put the shipped teacher's shapes where the edges are?

    OMP_NUM_THREADS=1 python docs/provenance/controlnet_eval.py CONTROLNET_DIR [N]   # N held-out scenes (default 500)

For N held-out scenes (never trained on; the oracle's held-out split), the control image is the Sobel
edge map of the scene as rendered (ldm.data.hints, the threshold the ControlNet trained with). The
teacher draws each scene's caption with 16 DDIM steps at w = 2, seeds 0, 100, ... per batch of 100, with
and without the ControlNet, and with the ControlNet and an empty prompt. Measured: edge F1 between the
drawn image's edges and the control edges, each edge pixel counted as matched when the other map has an
edge within 1 px (3x3 neighbourhood); prompt accuracy and FD from the oracle, as `python -m ldm.eval` does.
"""
import json
import sys

import torch
import torch.nn.functional as F

from ldm.data.hints import edge_map
from ldm.eval.oracle import Oracle
from ldm.eval.score import evaluate_images, heldout_samples, real_images
from ldm.models.controlnet import load_controlnet
from ldm.pipeline import TextToImage

folder = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 500
threshold = float(sys.argv[3]) if len(sys.argv) > 3 else 0.1
captions = [s.text for s in heldout_samples(n, 0)]
reals = real_images(n, 0)                                   # uint8 (n, 3, 64, 64): the same scenes
hints = edge_map(reals.float() / 127.5 - 1, threshold)
oracle = Oracle.load()
real_features = oracle.features(reals)
pipe = TextToImage.from_folder("ldm/assets/shapes64")
net = load_controlnet(folder)


def f1(drawn: torch.Tensor, control: torch.Tensor) -> float:
    """Mean per-image F1 of two {0, 1} edge maps (B, H, W) with a 1-px tolerance."""
    near = lambda m: F.max_pool2d(m[:, None], 3, stride=1, padding=1)[:, 0]  # noqa: E731
    precision = (drawn * near(control)).sum((1, 2)) / drawn.sum((1, 2)).clamp(min=1)
    recall = (control * near(drawn)).sum((1, 2)) / control.sum((1, 2)).clamp(min=1)
    return float((2 * precision * recall / (precision + recall).clamp(min=1e-8)).mean())


rows = {"scene itself": reals.float() / 127.5 - 1}
for name, control, prompts in (("teacher", False, captions), ("teacher + ControlNet", True, captions),
                               ("teacher + ControlNet, empty prompt", True, [""] * n)):
    images = []
    for i in range(0, n, 100):
        extra = {"control": [(net, hints[i:i + 100], 1.0)]} if control else {}
        images.append(pipe.generate(prompts[i:i + 100], steps=16, guidance=2.0, seed=i, teacher=True, **extra)[0])
    rows[name] = torch.cat(images)
for name, images in rows.items():
    result = {"run": name, "edge_f1": round(f1(edge_map(images, threshold)[:, 0], hints[:, 0]), 4)}
    if name != "scene itself":
        r = evaluate_images(oracle, images, captions, real_features)
        result |= {"accuracy": r["accuracy"], "fd": round(r["fd"], 3)}
    print(json.dumps(result), flush=True)
