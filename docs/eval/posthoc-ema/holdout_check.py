"""Reconstruction on real weights: rebuild each tracked EMA at STEP from the other profile's snapshots alone.

    python docs/eval/posthoc-ema/holdout_check.py RUN [STEP]

A run tracks two sigma_rels; rebuilding one of them at STEP (default the last) from every snapshot of the other
(steps <= STEP) is a post-hoc EMA whose true value was tracked directly. The error is given in units of the gap
between the two tracked EMAs at STEP (how far apart the two averages are), beside the profile's relative L2 error.
"""
import json
import sys
from pathlib import Path

import torch

from ldm.training.posthoc_ema import combine, list_snapshots, solve_weights


def distance(a: dict, b: dict) -> float:
    return torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)).item()


run = Path(sys.argv[1])
snapshots = list_snapshots(run)
step = int(sys.argv[2]) if len(sys.argv) > 2 else snapshots[-1].step
at = [s for s in snapshots if s.step == step]
stored = {s.sigma_rel: combine([s], [1.0]) for s in at}
gap = distance(*list(stored.values())[:2])
for held in at:
    used = [s for s in snapshots if s.step <= step and s.sigma_rel != held.sigma_rel]
    x, err = solve_weights([s.updates for s in used], [s.gamma for s in used], held.updates, held.gamma)
    diff = distance(combine(used, x), stored[held.sigma_rel])
    print(json.dumps({"target": held.path.name, "from_sigma_rel": used[0].sigma_rel, "snapshots_used": len(used),
                      "profile_relative_error": err, "weight_l2_error": diff, "gap_between_tracked_emas": gap,
                      "error_over_gap": diff / gap}))
