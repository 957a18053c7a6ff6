"""Sample a 2-D Gaussian mixture with its exact denoiser using several samplers; plot and score them.

    python -m ldm.demo_gmm --out gmm.png [--n 4000] [--seed 0]

With the exact E[x0 | x_t] any error left is the sampler's own: the printed component-weight
and component-mean errors (samples assigned to the nearest mean) should be a few 1e-2 or less.
"""
from __future__ import annotations

import argparse
import time

import torch

from .diffusion.gmm import default_mixture
from .diffusion.samplers import SAMPLERS, initial_noise
from .diffusion.schedules import make_schedule

# (label, sampler, schedule name, schedule options, steps, grid spacing, sampler options)
RUNS = [
    ("DDIM 50", "ddim", "cosine", {}, 50, "trailing", {}),
    ("DDPM 1000", "ddpm", "cosine", {}, 1000, "trailing", {}),
    ("Euler 50", "euler", "cosine", {}, 50, "trailing", {}),
    ("Euler 50 (rectified flow)", "euler", "rectified_flow", {}, 50, "trailing", {}),
    ("Heun 18 (VE)", "heun", "ve", {"sigma_min": 0.002, "sigma_max": 80.0}, 18, "linspace", {}),
    ("DPM-Solver++(2M) 20", "dpmpp_2m", "cosine", {}, 20, "trailing", {}),
    ("PC 100", "pc", "cosine", {}, 100, "trailing", {"snr": 0.16}),
    ("Langevin (VE)", "langevin", "ve", {"sigma_min": 0.01, "sigma_max": 5.0}, 30, "linspace",
     {"n_steps": 20, "step_lr": 1e-5}),
]


def run(n: int, seed: int):
    """Yield (label, samples, weight error, mean error, seconds) per sampler."""
    mixture = default_mixture()
    for label, sampler, sched_name, sched_opts, steps, spacing, opts in RUNS:
        schedule = make_schedule(sched_name, **sched_opts)
        ts = schedule.timesteps(steps, spacing=spacing)
        gen = torch.Generator().manual_seed(seed)
        x = initial_noise(schedule, ts, (n, 2), generator=gen, dtype=torch.float64)
        start = time.perf_counter()
        x = SAMPLERS[sampler](mixture.model(schedule), x, ts, schedule, disable=True, generator=gen, **opts)
        w_err, m_err = mixture.errors(x)
        yield label, x, w_err, m_err, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gmm.png", help="PNG file for the scatter plots")
    parser.add_argument("--n", type=int, default=4000, help="samples per sampler")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # (n, 2) tensors: thread start-up costs more than it saves

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixture = default_mixture()
    data = mixture.sample(args.n, generator=torch.Generator().manual_seed(args.seed))
    results = [("data", data, *mixture.errors(data), 0.0)] + list(run(args.n, args.seed))
    cols = 4
    rows = -(-len(results) // cols)                      # ceil: every run gets a panel
    fig, axes = plt.subplots(rows, cols, figsize=(16, 4 * rows), sharex=True, sharey=True)
    print(f"{'sampler':<28}{'max |weight err|':>18}{'max |mean err|':>16}{'seconds':>9}")
    for ax, (label, x, w_err, m_err, secs) in zip(axes.flat, results):
        print(f"{label:<28}{w_err:>18.4f}{m_err:>16.4f}{secs:>9.2f}")
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3)
        ax.scatter(mixture.means[:, 0], mixture.means[:, 1], marker="x", color="red")
        ax.set_title(f"{label}\nweight err {w_err:.3f}, mean err {m_err:.3f}", fontsize=9)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
