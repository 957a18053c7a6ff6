"""Paired comparisons (ldm.eval.compare.paired: per-prompt, McNemar's exact p) of the runs in scores.jsonl.

    python docs/eval/huber-loss/summarize.py docs/eval/huber-loss/scores.jsonl
"""
import json
import sys

from ldm.eval.compare import paired

runs = {r["model"]: r for r in map(json.loads, open(sys.argv[1])) if "model" in r}
name = {m: m.split("/")[1].removeprefix("huber-ft-") if m.startswith("runs/") else "teacher" for m in runs}
print(f"{'run':<22} {'acc':>6} {'one':>6} {'two':>6} {'FD':>6}")
for m, r in runs.items():
    print(f"{name[m]:<22} {r['accuracy']:6.3f} {r['one_object']:6.3f} {r['two_object']:6.3f} {r['fd']:6.2f}")
by = {v: k for k, v in name.items()}
PAIRS = [("teacher", "clean-l2"), ("clean-l2", "corrupt-l2"), ("clean-huber", "corrupt-huber"),
         ("clean-l2", "clean-huber"), ("corrupt-l2", "corrupt-huber"), ("corrupt-l2", "corrupt-huber-c0.5"),
         ("corrupt-huber", "corrupt-huber-c0.5")]
for a, b in PAIRS:
    if a in by and b in by:
        vs = paired(runs[by[a]]["correct"], runs[by[b]]["correct"])
        print(json.dumps(dict(a=a, b=b, diff=round(vs["diff"], 3), ci95=[round(x, 3) for x in vs["ci95"]],
                              p=float(f"{vs['p']:.2g}"), a_only=vs["a_only"], b_only=vs["b_only"])))
