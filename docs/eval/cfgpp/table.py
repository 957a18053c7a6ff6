"""The rows of docs/eval/cfgpp/*.jsonl as one markdown table, each paired with its plain sampler at w = 2 and 0.5.

    python docs/eval/cfgpp/table.py docs/eval/cfgpp/steps*.jsonl

Pairing: ldm.eval.compare.paired (B - A in points, 95% CI, exact McNemar p) against the plain sampler of the same
family (euler for euler_cfg_pp, dpmpp_2m for dpmpp_2m_cfg_pp) at w = 2 (the model's) and at w = 0.5 (plain CFG's
best accuracy at 16 steps), the same steps; a run repeated in two
files (the w = 2 baselines, deterministic) is shown once.
"""
import json
import sys

from ldm.eval.compare import paired

rows = {}
for path in sys.argv[1:]:
    for line in open(path):
        r = json.loads(line)
        key = (r["steps"], r["sampler"], r["w"])
        if key in rows and rows[key]["correct"] != r["correct"]:
            raise SystemExit(f"{key}: two runs disagree")
        rows[key] = r
family = {"euler": "euler", "euler_cfg_pp": "euler", "dpmpp_2m": "dpmpp_2m", "dpmpp_2m_cfg_pp": "dpmpp_2m"}
print("| steps | sampler | w | lambda = 1 + w | NFE | accuracy | FD | vs plain w = 2 (paired, points) | vs plain w = 0.5 |")
print("|---|---|---|---|---|---|---|---|---|")


def versus(r, w):
    base = rows.get((r["steps"], family[r["sampler"]], w))
    if base is None or base is r:
        return ""
    p = paired(base["correct"], r["correct"])
    return f"{100 * p['diff']:+.1f} [{100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f}], p {p['p']:.2g}"



for key in sorted(rows, key=lambda k: (k[0], family[k[1]], k[1] != family[k[1]], k[2])):
    r = rows[key]
    lam = f"{1 + r['w']:g}" if r["sampler"].endswith("cfg_pp") else ""
    print(f"| {r['steps']} | {r['sampler']} | {r['w']:g} | {lam} | {r['nfe']} | {100 * r['accuracy']:.1f}% | "
          f"{r['fd']:.2f} | {versus(r, 2.0)} | {versus(r, 0.5)} |")
