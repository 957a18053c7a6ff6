"""`python -m ldm.eval score` on real held-out shapes (accuracy ~1, FD ~0 next to noise) and
`python -m ldm.eval report` as a smoke test on a tiny random model folder with one student."""
import json

import numpy as np
import pytest
from PIL import Image

from ldm.data.captions import parse_caption
from ldm.data.shapes import generate, render
from ldm.eval.__main__ import main
from ldm.eval.metrics import heldout_prompts
from ldm.eval.score import heldout_samples

from tests.tiny_models import random_model_with_student

N = 64     # held-out images per folder: FD's finite-sample bias (~6 here) stays far below noise's (~200)
SEED = 1   # the images' held-out seed; the CLI's FD reference uses seed 0, other scenes


def write_folder(folder, images, prompts, blank_after=None):
    """Images as txt2img --from-file names them; a blank line after `blank_after` shifts the numbering."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for image, prompt in zip(images, prompts):
        lines.append(prompt)
        Image.fromarray(image).save(folder / f"{len(lines) - 1:04d}.png")
        if len(lines) - 1 == blank_after:
            lines.append("")
    (folder / "prompts.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def real():
    """N held-out samples straight from the generator: images (N, 64, 64, 3) uint8 and captions."""
    samples = [generate(SEED, i, "heldout") for i in range(N)]
    return np.stack([render(s.scene) for s in samples]), [s.text for s in samples]


def score(folder, capsys, *extra):
    out = folder / "result.json"
    main(["score", "--images", str(folder), "--prompts", str(folder / "prompts.txt"), "--out", str(out), *extra])
    return json.loads(out.read_text()), capsys.readouterr().out


def test_score_real_images_are_right_and_close_to_the_real_reference(real, tmp_path, capsys, one_thread):
    images, prompts = real
    result, printed = score(write_folder(tmp_path / "real", images, prompts, blank_after=5), capsys)
    assert result["accuracy"] >= 0.99
    assert result["one_object"] >= 0.99 and result["two_object"] >= 0.99
    # counts from the captions themselves
    asked = [parse_caption(p) for p in prompts]
    n_objects = [len(a["objects"]) for a in asked]
    assert result["counts"] == {"all": N, "one_object": n_objects.count(1), "two_object": n_objects.count(2)}
    attrs = result["per_attribute"]
    assert attrs["colour"]["n"] == attrs["shape"]["n"] == sum(n_objects)
    assert attrs["count"]["n"] == N
    assert attrs["relation"]["n"] == n_objects.count(2)
    assert attrs["background"]["n"] == sum(a["background"] is not None for a in asked)
    assert all(row["accuracy"] >= 0.99 for row in attrs.values())
    assert result["fd_n"] == N and f"vs {N} held-out real images" in printed

    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    noisy, _ = score(write_folder(tmp_path / "noise", noise, prompts), capsys)
    empty = np.broadcast_to(images[:, :1, :1], images.shape).copy()  # objects removed: background only
    emptied, _ = score(write_folder(tmp_path / "empty", empty, prompts), capsys)
    swapped, _ = score(write_folder(tmp_path / "bgr", images[..., ::-1], prompts), capsys)  # wrong colours
    assert noisy["accuracy"] < 0.1 and emptied["accuracy"] == 0 and swapped["accuracy"] < 0.5
    assert result["fd"] < 0.1 * noisy["fd"]
    assert result["fd"] < 0.1 * emptied["fd"]


def test_score_fd_n_sets_the_reference_size(real, tmp_path, capsys):
    images, prompts = real
    result, printed = score(write_folder(tmp_path / "real", images[:16], prompts[:16]), capsys, "--fd-n", "24")
    assert result["fd_n"] == 24 and "vs 24 held-out real images" in printed
    assert result["counts"]["all"] == 16


def test_reference_scenes_are_those_of_heldout_prompts():
    assert [s.text for s in heldout_samples(9, 3)] == heldout_prompts(9, 3)


def test_score_missing_image_is_named(real, tmp_path, capsys):
    images, prompts = real
    folder = write_folder(tmp_path / "real", images[:8], prompts[:8], blank_after=2)
    (folder / "0005.png").unlink()  # prompt line 5 (the 5th prompt: line 3 is blank)
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--images", str(folder), "--prompts", str(folder / "prompts.txt")])
    assert exit_info.value.code == 2
    assert "0005.png" in capsys.readouterr().err


def test_score_without_images_errors(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    with pytest.raises(SystemExit):
        main(["score", "--images", str(tmp_path), "--prompts", str(tmp_path / "prompts.txt")])
    assert "no PNG images" in capsys.readouterr().err


def test_report_smoke_on_a_tiny_model(tmp_path, capsys, one_thread):

    model = tmp_path / "tiny"
    random_model_with_student(model, steps=4)
    out = tmp_path / "report"
    main(["report", "--model", str(model), "--n", "4", "--teacher-steps", "1,2", "--ws", "0,1",
          "--out-dir", str(out), "--device", "cpu"])

    report = json.loads((out / "report.json").read_text())
    assert {"device", "n", "guidance", "rows", "goals", "sweep", "plots"} <= set(report)
    rows = {(r["model"], r["steps"]): r for r in report["rows"]}
    assert set(rows) == {("teacher", 1), ("teacher", 2), ("student-4", 4)}
    w = report["guidance"]
    assert rows["teacher", 2]["nfe"] == (4 if w > 0 else 2) and rows["student-4", 4]["nfe"] == 4
    for row in report["rows"] + report["sweep"]["rows"]:
        assert {"accuracy", "one_object", "two_object", "per_attribute", "fd", "fd_n", "nfe",
                "seconds_per_image", "grid"} <= set(row)
        assert (out / row["grid"]).is_file()
        asked = row["correct"].replace("-", "")  # per-prompt outcomes, for `compare`
        assert len(row["correct"]) == 4 and set(asked) <= {"0", "1"}
        assert row["accuracy"] == pytest.approx(asked.count("1") / len(asked))
    assert report["sweep"]["steps"] == 2 and [r["guidance"] for r in report["sweep"]["rows"]] == [0, 1]
    assert report["sweep"]["rows"][0]["nfe"] == 2  # w = 0 needs no unconditional pass
    student = report["student_sweep"]  # --student-sweep defaults to the 4-step student, over --ws
    assert student["model"] == "student-4" and [r["guidance"] for r in student["rows"]] == [0, 1]
    assert [r["nfe"] for r in student["rows"]] == [4, 4]  # w is the student's input: one pass per step
    assert all((out / r["grid"]).is_file() for r in student["rows"])
    assert report["missing_students"] == [1, 2, 8]
    statuses = {g["goal"]: g["status"] for g in report["goals"]}
    assert len(statuses) == 4 and "2-step teacher" in report["goals"][0]["goal"]  # 64 not run: the largest
    assert [s for goal, s in statuses.items() if goal.startswith("2-step")] == ["not run"]
    assert all(s in ("met", "not met") for goal, s in statuses.items() if goal.startswith("4-step"))
    for name in report["plots"].values():
        assert Image.open(out / name).format == "PNG"
    text = (out / "report.md").read_text()
    assert "## Goals" in text and "| student-4 | 4 | 4 |" in text
    assert report["student_sampler"] == "ddim" and "ddim for the students" in text
    assert "## Guidance sweep (student-4" in text and "| 0 | 4 |" in text
    capsys.readouterr()
    main(["compare", str(out), str(out)])  # a report against itself: every run, no difference
    runs = {(r["model"], r["steps"], r["guidance"]) for r in report["rows"] + report["sweep"]["rows"] + student["rows"]}
    assert capsys.readouterr().out.count("| +0.0 points | [+0.0, +0.0] | 0 / 0 | 1 |") == len(runs)
    main(["compare", f"{out}:teacher-2-w0", f"{out}:teacher-2-w1"])  # two runs of one report
    assert "teacher-2-w0 |" in capsys.readouterr().out


def test_report_student_sweep_off_or_absent(tmp_path, one_thread):
    from ldm.eval.report import make_report
    from ldm.pipeline import save_random_model

    model = tmp_path / "tiny"
    save_random_model(str(model))  # no students at all
    for sweep in (0, 4):
        report = make_report(model, tmp_path / f"r{sweep}", n=2, teacher_steps=(1,), ws=(1,), device="cpu",
                             student_sweep=sweep)
        assert report["student_sweep"] is None and [r["model"] for r in report["rows"]] == ["teacher"]
        assert "Guidance sweep (student" not in (tmp_path / f"r{sweep}" / "report.md").read_text()


def test_report_student_sampler_reaches_the_students_only(tmp_path, one_thread):
    from ldm.eval.report import make_report

    model = tmp_path / "tiny"
    random_model_with_student(model)
    reports = {s: make_report(model, tmp_path / s, n=4, teacher_steps=(2,), student_steps=(2,), ws=(1,),
                              device="cpu", student_sampler=s) for s in ("ddim", "stochastic")}
    grids = {s: {r["model"]: (tmp_path / s / r["grid"]).read_bytes() for r in rep["rows"]}
             for s, rep in reports.items()}
    assert grids["ddim"]["teacher"] == grids["stochastic"]["teacher"]      # the teacher stays on DDIM
    assert grids["ddim"]["student-2"] != grids["stochastic"]["student-2"]  # the student's sampler changed
    assert reports["stochastic"]["student_sampler"] == "stochastic"


def test_report_merges_a_lora_into_the_teacher_and_runs_its_sampler(tmp_path, one_thread):
    """--lora FILE --teacher-sampler lcm (an LCM-LoRA's report): the teacher's images change with the file and with
    the sampler, the students are left out (the merge would reach them), and the report says what ran."""
    import torch
    from safetensors.torch import save_file

    from ldm.eval.report import make_report
    from ldm.models.lora import add_lora, lora_file_state
    from ldm.models.unet import UNet

    model = tmp_path / "tiny"
    random_model_with_student(model)
    unet = UNet.from_pretrained(str(model / "unet"))
    add_lora(unet, rank=2)
    torch.manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora" in name:
            p.data.normal_(0, 0.5)      # lora_B starts at zero: a nonzero update so the file changes the images
    tensors, metadata = lora_file_state(unet)
    save_file(tensors, str(tmp_path / "lora.safetensors"), metadata=metadata)

    def grid(name, **kw):
        report = make_report(model, tmp_path / name, n=4, teacher_steps=(2,), student_steps=(2,), ws=(0,),
                             guidance=0.0, device="cpu", **kw)
        return report, (tmp_path / name / report["rows"][0]["grid"]).read_bytes()

    plain, plain_grid = grid("plain", teacher_sampler="lcm")
    merged, merged_grid = grid("lora", teacher_sampler="lcm", loras=[(tmp_path / "lora.safetensors", 1.0)])
    _, ddim_grid = grid("ddim", loras=[(tmp_path / "lora.safetensors", 1.0)])
    assert [r["model"] for r in plain["rows"]] == ["teacher", "student-2"]
    assert [r["model"] for r in merged["rows"]] == ["teacher"] and merged["student_sweep"] is None
    assert merged_grid != plain_grid and merged_grid != ddim_grid
    assert merged["sampler"] == "lcm" and merged["loras"] == [[str(tmp_path / "lora.safetensors"), 1.0]]
    assert "lcm for the teacher with the LoRA" in (tmp_path / "lora" / "report.md").read_text()


def test_report_refuses_an_unknown_sampler_a_missing_lora_and_a_bad_interval(tmp_path, capsys):
    from ldm.pipeline import save_random_model

    save_random_model(str(tmp_path / "tiny"))
    for extra, message in ((["--teacher-sampler", "dpm_fast"], "pick one of"),
                           (["--lora", str(tmp_path / "none.safetensors")], "no file"),
                           (["--guidance-interval", "3:1"], "need 0 <= LO < HI")):
        with pytest.raises(SystemExit) as exit_:
            main(["report", "--model", str(tmp_path / "tiny"), "--n", "2", *extra])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_report_guidance_interval_reaches_the_teacher_only(tmp_path, one_thread):
    """--guidance-interval: the teacher's runs guide only inside it (fewer net calls, other images), the students
    are left out, and the report records the interval."""
    from ldm.eval.report import make_report
    from ldm.pipeline import save_random_model

    model = tmp_path / "tiny"
    save_random_model(str(model))
    runs = {}
    for name, interval in (("plain", None), ("limited", (0.0, 2.0))):   # the 2-step grid: sigma 22026, then ~1
        report = make_report(model, tmp_path / name, n=2, teacher_steps=(2,), ws=(1,), device="cpu",
                             guidance_interval=interval)
        runs[name] = report, (tmp_path / name / report["rows"][0]["grid"]).read_bytes()
    (plain, plain_grid), (limited, limited_grid) = runs["plain"], runs["limited"]
    assert plain["rows"][0]["nfe"] == 4 and limited["rows"][0]["nfe"] == 3
    assert limited_grid != plain_grid
    assert plain["guidance_interval"] is None and limited["guidance_interval"] == [0.0, 2.0]
    assert "CFG only where 0 < sigma / alpha <= 2" in (tmp_path / "limited" / "report.md").read_text()
