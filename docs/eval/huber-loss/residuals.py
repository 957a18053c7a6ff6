"""How big the shipped teacher's v-prediction errors are at each noise level, against the pseudo-Huber c there: where
|d| >> c the loss is l1-like (2c|d|), and the net is pulled to a conditional median rather than the mean.

    OMP_NUM_THREADS=1 python docs/eval/huber-loss/residuals.py      # 256 training scenes (seed 0), true captions
"""
import json

import torch

from ldm.data.loaders import DataConfig, build_dataset
from ldm.diffusion.losses import huber_c_at
from ldm.diffusion.param import append_dims, training_target
from ldm.pipeline import TextToImage

pipe = TextToImage.from_folder("ldm/assets/shapes64")
data = build_dataset(DataConfig(source="shapes", resolution=64, length=256, seed=0))
items = [data[i] for i in range(256)]
with torch.no_grad():
    z = pipe.autoencoder.encode_latents(torch.stack([it["pixel_values"] for it in items]), sample=False)
    context, mask = pipe.text_encoder([it["text"] for it in items])
    g = torch.Generator().manual_seed(0)
    for t in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95):
        tt = torch.full((256,), t, dtype=torch.float64)
        alpha, sigma = pipe.schedule.alpha_sigma(tt)
        a, s = (append_dims(c.float(), 4) for c in (alpha, sigma))
        eps = torch.randn(z.shape, generator=g)
        out = pipe.unet(a * z + s * eps, tt.float() * pipe.index.time_scale, context, context_mask=mask)
        d = out - training_target("v", z, eps, a, s)
        rows = {}
        for c0 in (0.1, 0.5):
            c = float(huber_c_at("snr", c0, pipe.schedule, tt, alpha, sigma)[0])
            rows[f"snr_c{c0}"] = {"c": round(c, 4), "share_abs_d_over_c": round(float((d.abs() > c).float().mean()), 3)}
        print(json.dumps({"t": t, "logsnr": round(float(pipe.schedule.logsnr(tt[:1])), 2),
                          "rms_d": round(float(d.pow(2).mean().sqrt()), 4),
                          "median_abs_d": round(float(d.abs().median()), 4), **rows}), flush=True)
