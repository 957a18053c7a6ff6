"""Throw-away driver (session 19): fine-tune an N-step student on FRESH paths of a better few-step student
(e.g. the path-tuned student-4: 4 NFE a path instead of the 64-step CFG teacher's 128), drawn from
pure noise on new prompts every update, so nothing can be memorised (the 4224 fixed teacher paths
were: train path error 0.16 -> 0.01, held-out 0.155 -> 0.140). Loss: the N-step student's own
unrolled DDIM end point against the guide's (backprop through all N steps), plus, with weight
STEP_WEIGHT, each student step started on the guide's path against the guide's next state.

    python docs/provenance/self_train.py GUIDE_STUDENT INIT_STUDENT OUT_MODEL_DIR STEPS UPDATES LR [BATCH] [STEP_WEIGHT]

(Kept as it ran from runs/; only the docstring's file references were corrected afterwards.)
"""
import os
import sys
import time

import numpy as np
import torch

from ldm.data.shapes import generate
from ldm.diffusion.param import ddim_step
from ldm.diffusion.samplers import initial_noise, sample_ddim
from ldm.distill.student import GuidedStudent
from ldm.distill.targets import coefficients, two_step_target, x_space_loss
from ldm.pipeline import TextToImage
from ldm.training.ema import EMA

torch.set_num_threads(2)
torch.manual_seed(19)
guide_dir, init, out, steps, updates, lr = sys.argv[1:7]
B = int(sys.argv[7]) if len(sys.argv) > 7 else 32
LAM = float(sys.argv[8]) if len(sys.argv) > 8 else 0.0
steps, updates, lr = int(steps), int(updates), float(lr)
WARMUP = 50
pipe = TextToImage.from_folder("ldm/assets/shapes64")
val = [torch.load(f"runs/traj/{f}") for f in ("00066.pt", "00067.pt")]
guide_net = GuidedStudent.from_pretrained(guide_dir).eval().requires_grad_(False)
guide_steps = int(guide_dir.rstrip("/").split("-")[-1])
guide = pipe.denoiser(guide_net, pipe.index.student_prediction)
g_ts = pipe.schedule.timesteps(guide_steps).float()
ts = pipe.schedule.timesteps(steps).float()
stride = guide_steps // steps
print(f"student-{steps} on fresh student-{guide_steps} paths, {updates} updates, lr {lr}, batch {B}, "
      f"step weight {LAM}", flush=True)

student = GuidedStudent.from_pretrained(init).train()
model = pipe.denoiser(student, pipe.index.student_prediction)
opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda n: min((n + 1) / WARMUP, max(0.0, (updates - n) / max(1, updates - WARMUP))))
ema = EMA(student, 0.999, 0.75)


@torch.no_grad()
def path_error(net) -> float:
    m = pipe.denoiser(net.eval(), pipe.index.student_prediction)
    err = []
    for d in val:
        cond = pipe.encode_prompts(d["prompts"])
        z = sample_ddim(m, d["states"][0], ts, pipe.schedule, extra_args={**cond, "w": d["w"]}, disable=True)
        err.append((z - d["states"][-1]).pow(2).mean().item())
    net.train()
    return sum(err) / len(err)


print(f"held-out path error before: {path_error(student):.5f}", flush=True)
rng = np.random.default_rng(1919)
t0 = time.time()
for n in range(updates):
    prompts = [generate(0, int(i), "train", 64).text for i in rng.integers(0, 30000, B)]
    prompts = ["" if u else p for u, p in zip(rng.random(B) < 0.1, prompts)]   # p_uncond as the stage
    w = torch.from_numpy(rng.uniform(0.0, 4.0, B)).float()
    cond = pipe.encode_prompts(prompts)
    x = initial_noise(pipe.schedule, ts, pipe.latent_shape(B))
    path = []                                        # the guide's states at g_ts[0], ..., g_ts[-1]
    with torch.no_grad():
        path.append(sample_ddim(guide, x, g_ts, pipe.schedule, extra_args={**cond, "w": w}, disable=True,
                                callback=lambda d: path.append(d["x"])))
    z, step_loss = x, 0.0
    for i in range(steps):
        t = ts[i].expand(B)
        a_t, s_t = coefficients(pipe.schedule, t, z)
        a_e, s_e = coefficients(pipe.schedule, ts[i + 1].expand(B), z)
        x_hat = model(z, t, **cond, w=w)
        z = ddim_step(z, x_hat, a_t, s_t, a_e, s_e)
        if LAM and i + 1 < steps:   # the step started on the guide's path (step 0's input is)
            z_on = path[(i + 1) * stride]
            x_on = model(z_on, ts[i + 1].expand(B), **cond, w=w)
            a_n, s_n = coefficients(pipe.schedule, ts[i + 2].expand(B), z)
            target = two_step_target(z_on, path[(i + 2) * stride], a_e, s_e, a_n, s_n)
            step_loss = step_loss + x_space_loss(x_on, target, a_e.flatten(), s_e.flatten()).mean()
    loss = (z - path[-1]).pow(2).flatten(1).mean(1).mean() + LAM * step_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    sched.step()
    ema.update()
    if n % 25 == 0 or n == updates - 1:
        print(f"update {n}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
ema.copy_to(student)
print(f"held-out path error after: {path_error(student):.5f}", flush=True)
student.save_pretrained(os.path.join(out, f"student-{steps}"))
print("saved", os.path.join(out, f"student-{steps}"), flush=True)
