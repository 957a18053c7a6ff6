"""Pairs the 100-prompt runs of docs/eval/pag with the first 100 prompts of the shipped 500-prompt report
(docs/eval/shapes64, 2 threads): `ldm.eval report --n 100` draws the same first 100 prompts with the same per-batch
seeds, so the per-prompt outcomes pair (ldm.eval.compare.paired). Also says how many of the first 100 the rerun
plain CFG (1 thread) judged alike. python docs/eval/pag/shipped_pairs.py > docs/eval/pag/shipped_pairs.md"""
import json

from ldm.eval.compare import format_comparisons, load_runs, paired

N = 100
_, shipped = load_runs("docs/eval/shapes64/report.json")
rows = []
for name_a, file_b, name_b in (("teacher-64-w2", "docs/eval/pag/cfg-w2", "teacher-64-w2"),
                               ("teacher-64-w2", "docs/eval/pag/pag-w2-s3-up1", "teacher-64-w2"),
                               ("teacher-64-w2", "docs/eval/pag/pag-w0-s3-up1", "teacher-64-w0"),
                               ("teacher-64-w0", "docs/eval/pag/pag-w0-s3-up1", "teacher-64-w0"),
                               ("teacher-64-w2", "docs/eval/pag/pag-w2-s3-mid", "teacher-64-w2"),
                               ("teacher-64-w2", "docs/eval/pag/pag-w2-s1-up1", "teacher-64-w2")):
    _, runs = load_runs(file_b)
    a, b = shipped[name_a]["correct"][:N], runs[name_b]["correct"]
    rows.append({"run_a": f"shapes64 (first {N}):{name_a}", "run_b": f"{file_b}:{name_b}", **paired(a, b)})
print(format_comparisons(rows))
print()
print(json.dumps(rows, indent=1))
