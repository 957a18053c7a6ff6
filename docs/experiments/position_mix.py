"""Session-7 capacity test on a graded data mix (docs/stage2-latent.md): unet.pos_embed on, the scratch
text encoder at text.embed_std EMBED_STD, frozen or not; exports a model folder for
`python -m ldm.eval position --model OUT --steps 1`. TMIN=0.8 in the environment trains on t ~ U[0.8, 1] only.

    OMP_NUM_THREADS=1 python docs/experiments/position_mix.py MODE STEPS OUT [EMBED_STD] [FROZEN 1|0] [BATCH]

MODE cap: 'a large {colour} circle {zone}' (4 zones); one: one-object scenes, zone always named;
onefixed: the same scenes as 'a {size} {colour} {shape} {zone}';
mix: the preset's captions (generate, p_zone 0.5)."""
import sys, random, numpy as np, torch
from pathlib import Path
sys.path.insert(0, "stages")
import train_latent as T
from ldm.data.captions import ZONE_PHRASES
from ldm.data.shapes import COLOURS, render, scene_for_prompt, generate
from ldm.diffusion import DiffusionLoss, schedule_from_config
from ldm.training.latent_cache import scaled_latents
torch.set_num_threads(1); torch.manual_seed(0); random.seed(0)
mode, steps, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
std = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
frozen = (sys.argv[5] != "0") if len(sys.argv) > 5 else True
bs = int(sys.argv[6]) if len(sys.argv) > 6 else 32
cfg = T.parse_args(T.LatentStageConfig, "x", T.DEFAULT_CONFIG,
                   ["--config", "configs/latent/shapes64.yaml", "unet.pos_embed=true", f"text.embed_std={std}"])
ae = T.load_autoencoder(cfg.autoencoder, "cpu")
rng = np.random.default_rng(0)
if mode == "cap":
    suffix = [" on the left", " on the right", " at the top", " at the bottom"]
    prompts = [f"a large {c} circle{random.choice(suffix)}" for c in COLOURS for _ in range(200)]
    random.shuffle(prompts)
    scenes = [scene_for_prompt(p, rng, 64) for p in prompts]
else:
    prompts, scenes, i = [], [], 0
    while len(prompts) < 4800:
        s = generate(0, i, p_zone=0.5 if mode == "mix" else 1.0); i += 1
        if mode != "mix" and len(s.scene.objects) != 1:
            continue
        text = s.text
        if mode == "onefixed":  # one template: size always named, no background words
            obj = s.scene.objects[0]
            text = f"a {obj.size} {obj.colour} {obj.shape} {ZONE_PHRASES[obj.zone]}"
        prompts.append(text); scenes.append(s.scene)
imgs = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
with torch.no_grad():
    post = [ae.encode(imgs[i:i + 200]) for i in range(0, len(imgs), 200)]
mean = torch.cat([p.mean for p in post]); stdv = torch.cat([p.std for p in post])
net = T.LatentModel(T.UNet(cfg.unet), T.build_text_encoder(cfg.text), True)
if frozen:
    net.text_encoder.requires_grad_(False)
opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=4e-4, weight_decay=0.01)
d = cfg.diffusion
import os, ldm.diffusion.losses as L
TMIN = float(os.environ.get("TMIN", "0"))
if TMIN > 0:  # scratch: train only on t ~ U[TMIN, 1] (high noise: where the words decide the layout)
    L.sample_times = lambda schedule, n, **kw: TMIN + (1 - TMIN) * torch.rand(n)
loss_fn = DiffusionLoss(schedule_from_config(d.schedule_config()), d.prediction, d.weighting, d.gamma, d.time, d.time_scale)
for step in range(steps):
    idx = torch.randint(0, len(prompts), (bs,))
    z = scaled_latents(mean[idx], stdv[idx], ae.config)
    ps = T.drop_captions([prompts[i] for i in idx], 0.1)
    for g in opt.param_groups:
        g["lr"] = 4e-4 * min(1.0, (step + 1) / 100)
    loss = loss_fn(net, z, {"prompts": ps})
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step()
    if step % 100 == 0:
        print(step, loss.item(), flush=True)
T.save_model_folder(net, cfg, out)
print("saved", out)
