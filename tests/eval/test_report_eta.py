"""`python -m ldm.eval report --teacher-eta E`: the teacher's sampler noise (DDIM's eta, TCD's gamma)."""
import pytest

from ldm.eval.__main__ import main

from tests.tiny_models import random_model_with_student


def test_report_teacher_eta_reaches_the_teacher_only(tmp_path, one_thread):
    """--teacher-sampler tcd --teacher-eta E: the teacher's images follow E (1 is the lcm sampler's), the students
    keep theirs, and the report records E."""
    from ldm.eval.report import make_report

    model = tmp_path / "tiny"
    random_model_with_student(model)

    def grids(name, **kw):
        report = make_report(model, tmp_path / name, n=4, teacher_steps=(2,), student_steps=(2,), ws=(0,),
                             guidance=0.0, device="cpu", student_sweep=0, **kw)
        return report, [(tmp_path / name / row["grid"]).read_bytes() for row in report["rows"]]

    default, default_grids = grids("default", teacher_sampler="tcd")
    zero, zero_grids = grids("zero", teacher_sampler="tcd", teacher_eta=0.0)
    _, one_grids = grids("one", teacher_sampler="tcd", teacher_eta=1.0)
    _, lcm_grids = grids("lcm", teacher_sampler="lcm")
    assert [r["model"] for r in zero["rows"]] == ["teacher", "student-2"]
    assert zero_grids[0] != default_grids[0] and zero_grids[1] == default_grids[1]     # the teacher's only
    assert one_grids == lcm_grids
    assert default["teacher_eta"] is None and zero["teacher_eta"] == 0.0
    assert "tcd for the teacher at eta 0," in (tmp_path / "zero" / "report.md").read_text()


@pytest.mark.parametrize("extra,message", [
    (["--teacher-sampler", "euler", "--teacher-eta", "0.5"], "--teacher-eta is the noise of --teacher-sampler ddim, tcd"),
    (["--teacher-sampler", "tcd", "--teacher-eta", "2"], "--teacher-eta must be in [0, 1], got 2.0"),
])
def test_report_refuses_a_teacher_eta_without_its_sampler_or_range(tmp_path, capsys, extra, message):
    from ldm.pipeline import save_random_model

    save_random_model(str(tmp_path / "tiny"))
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--model", str(tmp_path / "tiny"), "--n", "2", *extra])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
