"""Session-6 capacity test (docs/stage2-latent.md, "What unblocks it"): can the shapes64 U-Net and
scratch text encoder learn position words at all? Trains from scratch on position-only captions,
then exports a model folder for `python -m ldm.eval position --model OUT --steps 1`.

    OMP_NUM_THREADS=1 python docs/experiments/position_capacity.py VARIANT STEPS OUT
    VARIANT: nopos | pos | nopos-frozen | pos-frozen  (unet.pos_embed; text encoder frozen at init)
"""
import sys, random, numpy as np, torch
from pathlib import Path
sys.path.insert(0, "stages")  # run from the repo root
import train_latent as T
from ldm.data.shapes import COLOURS, render, scene_for_prompt
from ldm.diffusion import DiffusionLoss, schedule_from_config
from ldm.training.latent_cache import scaled_latents
torch.set_num_threads(1); torch.manual_seed(0); random.seed(0)
pos = sys.argv[1].startswith("pos"); frozen = sys.argv[1].endswith("frozen"); steps = int(sys.argv[2]); out = Path(sys.argv[3])
cfg = T.parse_args(T.LatentStageConfig, "x", T.DEFAULT_CONFIG,
                   ["--config", "configs/latent/shapes64.yaml", f"unet.pos_embed={'true' if pos else 'false'}"])
ae = T.load_autoencoder(cfg.autoencoder, "cpu")
rng = np.random.default_rng(0)
suffix = [" on the left", " on the right", " at the top", " at the bottom"]
prompts = [f"a large {c} circle{random.choice(suffix)}" for c in COLOURS for _ in range(200)]
random.shuffle(prompts)
imgs = torch.from_numpy(np.stack([render(scene_for_prompt(p, rng, 64)) for p in prompts])).permute(0, 3, 1, 2).float() / 127.5 - 1
with torch.no_grad():
    post = [ae.encode(imgs[i:i + 200]) for i in range(0, len(imgs), 200)]
mean = torch.cat([p.mean for p in post]); std = torch.cat([p.std for p in post])
net = T.LatentModel(T.UNet(cfg.unet), T.build_text_encoder(cfg.text), True)
if frozen:
    net.text_encoder.requires_grad_(False)
opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=4e-4, weight_decay=0.01)
d = cfg.diffusion
loss_fn = DiffusionLoss(schedule_from_config(d.schedule_config()), d.prediction, d.weighting, d.gamma, d.time, d.time_scale)
for step in range(steps):
    idx = torch.randint(0, len(prompts), (32,))
    z = scaled_latents(mean[idx], std[idx], ae.config)
    ps = T.drop_captions([prompts[i] for i in idx], 0.1)
    for g in opt.param_groups:
        g["lr"] = 4e-4 * min(1.0, (step + 1) / 100)
    loss = loss_fn(net, z, {"prompts": ps})
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step()
    if step % 100 == 0:
        print(step, loss.item(), flush=True)
T.save_model_folder(net, cfg, out)
print("saved", out)
