"""`python -m ldm.eval compare`: the paired test against scipy's binomial test and numpy's moments,
and the command on report.json files (run names, mismatched prompts, reports without outcomes)."""
import json
import math

import numpy as np
import pytest

from ldm.eval.__main__ import main
from ldm.eval.compare import compare, mcnemar_exact, paired, parse_spec


@pytest.mark.parametrize("n10, n01", [(0, 0), (0, 5), (3, 3), (7, 19), (40, 25), (120, 80)])
def test_mcnemar_exact_is_the_two_sided_binomial_test(n10, n01):
    stats = pytest.importorskip("scipy.stats")
    expected = 1.0 if n10 + n01 == 0 else stats.binomtest(n01, n10 + n01, 0.5).pvalue
    assert mcnemar_exact(n10, n01) == pytest.approx(expected, rel=1e-9)
    assert mcnemar_exact(n10, n01) == mcnemar_exact(n01, n10)


def test_mcnemar_exact_closed_form():
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)          # both tails of 5 heads in 5
    assert mcnemar_exact(1, 3) == pytest.approx(10 / 16)         # 2 * (C(4,0) + C(4,1)) / 2^4
    assert mcnemar_exact(2, 2) == 1.0                             # 2 * 11 / 16 > 1: capped


def text(outcomes) -> str:
    return "".join("1" if v else "0" for v in outcomes)


def test_paired_difference_matches_numpy():
    rng = np.random.default_rng(0)
    a = rng.random(500) < 0.85
    b = np.where(rng.random(500) < 0.9, a, ~a)                    # 10% of prompts flip
    r = paired(text(a), text(b))
    d = b.astype(float) - a.astype(float)
    assert r["n"] == 500 and r["acc_a"] == pytest.approx(a.mean()) and r["acc_b"] == pytest.approx(b.mean())
    assert r["diff"] == pytest.approx(d.mean())
    assert r["se"] == pytest.approx(d.std() / math.sqrt(500))    # population variance of b_i - a_i
    assert r["ci95"][0] == pytest.approx(d.mean() - 1.959964 * r["se"], abs=1e-6)
    assert r["a_only"] == int((a & ~b).sum()) and r["b_only"] == int((b & ~a).sum())
    # the paired SE is well under the unpaired one, the point of pairing
    unpaired = math.sqrt(a.var() / 500 + b.var() / 500)
    assert r["se"] < 0.8 * unpaired


def test_paired_skips_prompts_without_asks_and_checks_lengths():
    r = paired("1-10", "11-1")
    assert r["n"] == 2 and r["acc_a"] == 0.5 and r["acc_b"] == 1.0 and (r["a_only"], r["b_only"]) == (0, 1)
    with pytest.raises(ValueError, match="not the same prompts"):
        paired("101", "10")


def test_accuracy_goal_states_the_paired_interval():
    from ldm.eval.report import accuracy_goal
    teacher, student = row("teacher", 64, 2.0, "1" * 10), row("student-4", 4, 2.0, "1" * 8 + "00")
    met, detail = accuracy_goal(student, teacher, 2.0)
    # d = -0.2, se = sqrt(2 - 4 / 10) / 10, 1.96 se = 0.248: [-44.8, +4.8] points
    assert not met and detail == "80.0% vs 100.0% (-20.0 points, paired 95% CI [-44.8, +4.8])"
    del student["correct"]                                          # an old row: no interval
    assert accuracy_goal(student, teacher, 25.0) == (True, "80.0% vs 100.0% (-20.0 points)")


def write_report(path, rows, n=4, seed=0, sweep=None):
    path.mkdir(parents=True, exist_ok=True)
    report = {"n": n, "seed": seed, "rows": rows, "sweep": sweep, "student_sweep": None}
    (path / "report.json").write_text(json.dumps(report))
    return path


def row(model, steps, w, correct):
    return {"model": model, "steps": steps, "guidance": w, "accuracy": correct.count("1") / len(correct),
            "correct": correct}


def test_compare_reports_by_shared_runs_and_by_name(tmp_path):
    a = write_report(tmp_path / "a", [row("teacher", 8, 2.0, "1101"), row("student-4", 4, 2.0, "1001")],
                     sweep={"steps": 8, "rows": [row("teacher", 8, 0.0, "0001")]})
    b = write_report(tmp_path / "b", [row("student-4", 4, 2.0, "1111")])
    (shared,) = compare(str(a), str(b / "report.json"))
    assert shared["run_a"].endswith(":student-4-w2") and (shared["acc_a"], shared["acc_b"]) == (0.5, 1.0)
    (named,) = compare(f"{a}:teacher-8-w0", f"{b}:student-4-w2")   # a sweep row is a run too
    assert (named["a_only"], named["b_only"], named["diff"]) == (0, 3, 0.75)


def test_compare_errors_name_the_problem(tmp_path):
    a = write_report(tmp_path / "a", [row("student-4", 4, 2.0, "1001")])
    with pytest.raises(ValueError, match="different prompts: n = 4 .* 5"):
        compare(str(a), str(write_report(tmp_path / "n5", [row("student-4", 4, 2.0, "10011")], n=5)))
    with pytest.raises(ValueError, match="no run 'student-8-w2' .* it has student-4-w2"):
        compare(f"{a}:student-8-w2", f"{a}:student-4-w2")
    with pytest.raises(ValueError, match="on both sides"):
        compare(f"{a}:student-4-w2", str(a))
    old = write_report(tmp_path / "old", [{"model": "student-4", "steps": 4, "guidance": 2.0, "accuracy": 0.5}])
    with pytest.raises(ValueError, match="no per-prompt outcomes .* run its report again"):
        compare(str(old), str(a))


def test_parse_spec_keeps_paths_with_colons(tmp_path):
    odd = tmp_path / "x:y"
    odd.mkdir()
    assert parse_spec(str(odd)) == (str(odd), None)
    assert parse_spec(f"{odd}:student-4-w2") == (str(odd), "student-4-w2")


def test_compare_cli_prints_the_table_and_exits_2_on_errors(tmp_path, capsys):
    a = write_report(tmp_path / "a", [row("student-4", 4, 2.0, "0000")])
    b = write_report(tmp_path / "b", [row("student-4", 4, 2.0, "1111")])
    main(["compare", str(a), str(b), "--out", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert "| 0.0% | 100.0% | +100.0 points |" in out and "| 0 / 4 | 0.125 |" in out
    assert json.loads((tmp_path / "c.json").read_text())[0]["b_only"] == 4
    with pytest.raises(SystemExit) as exit_:
        main(["compare", str(a), str(tmp_path / "missing")])
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err
