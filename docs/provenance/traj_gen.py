"""Throw-away driver (session 18): the CFG teacher's 64-step DDIM paths from pure noise, on training
prompts, with the states at the 8-step grid's times kept: targets for fine-tuning few-step students
on the teacher's own end points instead of the previous round's two steps.

    python docs/provenance/traj_gen.py OUT_DIR N_BATCHES [START]

(Kept as it ran from runs/; only the docstring's file references were corrected afterwards.)
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ldm.data.shapes import generate
from ldm.diffusion.guidance import cfg
from ldm.diffusion.samplers import initial_noise, sample_ddim
from ldm.pipeline import TextToImage

torch.set_num_threads(2)
out, n_batches = Path(sys.argv[1]), int(sys.argv[2])
start = int(sys.argv[3]) if len(sys.argv) > 3 else 0
out.mkdir(parents=True, exist_ok=True)
B, N, KEEP = 64, 64, 8
pipe = TextToImage.from_folder("ldm/assets/shapes64")
ts = pipe.schedule.timesteps(N)
assert torch.allclose(ts[:: N // KEEP], pipe.schedule.timesteps(KEEP)), "8-grid must be a subset"
teacher = pipe.denoiser(pipe.unet, pipe.index.prediction)
uncond = pipe.encode_prompts([""])
for b in range(start, start + n_batches):
    path = out / f"{b:05d}.pt"
    if path.exists():
        continue
    t0 = time.time()
    rng = np.random.default_rng([18, b])
    idx = rng.integers(0, 30000, B)
    prompts = [generate(0, int(i), "train", 64).text for i in idx]
    prompts = ["" if u else p for u, p in zip(rng.random(B) < 0.1, prompts)]   # p_uncond as the stage
    w = torch.from_numpy(rng.uniform(0.0, 4.0, B)).float()
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    x = initial_noise(pipe.schedule, ts, pipe.latent_shape(B), generator=gen)
    states = [None] * (KEEP + 1)
    states[0] = x.clone()

    def keep(d):
        if d["i"] % (N // KEEP) == 0:
            states[d["i"] // (N // KEEP)] = d["x"].clone()

    cond = pipe.encode_prompts(prompts)
    z = sample_ddim(cfg(teacher, w, uncond), x, ts, pipe.schedule, extra_args=cond, callback=keep, disable=True)
    states[KEEP] = z
    torch.save({"states": torch.stack(states), "prompts": prompts, "w": w}, path)
    print(f"batch {b}: {time.time() - t0:.1f} s", flush=True)
