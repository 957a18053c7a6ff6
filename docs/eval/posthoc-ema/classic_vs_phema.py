"""The classic EMA (ldm/training/ema.py, warmup power) as a post-hoc EMA: its profile's sigma_rel, and the distance
of its weights to the post-hoc EMA rebuilt at that sigma_rel, against the distances to the other averages.

    python docs/eval/posthoc-ema/classic_vs_phema.py RUN STEP DECAY POWER
"""
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from ldm.training.posthoc_ema import combine, list_snapshots, plan

run, step, decay, power = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
# update n (0-based) folds in theta_(n+1) with 1 - d_n; later updates scale it by their d
d = np.array([min(decay, 1 - (1 + n) ** -power) if power else decay for n in range(step)])
w = (1 - d) * np.append(np.cumprod(d[::-1])[::-1][1:], 1.0)
s = np.arange(1, step + 1)
mean = (w * s).sum() / w.sum()
sigma_rel = float(np.sqrt((w * (s - mean) ** 2).sum() / w.sum()) / step)

checkpoint = run / f"checkpoint-{step:06d}"
classic, raw = load_file(str(checkpoint / "ema.safetensors")), load_file(str(checkpoint / "model.safetensors"))
snapshots = list_snapshots(run)


def distance(a, b):
    return float(np.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in a)))


row = {"step": step, "classic_weights_sum": float(w.sum()), "classic_sigma_rel": sigma_rel, "distance_to_classic": {}}
for target in [round(sigma_rel, 4), 0.05, 0.10, 0.25]:
    used, x, err, _ = plan(snapshots, sigma_rel=target, step=step)
    row["distance_to_classic"][f"phema-{target}"] = {"distance": distance(combine(used, x), classic),
                                                      "profile_error": err}
row["distance_to_classic"]["raw"] = {"distance": distance(raw, classic)}
print(json.dumps(row, indent=2))
