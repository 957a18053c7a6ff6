"""scores.jsonl as a markdown table, each row paired with the raw weights' outcomes (ldm.eval.compare).

    python docs/eval/posthoc-ema/summarize.py docs/eval/posthoc-ema/scores.jsonl
"""
import json
import sys

from ldm.eval.compare import paired

rows = [json.loads(line) for line in open(sys.argv[1])]
raw = next(r for r in rows if r["name"] == "raw")
print("| model | accuracy | one object | two objects | FD | vs teacher (paired, 95% CI, p) | vs raw (paired, 95% CI, p) |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    t, v = r["vs_first"], paired(raw["correct"], r["correct"])
    print(f"| {r['name']} | {100 * r['accuracy']:.1f}% | {100 * r['one_object']:.1f}% | {100 * r['two_object']:.1f}% "
          f"| {r['fd']:.3f} | {100 * t['diff']:+.1f} [{100 * t['ci95'][0]:+.1f}, {100 * t['ci95'][1]:+.1f}] "
          f"p={t['p']:.2g} | {100 * v['diff']:+.1f} [{100 * v['ci95'][0]:+.1f}, {100 * v['ci95'][1]:+.1f}] "
          f"p={v['p']:.2g} |")
