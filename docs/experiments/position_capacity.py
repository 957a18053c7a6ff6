"""Capacity tests of position learning (docs/stage2-latent.md, sessions 6 and 7): train the shapes64
U-Net and scratch text encoder from scratch on a chosen caption mix, then export a model folder for
`python -m ldm.eval position --model OUT --steps 1`.

    OMP_NUM_THREADS=1 python docs/experiments/position_capacity.py MODE STEPS OUT \
        [--embed-std S] [--joint] [--no-pos-embed] [--batch N] [--t-min T | --t1-share P] \
        [--time-shift S] [--scale-shift]

At the end it prints the first step's spread (ldm.eval.position.spread of the t = 1 x0 in latent
space, 8 noises x the 4 zones of a red and a blue large circle) and writes OUT.png of those x0s.

MODE cap: 'a large {colour} circle {zone}' (4 zones); one: one-object scenes, zone always named;
onefixed: the same scenes as 'a {size} {colour} {shape} {zone}'; mix: the preset's captions.
Session 6's table: cap with --embed-std 0.02 and each of --joint / --no-pos-embed; session 7's:
each MODE at the defaults (embed_std 1, encoder frozen at init, pos_embed on), one with --t-min 0.8.
Session 8's: one with --scale-shift, --t1-share 0.25 and 1.0, --time-shift 8; mix with --time-shift 8.
"""
import argparse, random, sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, "stages")  # run from the repo root
import train_latent as T
import ldm.diffusion.losses as L
from ldm.data.captions import ZONE_PHRASES
from ldm.data.shapes import COLOURS, generate, render, scene_for_prompt
from ldm.diffusion import DiffusionLoss, schedule_from_config
from ldm.eval.position import red_centroid, spread
from ldm.training.latent_cache import scaled_latents

parser = argparse.ArgumentParser()
parser.add_argument("mode", choices=["cap", "one", "onefixed", "mix"])
parser.add_argument("steps", type=int)
parser.add_argument("out", type=Path)
parser.add_argument("--embed-std", type=float, default=1.0, help="text.embed_std")
parser.add_argument("--joint", action="store_true", help="train the text encoder (default: frozen at init)")
parser.add_argument("--no-pos-embed", action="store_true", help="unet.pos_embed=false")
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--t-min", type=float, default=0.0, help="train on t ~ U[t_min, 1] only (high noise)")
parser.add_argument("--t1-share", type=float, default=0.0, help="this share of each batch at t = 1 exactly")
parser.add_argument("--time-shift", type=float, default=1.0, help="diffusion.time_shift")
parser.add_argument("--scale-shift", action="store_true",
                    help="ResBlocks modulate their second GroupNorm by the time embedding (ADM's AdaGN)")
args = parser.parse_args()

torch.set_num_threads(1); torch.manual_seed(0); random.seed(0)
cfg = T.parse_args(T.LatentStageConfig, "x", T.DEFAULT_CONFIG,
                   ["--config", "configs/latent/shapes64.yaml", f"unet.pos_embed={str(not args.no_pos_embed).lower()}",
                    f"text.embed_std={args.embed_std}"])
ae = T.load_autoencoder(cfg.autoencoder, "cpu")
rng = np.random.default_rng(0)
if args.mode == "cap":
    suffix = [" on the left", " on the right", " at the top", " at the bottom"]
    prompts = [f"a large {c} circle{random.choice(suffix)}" for c in COLOURS for _ in range(200)]
    random.shuffle(prompts)
    scenes = [scene_for_prompt(p, rng, 64) for p in prompts]
else:
    prompts, scenes, i = [], [], 0
    while len(prompts) < 4800:
        s = generate(0, i, p_zone=0.5 if args.mode == "mix" else 1.0); i += 1
        if args.mode != "mix" and len(s.scene.objects) != 1:
            continue
        text = s.text
        if args.mode == "onefixed":  # one template: size always named, no background words
            obj = s.scene.objects[0]
            text = f"a {obj.size} {obj.colour} {obj.shape} {ZONE_PHRASES[obj.zone]}"
        prompts.append(text); scenes.append(s.scene)
imgs = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
with torch.no_grad():
    post = [ae.encode(imgs[i:i + 200]) for i in range(0, len(imgs), 200)]
mean = torch.cat([p.mean for p in post]); std = torch.cat([p.std for p in post])
if args.scale_shift:  # experiment only: Dhariwal & Nichol 2021's AdaGN, GN(h) * (1 + scale) + shift
    import torch.nn as nn
    import torch.nn.functional as F
    from ldm.models import layers

    plain_init = layers.ResBlock.__init__

    def adagn_init(self, in_ch, out_ch, emb_dim=None, groups=32, eps=1e-5, dropout=0.0):
        plain_init(self, in_ch, out_ch, emb_dim, groups, eps, dropout)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = layers.GroupNorm(out_ch, groups, eps)  # SiLU after the modulation

    def adagn_forward(self, x, emb):
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, 1)
        h = F.silu(self.norm2(self.conv1(self.norm1(x))) * (1 + scale) + shift)
        return self.conv2(self.dropout(h)) + (x if self.skip is None else self.skip(x))

    layers.ResBlock.__init__, layers.ResBlock.forward = adagn_init, adagn_forward
net = T.LatentModel(T.UNet(cfg.unet), T.build_text_encoder(cfg.text), True)
if not args.joint:
    net.text_encoder.requires_grad_(False)
opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=4e-4, weight_decay=0.01)
if args.t_min > 0:  # high noise only: where the words, not x_t, decide the layout
    L.sample_times = lambda schedule, n, **kw: args.t_min + (1 - args.t_min) * torch.rand(n)
if args.t1_share > 0:
    def t1_times(schedule, n, **kw):
        t = torch.rand(n)
        return torch.where(torch.rand(n) < args.t1_share, torch.ones(n), t)
    L.sample_times = t1_times
d = cfg.diffusion
loss_fn = DiffusionLoss(schedule_from_config(d.schedule_config()), d.prediction, d.weighting, d.gamma, d.time, d.time_scale,
                        args.time_shift)
for step in range(args.steps):
    idx = torch.randint(0, len(prompts), (args.batch,))
    z = scaled_latents(mean[idx], std[idx], ae.config)
    ps = T.drop_captions([prompts[i] for i in idx], 0.1)
    for g in opt.param_groups:
        g["lr"] = 4e-4 * min(1.0, (step + 1) / 100)
    loss = loss_fn(net, z, {"prompts": ps})
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step()
    if step % 100 == 0:
        print(step, loss.item(), flush=True)
net.eval()
with torch.no_grad():  # the first sampling step: x0 = -v at t = 1, the same 8 noises for every prompt
    prompts = [f"a large {c} circle {ZONE_PHRASES[z]}" for c in ("red", "blue") for z in ("left", "right", "top", "bottom")]
    z1 = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    x0 = -torch.stack([net(z1, torch.full((8,), d.time_scale), [p] * 8) for p in prompts])  # (8 prompts, 8, 4, 16, 16)
    images = ae.decode_latents(x0.flatten(0, 1)).clamp(-1, 1)
x, y = (c.view(8, 8).mean(1) for c in red_centroid(images))
first = spread(x0)
print(f"first step: latent variance {first['noise']:.4f} across noise, {first['prompt']:.4f} across prompts; "
      f"red x(left)-x(right) {x[0] - x[1]:.1f}, y(top)-y(bottom) {y[2] - y[3]:.1f} px")
grid = images.view(8, 8, 3, 64, 64).permute(0, 3, 1, 4, 2).reshape(512, 512, 3)  # rows: prompts, columns: noises
Image.fromarray(((grid + 1) * 127.5).round().byte().numpy()).save(args.out.with_suffix(".png"))
if args.scale_shift:  # the library's U-Net has no AdaGN: the folder would not load
    print("not saved (--scale-shift)")
else:
    T.save_model_folder(net, cfg, args.out)
    print("saved", args.out)
