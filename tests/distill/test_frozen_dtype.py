"""distill.frozen_dtype: stages/distill.py holds its frozen nets (teacher, text encoder, autoencoder, round teachers) in
bf16 while the student trains in fp32, and the round targets stay those of the fp32 nets within bf16's rounding."""
from pathlib import Path

import pytest
import torch
from stage_scripts import load_stage

from ldm.diffusion.param import Denoiser
from ldm.distill.student import GuidedStudent
from ldm.distill.targets import x_space_loss
from ldm.models.nets import load_net
from ldm.pipeline import load_index, save_random_model

ROOT = Path(__file__).resolve().parents[2]


def nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def stage(one_thread_module):
    return load_stage("distill")


@pytest.fixture(scope="module")
def bf16_run(stage, tmp_path_factory):
    """A tiny teacher distilled 2 -> 1 with frozen_dtype=bfloat16; what each round was given, and every round-1 target
    with its arguments, recorded on the way."""
    root = tmp_path_factory.mktemp("frozen_bf16")
    save_random_model(str(root / "teacher"), resolution=32)
    seen, targets = {}, []
    train_round, stage_two_target = stage.train_round, stage.stage_two_target

    def recording_round(accelerator, cfg, rnd, index, student, teacher, parts, *args, **kwargs):
        seen[rnd.name] = {"student": {p.dtype for p in student.parameters()}, "student_bytes": nbytes(student),
                          "student_numel": numel(student), "teacher": teacher.net,
                          "start": {k: v.clone() for k, v in student.unet.state_dict().items()},
                          "frozen": {name: (nbytes(m), numel(m), {p.dtype for p in m.parameters()}) for name, m in
                                     (("unet", parts.unet), ("text_encoder", parts.text_encoder),
                                      ("autoencoder", parts.autoencoder), ("round teacher", teacher.net))}}
        return train_round(accelerator, cfg, rnd, index, student, teacher, parts, *args, **kwargs)

    def recording_target(teacher, z_t, t, t_mid, t_end, schedule, extra):
        target = stage_two_target(teacher, z_t, t, t_mid, t_end, schedule, extra)
        targets.append((z_t.clone(), t, t_mid, t_end, schedule, {k: v.clone() for k, v in extra.items()}, target))
        return target

    patch = pytest.MonkeyPatch()
    patch.setattr(stage, "train_round", recording_round)
    patch.setattr(stage, "stage_two_target", recording_target)
    try:
        folder = stage.main(["--config", str(ROOT / "configs" / "distill" / "tiny.yaml"), f"teacher={root / 'teacher'}",
                             f"train.output_dir={root / 'run'}", f"model_out={root / 'model'}", "distill.n_start=2",
                             "distill.frozen_dtype=bfloat16", "distill.round_updates={1: 8}", "train.lr=1e-3",
                             "train.checkpoint_every=0"])
    finally:
        patch.undo()
    return root, folder, seen, targets


def test_frozen_nets_are_bf16_and_the_student_fp32(bf16_run):
    """Every frozen net holds 2 bytes a parameter (half its fp32 size), the round teacher is a bf16 copy of stage
    one's fp32 student, and the students train with 4 bytes a parameter, stage one's starting from the teacher's fp32
    weights (the folder's, not the bf16 copy's rounding)."""
    root, _, seen, _ = bf16_run
    assert list(seen) == ["stage-one", "round-1"]
    for name, rnd in seen.items():
        assert rnd["student"] == {torch.float32} and rnd["student_bytes"] == 4 * rnd["student_numel"], name
        for part, (size, count, dtypes) in rnd["frozen"].items():
            assert dtypes == {torch.bfloat16} and size == 2 * count > 0, (name, part)
            assert not any(p.requires_grad for p in rnd["teacher"].parameters())
    assert isinstance(seen["round-1"]["teacher"], GuidedStudent)           # not the teacher's net: stage one's student
    fp32 = load_net(str(root / "teacher" / "unet")).state_dict()
    start = seen["stage-one"]["start"]
    assert start.keys() == fp32.keys() and all(torch.equal(start[k], fp32[k]) for k in fp32)


def test_round_targets_are_the_fp32_teachers_within_bf16(bf16_run):
    """Round 1's targets (two DDIM steps of its teacher, Salimans & Ho Alg. 2) against the same two steps of the fp32
    stage-one student read from disk: within a few bf16 roundings, yet not equal (the bf16 copy did the work)."""
    root, _, _, targets = bf16_run
    assert len(targets) == 8
    fp32 = GuidedStudent.from_pretrained(str(root / "run" / "stage-one" / "student")).eval()
    index = load_index(str(root / "teacher"))
    stage = load_stage("distill")
    worst = 0.0
    for z_t, t, t_mid, t_end, schedule, extra, target in targets:
        assert target.dtype == torch.float32                              # handed on in fp32
        reference = stage.stage_two_target(Denoiser(fp32, schedule, index.prediction, index.time_scale),
                                           z_t, t, t_mid, t_end, schedule, extra)
        error = ((target - reference).abs().max() / reference.abs().max()).item()
        worst = max(worst, error)
        assert error > 0                                                   # bf16 weights moved it
    assert worst < 2e-2, worst                   # bf16 rounds by up to 2^-9 (0.2%); two steps of the tiny U-Net: 0.7%


def test_a_bf16_run_lowers_the_loss_and_writes_students(bf16_run):
    """The 1-step student (8 updates at 1e-3) is nearer its round's targets than the stage-one student it started
    from, and both students are written in fp32 (the preset's save_dtype)."""
    root, folder, _, targets = bf16_run
    assert load_index(folder).students == {"2": "student-2", "1": "student-1"}
    index = load_index(str(root / "teacher"))
    before, after = (GuidedStudent.from_pretrained(str(root / "run" / name / "student")).eval()
                     for name in ("stage-one", "round-1"))
    assert {p.dtype for p in after.parameters()} == {torch.float32}
    losses = []
    for net in (before, after):
        total = 0.0
        with torch.no_grad():
            for z_t, t, t_mid, t_end, schedule, extra, target in targets:
                alpha, sigma = schedule.alpha_sigma(t)
                x_hat = Denoiser(net, schedule, index.prediction, index.time_scale)(z_t, t, **extra)
                total += x_space_loss(x_hat, target, alpha.float(), sigma.float()).mean().item()
        losses.append(total / len(targets))
    assert losses[1] < 0.9 * losses[0], losses                            # 0.256 -> 0.106 here


def test_fp32_is_the_default_and_bad_dtypes_are_named(stage, capsys):
    cfg = stage.parse_args(stage.DistillStageConfig, "", None, ["teacher=x"])
    assert cfg.distill.frozen_dtype == "float32"
    with pytest.raises(SystemExit):
        stage.parse_args(stage.DistillStageConfig, "", None, ["teacher=x", "distill.frozen_dtype=bf16"])
    assert "frozen_dtype" in capsys.readouterr().err


def test_bf16_path_and_dmd_rounds_train_an_fp32_fake_from_cached_latents(stage, bf16_run, tmp_path, monkeypatch):
    """The rest of the stage under bfloat16: latents cached (encoded in fp32, then the autoencoder is cast for the
    validation grids), teacher paths drawn by the bf16 teacher, and a DMD round whose real denoiser is a bf16 copy of
    stage one's student while its fake one, which trains, starts as that student's fp32 weights."""
    root = bf16_run[0]
    seen = {}
    init = stage.DMDUpdates.__init__

    def recording(self, accelerator, cfg, rnd, parts, student_x0, real, fake, *args):
        seen["real"] = {p.dtype for p in real.net.parameters()}
        seen["fake"] = {k: v.clone() for k, v in accelerator.unwrap_model(fake).state_dict().items()}
        seen["autoencoder"] = {p.dtype for p in parts.autoencoder.parameters()}
        init(self, accelerator, cfg, rnd, parts, student_x0, real, fake, *args)
    monkeypatch.setattr(stage.DMDUpdates, "__init__", recording)
    folder = stage.main(["--config", str(ROOT / "configs" / "distill" / "tiny.yaml"), f"teacher={root / 'teacher'}",
                         f"train.output_dir={tmp_path / 'run'}", f"model_out={tmp_path / 'model'}", "distill.n_start=2",
                         "distill.frozen_dtype=bfloat16", "cache_latents=true", "data.length=8",
                         "distill.path_updates={1: 2}", "distill.dmd_updates={1: 2}", "distill.teacher_paths=3",
                         "distill.path_steps=4", "distill.dmd_batch=2", "train.checkpoint_every=0"])
    assert load_index(folder).students == {"2": "student-2", "1": "student-1"}
    assert seen["real"] == {torch.bfloat16} and seen["autoencoder"] == {torch.bfloat16}
    real = GuidedStudent.from_pretrained(str(tmp_path / "run" / "stage-one" / "student")).state_dict()
    assert seen["fake"].keys() == real.keys() and all(torch.equal(seen["fake"][k], real[k]) for k in real)


@pytest.mark.parametrize("preset", ["sdxl", "sd3", "flux-dev"])
def test_the_big_teachers_presets_freeze_in_bf16(stage, preset):
    cfg = stage.parse_args(stage.DistillStageConfig, "", None,
                           ["--config", str(ROOT / "configs" / "distill" / f"{preset}.yaml"), "teacher=x"])
    assert cfg.distill.frozen_dtype == "bfloat16"
