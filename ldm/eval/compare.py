"""`python -m ldm.eval compare`: is one run's prompt accuracy really above another's? A paired test.

Every report run samples the same held-out prompts (`--n`, `--seed`), so two runs, of one report or
of two reports made with the same --n and --seed, are judged prompt by prompt. Most prompts come out
the same in both; only the discordant ones (right in one run, wrong in the other) carry the
difference. At 85% accuracy on 500 prompts one run's accuracy has a binomial standard error of 1.6
points and the difference of two independent runs 2.3; the paired one is about sqrt(discordant) / n,
1.4 points when a tenth of the prompts disagree, less when fewer do.

For prompts i = 1..n with outcomes a_i, b_i in {0, 1}, with n10 prompts right in A only and n01 in
B only:
    difference  d = (n01 - n10) / n                                   (B - A)
    paired SE   se = sqrt(n10 + n01 - (n01 - n10)^2 / n) / n          (the sample variance of b_i - a_i)
    95% CI      d +- 1.96 se                                          (normal approximation)
    p-value     McNemar's exact test: two-sided binomial test of n01 against Bin(n10 + n01, 1/2).
Reports written before per-prompt outcomes were stored ("correct" in each row) cannot be paired.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def mcnemar_exact(n10: int, n01: int) -> float:
    """Two-sided exact McNemar p-value: P(|X - m/2| >= |n01 - m/2|), X ~ Bin(m = n10 + n01, 1/2)."""
    m = n10 + n01
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(n10, n01) + 1))   # exact integers: no underflow
    return min(1.0, 2 * tail / 2 ** m)


def paired(a: str, b: str) -> dict:
    """Paired accuracy difference (B - A) of two per-prompt outcome strings ("1", "0", "-" = no ask)."""
    if len(a) != len(b):
        raise ValueError(f"the runs judged {len(a)} and {len(b)} prompts: not the same prompts")
    pairs = [(x == "1", y == "1") for x, y in zip(a, b) if x != "-" and y != "-"]
    n = len(pairs)
    if n == 0:
        raise ValueError("no prompt asks for anything in both runs")
    n10 = sum(x and not y for x, y in pairs)
    n01 = sum(y and not x for x, y in pairs)
    diff = (n01 - n10) / n
    se = math.sqrt(max(n10 + n01 - (n01 - n10) ** 2 / n, 0.0)) / n
    return {"n": n, "acc_a": sum(x for x, _ in pairs) / n, "acc_b": sum(y for _, y in pairs) / n,
            "diff": diff, "se": se, "ci95": [diff - Z95 * se, diff + Z95 * se],
            "a_only": n10, "b_only": n01, "p": mcnemar_exact(n10, n01)}


def load_runs(path: str | Path) -> tuple[dict, dict[str, dict]]:
    """(report.json, {run name: row}) over its table and both guidance sweeps; names are report.py's
    Run.name (teacher-64-w2, student-4-w2), as its sample grids are named."""
    from ldm.eval.report import Run  # here, not at the top: report.py imports `paired` from this module
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    report = json.loads(path.read_text())
    rows = list(report.get("rows", []))
    for sweep in (report.get("sweep"), report.get("student_sweep")):
        rows += sweep["rows"] if sweep else []
    runs = {Run(row["model"], row["steps"], row["guidance"]).name: row for row in rows}
    return report, runs


def parse_spec(spec: str) -> tuple[str, str | None]:
    """"FILE" or "FILE:RUN" (FILE a report.json or its folder) -> (FILE, RUN or None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail and not Path(spec).exists():
        return head, tail
    return spec, None


def compare(spec_a: str, spec_b: str) -> list[dict]:
    """Paired comparisons: the two named runs, or every run the two reports share."""
    (file_a, run_a), (file_b, run_b) = parse_spec(spec_a), parse_spec(spec_b)
    if (run_a is None) != (run_b is None):
        raise ValueError("name a run on both sides (FILE:RUN FILE:RUN) or on neither")
    (rep_a, runs_a), (rep_b, runs_b) = load_runs(file_a), load_runs(file_b)
    for key in ("n", "seed"):
        if rep_a.get(key) != rep_b.get(key):
            raise ValueError(f"the reports drew different prompts: {key} = {rep_a.get(key)} in {file_a}, "
                             f"{rep_b.get(key)} in {file_b}")
    if run_a is None:
        names = [name for name in runs_a if name in runs_b]
        if not names:
            raise ValueError(f"{file_a} and {file_b} share no run; name one on each side (FILE:RUN)")
        pairs = [(name, name) for name in names]
    else:
        for run, runs, file in ((run_a, runs_a, file_a), (run_b, runs_b, file_b)):
            if run not in runs:
                raise ValueError(f"no run {run!r} in {file}; it has {', '.join(runs)}")
        pairs = [(run_a, run_b)]
    out = []
    for name_a, name_b in pairs:
        row_a, row_b = runs_a[name_a], runs_b[name_b]
        for row, file in ((row_a, file_a), (row_b, file_b)):
            if "correct" not in row:
                raise ValueError(f"{file} has no per-prompt outcomes (written before they were stored): "
                                 "run its report again")
        out.append({"run_a": f"{file_a}:{name_a}", "run_b": f"{file_b}:{name_b}",
                    **paired(row_a["correct"], row_b["correct"])})
    return out


def format_comparisons(results: list[dict]) -> str:
    lines = ["| A | B | A accuracy | B accuracy | B - A | 95% CI | right in A only / B only | p (McNemar) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lo, hi = (100 * x for x in r["ci95"])
        lines.append(f"| {r['run_a']} | {r['run_b']} | {100 * r['acc_a']:.1f}% | {100 * r['acc_b']:.1f}% | "
                     f"{100 * r['diff']:+.1f} points | [{lo:+.1f}, {hi:+.1f}] | {r['a_only']} / {r['b_only']} | "
                     f"{r['p']:.3g} |")
    return "\n".join(lines)
