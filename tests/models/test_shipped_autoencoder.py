"""The shipped stage-1 autoencoder (ldm/assets/shapes64/autoencoder) keeps what prompts ask for.

Issue goal: held-out PSNR >= 32 dB and oracle prompt accuracy on reconstructions within 1 point
of the originals. Measured on 1000 images in docs/stage1-autoencoder.md; here a 128-image check.
"""
from pathlib import Path

import torch

import ldm
from ldm.data.shapes import ShapesWorld
from ldm.eval.metrics import prompt_accuracy
from ldm.eval.oracle import Oracle
from ldm.models.autoencoder import AutoencoderKL
from ldm.training.ae_eval import psnr, reconstruct

SHIPPED = Path(ldm.__file__).parent / "assets" / "shapes64" / "autoencoder"


def test_shipped_autoencoder_reconstructs_heldout_images():
    ae = AutoencoderKL.from_pretrained(str(SHIPPED))
    world = ShapesWorld("heldout", 0, 64, 128)
    items = [world[i] for i in range(len(world))]
    x, captions = torch.stack([it["pixel_values"] for it in items]), [it["text"] for it in items]
    rec = reconstruct(ae, x)
    assert float(psnr(rec, x).mean()) >= 32.0
    oracle = Oracle.load()
    acc = {name: prompt_accuracy(oracle.judge_batch(images, captions), captions)["all"]
           for name, images in (("originals", x), ("reconstructions", rec))}
    assert acc["reconstructions"] >= acc["originals"] - 0.01, acc
    z = ae.encode_latents(x[:64], sample=False)      # the measured scaling factor gives ~unit latents
    assert 0.8 < float(z.std()) < 1.25
