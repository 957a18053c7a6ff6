"""Throw-away driver (session 18): fine-tune an N-step student so that each of its DDIM steps lands
where the CFG teacher's 64-step DDIM path (traj_gen.py) lands, not where its round teacher's two
steps do: a target past the chain's ceiling (the previous student's own N-step quality).

    python docs/provenance/traj_train.py TRAJ_DIR INIT_STUDENT OUT_MODEL_DIR STEPS UPDATES LR

(Kept as it ran from runs/; only the docstring's file references were corrected afterwards.)
"""
import os
import sys
import time

import torch

from ldm.diffusion.samplers import sample_ddim
from ldm.distill.student import GuidedStudent
from ldm.distill.targets import coefficients, two_step_target, x_space_loss
from ldm.pipeline import TextToImage
from ldm.training.ema import EMA

torch.set_num_threads(2)
torch.manual_seed(18)
traj_dir, init, out, steps, updates, lr = sys.argv[1:7]
steps, updates, lr = int(steps), int(updates), float(lr)
B, KEEP, WARMUP = 64, 8, 50
pipe = TextToImage.from_folder("ldm/assets/shapes64")
files = sorted(f for f in os.listdir(traj_dir) if f.endswith(".pt"))
val_files, files = files[-2:], files[:-2]                          # two batches held out
data = [torch.load(os.path.join(traj_dir, f)) for f in files]
val = [torch.load(os.path.join(traj_dir, f)) for f in val_files]
states = torch.cat([d["states"] for d in data], dim=1)          # (KEEP + 1, T, C, h, w)
prompts = [p for d in data for p in d["prompts"]]
ws = torch.cat([d["w"] for d in data])
T = states.shape[1]
print(f"{T} teacher paths from {len(files)} files; student-{steps}, {updates} updates, lr {lr}", flush=True)
ts = pipe.schedule.timesteps(steps).float()                      # (steps + 1,)
stride = KEEP // steps

student = GuidedStudent.from_pretrained(init).train()
model = pipe.denoiser(student, pipe.index.student_prediction)
opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda n: min((n + 1) / WARMUP, max(0.0, (updates - n) / max(1, updates - WARMUP))))
ema = EMA(student, 0.999, 0.75)


@torch.no_grad()
def path_error(net) -> float:
    """Mean squared distance of the student's N-step DDIM end point to the teacher's 64-step one."""
    m = pipe.denoiser(net.eval(), pipe.index.student_prediction)
    err = []
    for d in val:
        cond = pipe.encode_prompts(d["prompts"])
        z = sample_ddim(m, d["states"][0], ts, pipe.schedule, extra_args={**cond, "w": d["w"]}, disable=True)
        err.append((z - d["states"][-1]).pow(2).mean().item())
    net.train()
    return sum(err) / len(err)


print(f"held-out path error before: {path_error(student):.5f}", flush=True)
t0 = time.time()
for n in range(updates):
    idx = torch.randint(0, T, (B,))
    i = torch.randint(0, steps, (B,))                           # the student's step
    z_t = states[i * stride, idx]
    z_end = states[(i + 1) * stride, idx]
    t, t_end = ts[i], ts[i + 1]
    a_t, s_t = coefficients(pipe.schedule, t, z_t)
    a_e, s_e = coefficients(pipe.schedule, t_end, z_t)
    target = two_step_target(z_t, z_end, a_t, s_t, a_e, s_e)
    cond = pipe.encode_prompts([prompts[k] for k in idx.tolist()])
    x_hat = model(z_t, t, **cond, w=ws[idx])
    loss = x_space_loss(x_hat, target, a_t.flatten(), s_t.flatten()).mean()
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
