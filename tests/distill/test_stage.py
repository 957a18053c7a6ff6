"""stages/distill.py on a tiny random teacher folder: both stages write students; resume mid-round is exact."""
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from stage_scripts import load_stage

from ldm.pipeline import TextToImage, load_index, save_random_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stage(one_thread_module):
    return load_stage("distill")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    save_random_model(str(folder), resolution=32)
    return folder


def argv(teacher, out, model_out, *extra):
    return ["--config", str(ROOT / "configs" / "distill" / "tiny.yaml"), f"teacher={teacher}",
            f"train.output_dir={out}", f"model_out={model_out}", "distill.n_start=2", "train.checkpoint_every=0",
            *extra]


@pytest.fixture(scope="module")
def straight(stage, teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    folder = stage.main(argv(teacher, root / "run", root / "model"))
    return root, folder


def test_both_stages_write_students(straight, teacher):
    root, folder = straight
    index = load_index(folder)
    assert index.students == {"2": "student-2", "1": "student-1"}
    assert load_index(str(teacher)).students == {}          # the teacher folder is left as it was
    for name in ("stage-one", "round-1"):
        assert (root / "run" / name / "samples" / "step-000002.png").is_file()
    # Stage one trained the zero-initialised w-embedding away from zero.
    s1 = load_file(str(Path(folder) / "student-2" / "model.safetensors"))
    assert s1["w_embed.mlp.fc2.weight"].abs().sum() > 0
    for steps in (1, 2):  # the preset's w ~ U[0, 4], recorded for the samplers' range warning
        config = json.loads((Path(folder) / f"student-{steps}" / "config.json").read_text())
        assert config["kind"] == "guided_student" and config["w_range"] == [0.0, 4.0]
    pipe = TextToImage.from_folder(folder)
    images, info = pipe.generate(["a red circle"], steps=1, guidance=1.0)
    assert info["model"] == "student-1" and info["nfe"] == 1 and images.shape == (1, 3, 32, 32)


def test_resume_mid_round_is_exact(stage, straight, teacher, tmp_path):
    root, folder = straight
    args = argv(teacher, tmp_path / "run", tmp_path / "model", "train.checkpoint_every=1")
    cfg = stage.parse_args(stage.DistillStageConfig, "", None, args)
    assert stage.run(cfg, stop_after=("round-1", 1)) is None          # killed after update 1 of round 1
    assert "1" not in load_index(str(tmp_path / "model")).students
    stage_one_ckpts = sorted(p.name for p in (tmp_path / "run" / "stage-one").glob("checkpoint-*"))
    out = stage.main(args + ["--resume", "latest"])
    assert sorted(p.name for p in (tmp_path / "run" / "stage-one").glob("checkpoint-*")) == stage_one_ckpts
    assert (tmp_path / "run" / "round-1" / "checkpoint-000002").is_dir()
    for name in ("student-2", "student-1"):
        a = load_file(str(Path(folder) / name / "model.safetensors"))
        b = load_file(str(Path(out) / name / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_resume_from_another_rounds_state_differs(stage, straight, teacher, tmp_path):
    # The exactness test above can fail: resuming round 1 with stage one's RNG gives other weights.
    root, folder = straight
    args = argv(teacher, tmp_path / "run", tmp_path / "model", "train.checkpoint_every=1")
    stage.run(stage.parse_args(stage.DistillStageConfig, "", None, args), stop_after=("round-1", 1))
    ckpt = tmp_path / "run" / "round-1" / "checkpoint-000001"
    other = tmp_path / "run" / "stage-one" / "checkpoint-000001" / "rng_state_0.pt"
    (ckpt / "rng_state_0.pt").write_bytes(other.read_bytes())
    out = stage.main(args + ["--resume", "latest"])
    a = load_file(str(Path(folder) / "student-1" / "model.safetensors"))
    b = load_file(str(Path(out) / "student-1" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("option", [["distill.time_shift=8", "distill.time_shift_share=0.5"],
                                    ["distill.snr_cap=1"]], ids=["time_shift", "snr_cap"])
def test_stage_one_options_reach_training(stage, straight, teacher, tmp_path, option):
    # Same seed, same data: only stage one's times (or loss weights) differ, so its student must
    # too (the straight run is the reference; with distill.time_shift=1 the students are equal).
    root, folder = straight
    out = stage.main(argv(teacher, tmp_path / "run", tmp_path / "model", "distill.n_end=2", *option))
    a = load_file(str(Path(folder) / "student-2" / "model.safetensors"))
    b = load_file(str(Path(out) / "student-2" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in b.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)


ROUND_ONLY = ["distill.n_start=4", "distill.n_end=2", "distill.time_shift=8", "distill.time_shift_share=0.5"]


def students(run_dir) -> dict:
    return {r: load_file(str(run_dir / r / "student" / "model.safetensors")) for r in ("stage-one", "round-2")}


@pytest.fixture(scope="module")
def round_baseline(stage, teacher, tmp_path_factory):
    """A shifted stage one, then round 2 (two grid steps) on uniform steps of noised data."""
    root = tmp_path_factory.mktemp("round-baseline")
    stage.main(argv(teacher, root / "run", root / "model", *ROUND_ONLY))
    return students(root / "run")


@pytest.mark.parametrize("option", ["distill.round_times=shifted", "distill.teacher_path_share=1",
                                    "distill.round_lr={2: 1.0e-5}"])
def test_round_options_reach_the_rounds_only(stage, teacher, round_baseline, tmp_path, option):
    # Same seeds and data: equal stage-one students, different round students.
    stage.main(argv(teacher, tmp_path / "run", tmp_path / "model", *ROUND_ONLY, option))
    a, b = round_baseline, students(tmp_path / "run")
    assert all(torch.equal(a["stage-one"][k], b["stage-one"][k]) for k in a["stage-one"])
    assert all(torch.isfinite(v).all() for v in b["round-2"].values())
    assert any(not torch.equal(a["round-2"][k], b["round-2"][k]) for k in a["round-2"])


def test_teacher_path_states_are_trained_on(stage, teacher, tmp_path, monkeypatch):
    # The option test above would pass if the states were computed and dropped (the share draws
    # other random numbers anyway); here only the states differ, and so must the round students.
    extra = (*ROUND_ONLY, "distill.teacher_path_share=1")
    stage.main(argv(teacher, tmp_path / "a", tmp_path / "ma", *extra))
    monkeypatch.setattr(stage, "teacher_states", lambda teacher, noise, *args: torch.zeros_like(noise))
    stage.main(argv(teacher, tmp_path / "b", tmp_path / "mb", *extra))
    a, b = students(tmp_path / "a"), students(tmp_path / "b")
    assert all(torch.equal(a["stage-one"][k], b["stage-one"][k]) for k in a["stage-one"])
    assert any(not torch.equal(a["round-2"][k], b["round-2"][k]) for k in a["round-2"])


def test_bad_settings_are_named(stage, teacher, tmp_path, capsys):
    with pytest.raises(SystemExit):
        stage.main(argv(teacher, tmp_path, tmp_path / "m", "distill.n_start=3"))
    with pytest.raises(SystemExit):
        stage.main(argv(teacher, tmp_path, tmp_path / "m", "distill.time_shift_share=-1"))
    assert "distill.time_shift_share" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        stage.main(argv(teacher, tmp_path, tmp_path / "m", "distill.round_times=log"))
    assert "distill.round_times" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        stage.main(argv(teacher, tmp_path, tmp_path / "m", "distill.teacher_path_share=1.5"))
    assert "distill.teacher_path_share" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        stage.main(argv(teacher, tmp_path, tmp_path / "m", "distill.snr_cap=0.5"))
    assert "distill.snr_cap" in capsys.readouterr().err
    with pytest.raises(ValueError, match="teacher=DIR"):
        stage.run(stage.parse_args(stage.DistillStageConfig, "", None, ["--config", str(ROOT / "configs" / "distill" / "tiny.yaml")]))


@pytest.mark.parametrize("preset", ["tiny", "shapes64", "sd15", "sdxl", "sd3"])
def test_presets_load_and_plan_halving_rounds(stage, preset):
    from ldm.training import load_config
    cfg = load_config(stage.DistillStageConfig, ROOT / "configs" / "distill" / f"{preset}.yaml", ["teacher=x"])
    plan = stage.plan_rounds(cfg.distill)
    rounds = [r for r in plan if r.kind == "data"]
    for kind, per_round in (("paths", cfg.distill.path_updates), ("dmd", cfg.distill.dmd_updates)):
        assert [r.steps for r in plan if r.kind == kind] == sorted(set(per_round) & {r.steps for r in rounds[1:]},
                                                                    reverse=True)
    assert plan[: len(rounds)] == rounds                            # fine-tuning rounds come after the halvings
    assert [r.kind for r in plan[len(rounds):]] == sorted((r.kind for r in plan[len(rounds):]), reverse=True)
    assert rounds[0].n_teacher is None and rounds[0].steps == cfg.distill.n_start
    assert [r.steps * 2 for r in rounds[1:]] == [r.steps for r in rounds[:-1]]
    assert rounds[-1].steps == cfg.distill.n_end


def test_round_updates_override_single_rounds(stage, capsys):
    from ldm.training import load_config
    preset = ROOT / "configs" / "distill" / "shapes64.yaml"
    cfg = load_config(stage.DistillStageConfig, preset, ["teacher=x", "distill.round_updates={8: 1800, 4: 900}"])
    updates = {r.steps: r.updates for r in stage.plan_rounds(cfg.distill)[1:] if r.kind == "data"}
    base = cfg.distill.round_steps
    assert updates == {32: base, 16: base, 8: 1800, 4: 900, 2: base, 1: base}
    with pytest.raises(SystemExit):                                   # no 3-step round: named, not ignored
        stage.main(["--config", str(preset), "teacher=x", "distill.round_updates={3: 100}"])
    assert "distill.round_updates" in capsys.readouterr().err
    lrs = load_config(stage.DistillStageConfig, preset, ["teacher=x", "distill.round_lr={32: 5.0e-5}"])
    assert {r.steps: r.lr for r in stage.plan_rounds(lrs.distill)[1:] if r.kind == "data"} == {32: 5e-5, 16: None, 8: None, 4: None,
                                                                          2: None, 1: None}
    for bad in ("distill.round_lr={3: 1.0e-4}", "distill.round_lr={32: 0}"):
        with pytest.raises(SystemExit):
            stage.main(["--config", str(preset), "teacher=x", bad])
        assert "distill.round_lr" in capsys.readouterr().err
    only_one = load_config(stage.DistillStageConfig, preset, ["teacher=x", "distill.n_end=64"])
    assert [r.name for r in stage.plan_rounds(only_one.distill)] == ["stage-one"]   # the preset's keys still load


def test_cached_latents_are_built_once_and_trained_on(stage, teacher, tmp_path):
    # Stage 3 reads stage 2's latent cache: the cache is keyed on the teacher's autoencoder and the
    # data, built on the first run and hit by the next, which trains the same students from it.
    cache = tmp_path / "cache"
    args = argv(teacher, tmp_path / "run", tmp_path / "model", "cache_latents=true", f"cache_dir={cache}")
    folder = stage.main(args)
    (key,) = [p for p in cache.iterdir() if p.is_dir()]
    assert json.loads((key / "meta.json").read_text())["num_samples"] == 64           # data.length
    mtime = (key / "meta.json").stat().st_mtime_ns
    again = stage.main(argv(teacher, tmp_path / "run2", tmp_path / "model2", "cache_latents=true",
                            f"cache_dir={cache}"))
    assert (key / "meta.json").stat().st_mtime_ns == mtime                             # a hit, not a rebuild
    for name in ("student-2", "student-1"):
        a = load_file(str(Path(folder) / name / "model.safetensors"))
        b = load_file(str(Path(again) / name / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_path_rounds_fine_tune_their_rounds_students(stage, teacher, tmp_path):
    # Round 1, then its student fine-tuned on 3 of the teacher's 4-step DDIM paths (2 files of batch
    # 2); the model folder gets the fine-tuned student; a resume finds everything done.
    extra = ("distill.path_updates={1: 2}", "distill.teacher_paths=3", "distill.path_steps=4")
    folder = stage.main(argv(teacher, tmp_path / "run", tmp_path / "model", *extra))
    run = tmp_path / "run"
    files = sorted((run / "paths").glob("*.safetensors"))
    states, w, prompts = stage.load_paths(files)
    assert len(files) == 2 and states.shape[:2] == (2, 3) and len(prompts) == 3
    assert ((0 <= w) & (w <= 4)).all()
    tuned = load_file(str(run / "paths-1" / "student" / "model.safetensors"))
    chained = load_file(str(run / "round-1" / "student" / "model.safetensors"))
    shipped = load_file(str(Path(folder) / "student-1" / "model.safetensors"))
    assert all(torch.equal(tuned[k], shipped[k]) for k in tuned)
    assert any(not torch.equal(tuned[k], chained[k]) for k in tuned)
    assert (run / "paths-1" / "samples" / "step-000002.png").is_file()
    done = [*files, run / "paths-1" / "student" / "model.safetensors"]
    stamps = [f.stat().st_mtime_ns for f in done]
    stage.main(argv(teacher, run, tmp_path / "model", *extra, "--resume", "latest"))
    assert [f.stat().st_mtime_ns for f in done] == stamps


def test_held_out_paths_are_drawn_after_and_never_trained_on(stage, teacher, tmp_path, caplog):
    # 3 training paths (2 files of batch 2) and 2 held out (a third file); the round logs both errors.
    extra = ("distill.path_updates={1: 2}", "distill.teacher_paths=3", "distill.path_steps=4",
             "distill.path_holdout=2")
    with caplog.at_level(logging.INFO, logger="distill"):
        stage.main(argv(teacher, tmp_path / "run", tmp_path / "model", *extra))
    files = sorted((tmp_path / "run" / "paths").glob("*.safetensors"))
    assert [stage.load_paths([f])[0].shape[1] for f in files] == [2, 1, 2]
    logged = [r.getMessage() for r in caplog.records if "path error held-out" in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith("paths-1 step 2:") and "(2 paths each)" in logged[0]
    # The held-out file is not in the training batches: training on the first two files alone is the same run.
    alone = stage.main(argv(teacher, tmp_path / "run2", tmp_path / "model2", *extra[:3]))
    a = load_file(str(Path(alone) / "student-1" / "model.safetensors"))
    b = load_file(str(tmp_path / "model" / "student-1" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dmd_rounds_fine_tune_the_path_rounds_students_and_resume_exactly(stage, teacher, tmp_path):
    # Round 1, its path round, then DMD from the path round's student against stage one's student;
    # killed after the DMD round's first update and resumed, it ends where an unbroken run ends.
    extra = ("distill.path_updates={1: 2}", "distill.dmd_updates={1: 2}", "distill.teacher_paths=3",
             "distill.path_steps=4", "distill.dmd_batch=2", "train.checkpoint_every=1")
    folder = stage.main(argv(teacher, tmp_path / "run", tmp_path / "model", *extra))
    run = tmp_path / "run"
    dmd = load_file(str(run / "dmd-1" / "student" / "model.safetensors"))
    tuned = load_file(str(run / "paths-1" / "student" / "model.safetensors"))
    shipped = load_file(str(Path(folder) / "student-1" / "model.safetensors"))
    assert all(torch.equal(dmd[k], shipped[k]) for k in dmd)
    assert any(not torch.equal(dmd[k], tuned[k]) for k in dmd)
    fake = load_file(str(run / "dmd-1" / "checkpoint-000002" / "fake.safetensors"))
    real = load_file(str(run / "stage-one" / "student" / "model.safetensors"))
    assert fake.keys() == real.keys() and any(not torch.equal(fake[k], real[k]) for k in fake)   # it trained
    args = argv(teacher, tmp_path / "again", tmp_path / "model2", *extra)
    assert stage.run(stage.parse_args(stage.DistillStageConfig, "", None, args), stop_after=("dmd-1", 1)) is None
    out = stage.main(args + ["--resume", "latest"])
    again = load_file(str(Path(out) / "student-1" / "model.safetensors"))
    assert all(torch.equal(again[k], shipped[k]) for k in again)


def test_bad_path_settings_are_named(stage, teacher, tmp_path, capsys):
    for bad in (["distill.path_updates={3: 5}"], ["distill.path_updates={2: 5}", "distill.path_steps=3"],
                ["distill.path_updates={2: 5}", "distill.path_holdout=-1"], ["distill.dmd_updates={3: 5}"],
                ["distill.dmd_updates={2: 5}", "distill.dmd_lr=0"]):
        with pytest.raises(SystemExit):
            stage.main(argv(teacher, tmp_path, tmp_path / "m", *bad))
        err = capsys.readouterr().err
        assert "distill.path_" in err or "distill.dmd_" in err


def test_a_discrete_teacher_is_distilled_over_its_whole_schedule(stage, tmp_path, monkeypatch):
    """An imported SD teacher's times run 0..999: stage one and DMD draw t over all of them, not U[0, 1]
    (which, in timestep units, is clean data only: what the stage drew before session 22)."""
    folder = tmp_path / "teacher"
    save_random_model(str(folder), resolution=32)
    index = load_index(str(folder))
    index.schedule, index.time_scale, index.prediction = {"name": "scaled_linear", "zero_snr": True}, 1.0, "v"
    from ldm.pipeline import save_index
    save_index(str(folder), index)
    seen = {"stage-one": [], "dmd": []}

    def recorder(fn, key, pos):
        def wrapped(*args, **kwargs):
            seen[key].append(args[pos].detach().double())
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(stage, "stage_one_target", recorder(stage.stage_one_target, "stage-one", 2))
    monkeypatch.setattr(stage, "dmd_direction", recorder(stage.dmd_direction, "dmd", 3))
    extra = ("distill.stage_one_steps=8", "distill.path_updates={1: 1}", "distill.dmd_updates={1: 8}",
             "distill.teacher_paths=3", "distill.path_steps=4", "distill.dmd_batch=2")
    stage.main(argv(folder, tmp_path / "run", tmp_path / "model", *extra))
    t = {k: torch.cat(v) for k, v in seen.items()}
    assert t["stage-one"].numel() == 16 and t["stage-one"].max() > 300 and t["stage-one"].min() >= 0
    assert t["dmd"].numel() == 16 and t["dmd"].max() > 300 and t["dmd"].max() <= 0.98 * 999 + 1e-3


def test_a_rectified_flow_teacher_is_distilled_on_its_shifted_grid(stage, tmp_path, monkeypatch):
    """A flow-velocity teacher on the straight path (SD3's objective) goes through stage one, a halving round,
    a path round and DMD; the round's two teacher steps run on the schedule's shifted grid (1, 0.75, clean
    at shift 3), and the students predict flow as their teacher."""
    folder = tmp_path / "teacher"
    save_random_model(str(folder), resolution=32)
    index = load_index(str(folder))
    index.schedule, index.prediction = {"name": "rectified_flow", "shift": 3.0}, "flow"
    from ldm.pipeline import save_index
    save_index(str(folder), index)
    rows = []

    def recorder(teacher, z_t, t, t_mid, t_end, *args):
        rows.append(torch.stack([t, t_mid, t_end], 1).double())
        return two_step(teacher, z_t, t, t_mid, t_end, *args)

    two_step = stage.stage_two_target
    monkeypatch.setattr(stage, "stage_two_target", recorder)
    extra = ("distill.stage_one_steps=2", "distill.path_updates={1: 1}", "distill.dmd_updates={1: 2}",
             "distill.teacher_paths=3", "distill.path_steps=4", "distill.dmd_batch=2")
    out = stage.main(argv(folder, tmp_path / "run", tmp_path / "model", *extra))
    grid = torch.cat(rows).unique(dim=0)
    torch.testing.assert_close(grid, torch.tensor([[1.0, 0.75, -1.0]], dtype=torch.float64))
    pipe = TextToImage.from_folder(out)
    assert (pipe.index.prediction, pipe.index.student_prediction) == ("flow", "flow")
    images, info = pipe.generate(["a red circle"], steps=1, guidance=1.0)
    assert info["model"] == "student-1" and bool(torch.isfinite(images).all())


def test_aspect_ratio_buckets_feed_both_stages(stage, teacher, tmp_path, mixed_aspect_folder):
    """Wide, square and tall pictures (buckets 40x24, 32x32, 24x40 at 32 px) through stage one and a round."""
    images = mixed_aspect_folder
    data = ("data.source=imagefolder", f"data.path={images}", "data.buckets=true", "data.bucket_step=8")
    folder = stage.main(argv(teacher, tmp_path / "run", tmp_path / "model", *data))
    assert load_index(folder).students == {"2": "student-2", "1": "student-1"}
    with pytest.raises(ValueError, match="data.bucket_step=4 is not divisible by 8"):
        stage.main(argv(teacher, tmp_path / "bad", tmp_path / "model", *data[:-1], "data.bucket_step=4"))
