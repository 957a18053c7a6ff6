"""Throw-away driver (session 19): distribution-matching fine-tuning (Yin et al. 2024, DMD) of the 2-step student,
anchored by a regression on the CFG teacher's paths.

The generator is the N-step student's own unrolled DDIM sampler G(z, c, w). Per update:
  - DMD: x = G(z) on fresh noise and training prompts; noised to t ~ U[0.02, 0.98]; the gradient
    (x0_fake - x0_real) / mean|x - x0_real| (DMD eq. 7-8: the score difference in x0 units, with
    its normalisation) pushes x towards where the real (guided teacher) density is higher than the
    generator's own. real = the stage-one student (one network reproducing the CFG teacher at w);
    fake = a copy of it, trained online on G's samples with the diffusion loss.
  - regression: ||G(z_path) - teacher_end||^2 on the teacher's 64-step paths (DMD's paired term).

    python docs/provenance/dmd_train.py STAGE_ONE INIT_STUDENT OUT_PREFIX STEPS UPDATES LR_G LR_FAKE LAMBDA_REG [B]

(Kept as it ran from runs/; only the docstring's file references were corrected afterwards.)
"""
import copy
import os
import sys
import time

import numpy as np
import torch

from ldm.data.shapes import generate
from ldm.diffusion.param import ddim_step
from ldm.diffusion.samplers import initial_noise, sample_ddim
from ldm.distill.student import GuidedStudent
from ldm.distill.targets import coefficients, x_space_loss
from ldm.pipeline import TextToImage

torch.set_num_threads(2)
torch.manual_seed(19)
stage_one, init, out, steps, updates, lr_g, lr_f, lam = sys.argv[1:9]
B = int(sys.argv[9]) if len(sys.argv) > 9 else 32
steps, updates, lr_g, lr_f, lam = int(steps), int(updates), float(lr_g), float(lr_f), float(lam)
pipe = TextToImage.from_folder("ldm/assets/shapes64")
den = lambda net: pipe.denoiser(net, pipe.index.student_prediction)   # noqa: E731
files = sorted(f for f in os.listdir("runs/traj") if f.endswith(".pt"))
data = [torch.load(f"runs/traj/{f}") for f in files[:-2]]
val = [torch.load(f"runs/traj/{f}") for f in files[-2:]]
P_states = torch.cat([d["states"] for d in data], dim=1)
P_prompts = [p for d in data for p in d["prompts"]]
P_w = torch.cat([d["w"] for d in data])
ts = pipe.schedule.timesteps(steps).float()

real_net = GuidedStudent.from_pretrained(stage_one).eval().requires_grad_(False)
fake_net = GuidedStudent.from_pretrained(stage_one).train()
student = GuidedStudent.from_pretrained(init).train()
real, fake, model = den(real_net), den(fake_net), den(student)
opt_g = torch.optim.AdamW(student.parameters(), lr=lr_g, weight_decay=0.0)
opt_f = torch.optim.AdamW(fake_net.parameters(), lr=lr_f, weight_decay=0.0)
print(f"DMD student-{steps}: {updates} updates, lr G {lr_g} fake {lr_f}, reg {lam}, batch {B}", flush=True)


def generator(z, cond, w):
    for i in range(steps):
        t = ts[i].expand(z.shape[0])
        a_t, s_t = coefficients(pipe.schedule, t, z)
        a_e, s_e = coefficients(pipe.schedule, ts[i + 1].expand(z.shape[0]), z)
        z = ddim_step(z, model(z, t, **cond, w=w), a_t, s_t, a_e, s_e)
    return z


@torch.no_grad()
def path_error() -> float:
    student.eval()
    err = []
    for d in val:
        cond = pipe.encode_prompts(d["prompts"])
        z = sample_ddim(model, d["states"][0], ts, pipe.schedule, extra_args={**cond, "w": d["w"]}, disable=True)
        err.append((z - d["states"][-1]).pow(2).mean().item())
    student.train()
    return sum(err) / len(err)


def save(n):
    folder = f"{out}-{n}"
    student.save_pretrained(os.path.join(folder, f"student-{steps}"))
    for part in ("autoencoder", "text_encoder", "unet"):
        if not os.path.exists(os.path.join(folder, part)):
            os.symlink(os.path.abspath(f"ldm/assets/shapes64/{part}"), os.path.join(folder, part))
    idx = open("runs/model-traj2/model_index.json").read()
    open(os.path.join(folder, "model_index.json"), "w").write(idx)
    print(f"saved {folder}; held-out path error {path_error():.5f}", flush=True)


print(f"held-out path error before: {path_error():.5f}", flush=True)
rng = np.random.default_rng(1919)
t0 = time.time()
for n in range(1, updates + 1):
    prompts = [generate(0, int(i), "train", 64).text for i in rng.integers(0, 30000, B)]
    prompts = ["" if u else p for u, p in zip(rng.random(B) < 0.1, prompts)]
    w = torch.from_numpy(rng.uniform(0.0, 4.0, B)).float()
    cond = pipe.encode_prompts(prompts)
    x = generator(initial_noise(pipe.schedule, ts, pipe.latent_shape(B)), cond, w)
    # DMD gradient at a random noise level
    t = 0.02 + 0.96 * torch.rand(B)
    a, s = coefficients(pipe.schedule, t, x)
    with torch.no_grad():
        x_t = a * x + s * torch.randn_like(x)
        mu_real, mu_fake = real(x_t, t, **cond, w=w), fake(x_t, t, **cond, w=w)
        norm = (x - mu_real).abs().flatten(1).mean(1).view(-1, 1, 1, 1).clamp(min=1e-4)
        grad = torch.nan_to_num((mu_fake - mu_real) / norm)
    loss_dmd = 0.5 * (x - (x - grad).detach()).pow(2).mean()
    # regression on the teacher's paths
    k = torch.randint(0, P_states.shape[1], (B // 2,))
    z_end = generator(P_states[0, k], pipe.encode_prompts([P_prompts[j] for j in k.tolist()]), P_w[k])
    loss_reg = (z_end - P_states[-1, k]).pow(2).mean()
    loss = loss_dmd + lam * loss_reg
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt_g.step()
    # fake score: the diffusion loss on the generator's (detached) samples
    x = x.detach()
    t = torch.rand(B)
    a, s = coefficients(pipe.schedule, t, x)
    x_t = a * x + s * torch.randn_like(x)
    loss_f = x_space_loss(fake(x_t, t, **cond, w=w), x, a.flatten(), s.flatten()).mean()
    opt_f.zero_grad(set_to_none=True)
    loss_f.backward()
    torch.nn.utils.clip_grad_norm_(fake_net.parameters(), 1.0)
    opt_f.step()
    if n % 25 == 0:
        print(f"update {n}: dmd {loss_dmd.item():.5f} reg {loss_reg.item():.4f} fake {loss_f.item():.4f} "
              f"|grad| {grad.abs().mean().item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    if n % 250 == 0:
        save(n)
