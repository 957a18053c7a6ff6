"""Stage 3 (stages/distill.py) on an imported tiny FLUX.1-dev teacher: -dev takes the guidance scale s = 1 + w as
an input, so it is Meng's stage-one student; the halvings start from it on the grid the pipeline draws at (FLUX.1's
resolution-dependent shift), and the students draw through the pipeline and ldm.txt2img. -schnell is refused."""
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sd_layouts import write_flux_pipeline
from stage_scripts import load_stage

from ldm.data.shapes import ShapesWorld
from ldm.diffusion.param import Denoiser
from ldm.diffusion.samplers import initial_noise
from ldm.distill.student import GuidedStudent
from ldm.distill.targets import stage_two_target
from ldm.models.from_diffusers import convert
from ldm.pipeline import TextToImage, load_index

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "distill" / "tiny.yaml")
stage = load_stage("distill")


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """(diffusers' tiny FLUX.1-dev pipeline, our model folder imported from it)."""
    folder = tmp_path_factory.mktemp("flux_distill")
    theirs = write_flux_pipeline(folder)
    convert(str(folder / "flux"), str(folder / "model"))
    return theirs, folder / "model"


def heldout(pipe: TextToImage, n: int = 4) -> list[str]:
    """Shapes captions of the held-out split (stage 3 trains on the training split's)."""
    return [ShapesWorld(split="heldout", seed=1, resolution=pipe.index.resolution, length=n)[i]["text"] for i in range(n)]


def test_the_starting_student_is_the_dev_teacher(dev, one_thread):
    """A student of -dev takes w as the net's guidance scale 1 + w and nothing else: at every w it is the pipeline's
    teacher at guidance w and diffusers' transformer at guidance_scale 1 + w (closed: no w-embedding to start at 0)."""
    theirs, model = dev
    pipe = TextToImage.from_folder(str(model), decoder_precision="fp32")
    student = GuidedStudent.from_teacher(pipe.unet).eval()
    assert student.w_input == "guidance" and student.w_embed is None
    g = torch.Generator().manual_seed(0)
    z, sigma = torch.randn(pipe.latent_shape(4), generator=g), torch.tensor([0.2, 0.5, 0.8, 1.0])
    cond = pipe.encode_prompts(heldout(pipe))
    w = torch.tensor([0.0, 1.0, 2.5, 4.0])                               # per sample, in our (Imagen) convention
    with torch.no_grad():
        student_x0 = pipe.denoiser(student, pipe.index.student_prediction)
        for i, wi in enumerate(w.tolist()):                              # one sample at a time: bit for bit
            model_fn, extra, info = pipe.model_function(steps=3, guidance=wi)   # no students yet: the teacher
            assert info["model"] == "teacher"
            one = {k: v[i:i + 1] for k, v in cond.items()}
            torch.testing.assert_close(student_x0(z[i:i + 1], sigma[i:i + 1], w=wi, **one),
                                       model_fn(z[i:i + 1], sigma[i:i + 1], **extra(one)), rtol=0, atol=0)
        velocity = student(z, sigma * 1000, w=w, **cond)                 # the net's own output: the flow velocity
        B, C, H, W = z.shape
        ids = diffusers.FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, z.device, z.dtype)
        packed = theirs.transformer(hidden_states=diffusers.FluxPipeline._pack_latents(z, B, C, H, W),
                                    encoder_hidden_states=cond["context"], pooled_projections=cond["pooled"],
                                    timestep=sigma, img_ids=ids, txt_ids=torch.zeros(cond["context"].shape[1], 3),
                                    guidance=1.0 + w).sample
        reference = diffusers.FluxPipeline._unpack_latents(packed, H * 8, W * 8, vae_scale_factor=8)
        torch.testing.assert_close(velocity, reference, atol=1e-5, rtol=1e-5)
        assert (student(z, sigma * 1000, w=w + 2.0, **cond) - velocity).abs().max() > 1e-3   # w reaches the net


def test_the_round_target_is_the_pipelines_two_dev_steps(dev, one_thread):
    """The 1-step student's target (Salimans & Ho Alg. 2 from pure noise, t'' = 0) is the teacher's 2-step sample
    as the pipeline draws it: the same shifted grid (resolution_shift at 32 px, not the folder's shift 1), the same
    guidance convention (w -> scale 1 + w)."""
    _, model = dev
    pipe = TextToImage.from_folder(str(model), decoder_precision="fp32")
    prompts, w = heldout(pipe), 1.5
    target, info = pipe.sample(prompts, steps=2, guidance=w, seed=7)
    assert info["model"] == "teacher" and info["nfe"] == 2           # no CFG: one call a step
    schedule = stage.student_schedule(pipe)
    assert schedule.grid_shift == pytest.approx(pipe.grid_shift(pipe.latent_shape(1))) != 1.0
    ts = schedule.timesteps(2)                                           # (1, t', 0): the round's one grid row
    noise = initial_noise(pipe.schedule, ts, pipe.latent_shape(len(prompts)), generator=torch.Generator().manual_seed(7))
    teacher = Denoiser(GuidedStudent(pipe.unet, w_input="guidance"), schedule, "flow", pipe.index.time_scale)
    row = [ts[k].expand(len(prompts)) for k in range(3)]
    ours = stage_two_target(teacher, noise, *row, schedule, {**pipe.encode_prompts(prompts), "w": torch.full((4,), w)})
    torch.testing.assert_close(ours.float(), target, atol=1e-5, rtol=1e-5)
    unshifted = stage_two_target(teacher, noise, *[pipe.schedule.timesteps(2)[k].expand(4) for k in range(3)],
                                 pipe.schedule, {**pipe.encode_prompts(prompts), "w": torch.full((4,), w)})
    assert (unshifted.float() - target).abs().max() > 1e-3               # the shift matters at 2 steps


def test_stage_three_halves_a_dev_teacher(dev, tmp_path, one_thread, monkeypatch):
    """configs/distill/tiny.yaml from a 4-step -dev teacher: no stage one, round-2 and round-1 write student-2 and
    student-1 (the teacher's net with its guidance input, the grid shift they learnt recorded: diffusers' e^mu at the
    model's 32 px) and train on the pipeline's shifted grids; round-1 runs without the teacher's net and moves the 1-step student towards its teacher's
    (student-2's) 2-step samples, drawn by the pipeline, on held-out prompts and noise; the students draw finite images
    through TextToImage and ldm.txt2img --steps N --guidance W."""
    theirs, model = dev
    rows = []                                                            # (t, t', t'') of every round batch

    def recording(teacher, z_t, t, t_mid, t_end, *args):
        rows.append(torch.stack([t, t_mid, t_end], 1).double().cpu())
        return stage_two_target(teacher, z_t, t, t_mid, t_end, *args)
    monkeypatch.setattr(stage, "stage_two_target", recording)
    parked = []

    def parking(parts, device, runs):                                    # the teacher's weights gone from round-1 on:
        parked.append(runs)                                              # it fails if anything there still runs them
        parts.unet.to(device if runs else "meta")
    monkeypatch.setattr(stage, "park_teacher", parking)
    out = stage.main(["--config", TINY, f"teacher={model}", f"train.output_dir={tmp_path / 'run'}",
                      f"model_out={tmp_path / 'distilled'}", "distill.n_start=4", "distill.w_min=1.0",
                      "distill.w_max=3.0", "distill.round_updates={2: 2, 1: 12}", "train.lr=1e-3",
                      "train.checkpoint_every=0", "data.length=16"])
    assert load_index(out).students == {"2": "student-2", "1": "student-1"}
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir()) == ["round-1", "round-2"]
    assert parked == [True, False]                                       # round-2 runs the teacher, round-1 not
    pipe = TextToImage.from_folder(out, decoder_precision="fp32")
    for steps in (1, 2):
        config = json.loads((Path(out) / f"student-{steps}" / "config.json").read_text())
        assert config["grid_shift"] == pytest.approx(math.exp(their_mu(theirs, pipe)), rel=1e-12)
    grid4, grid2 = (stage.student_schedule(pipe).timesteps(n) for n in (4, 2))   # the pipeline's at 32 px
    seen = torch.cat(rows)                                               # round-2's 2 updates, then round-1's 12
    assert len(seen) == 2 * 14 and set(seen[4:, 1].tolist()) == {float(grid2[1])}
    assert set(map(tuple, seen[:4].tolist())) <= {tuple(grid4[0:3].tolist()), tuple(grid4[2:5].tolist())}
    start = GuidedStudent.from_pretrained(str(tmp_path / "run" / "round-2" / "student")).eval()   # round-1 starts here
    assert start.w_input == "guidance" and start.w_range == (1.0, 3.0)

    prompts, seeds, w = heldout(pipe), [101, 102, 103, 104], 2.0
    target, info = pipe.sample(prompts, steps=2, guidance=w, seed=seeds)        # round-1's teacher, 2 steps
    assert info["model"] == "student-2"
    after, info = pipe.sample(prompts, steps=1, guidance=w, seed=seeds)
    assert info["model"] == "student-1" and info["nfe"] == 1
    noise = torch.cat([initial_noise(pipe.schedule, pipe.schedule.timesteps(1), pipe.latent_shape(1),
                                     generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():                                                # one step from pure noise: x0-hat at t = 1
        before = pipe.denoiser(start, "flow")(noise, torch.ones(4), w=w, **pipe.encode_prompts(prompts))
    loss_before, loss_after = ((x - target).pow(2).mean().item() for x in (before, after))
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)   # 0.0088 -> 0.0013 here

    for steps in (1, 2):
        images, info = pipe.generate(["a red circle", "a cat"], steps=steps, guidance=2.5, size=(48, 32))
        assert info["model"] == f"student-{steps}" and images.shape == (2, 3, 32, 48) and torch.isfinite(images).all()
    from ldm import txt2img
    txt2img.main(["a red circle", "--model", out, "--steps", "2", "--guidance", "2.5", "--decoder-precision", "fp32",
                  "--out", str(tmp_path / "two.png")])
    assert np.asarray(Image.open(tmp_path / "two.png")).std() > 0


def test_a_bf16_dev_teacher_teaches_an_fp32_student(dev, tmp_path, one_thread, monkeypatch):
    """distill.frozen_dtype=bfloat16 on -dev: the first halving's teacher is the folder's net and T5 / CLIP in bf16, its
    student a copy of the folder's fp32 weights (read again, not the bf16 net's), and the round writes student-1."""
    _, model = dev
    seen = {}
    train_round = stage.train_round

    def recording(accelerator, cfg, rnd, index, student, teacher, parts, *args, **kwargs):
        seen["frozen"] = {p.dtype for m in (teacher.net, parts.text_encoder) for p in m.parameters()}
        seen["start"] = {k: v.clone() for k, v in student.unet.state_dict().items()}
        return train_round(accelerator, cfg, rnd, index, student, teacher, parts, *args, **kwargs)
    monkeypatch.setattr(stage, "train_round", recording)
    out = stage.main(["--config", TINY, f"teacher={model}", f"train.output_dir={tmp_path / 'run'}",
                      f"model_out={tmp_path / 'distilled'}", "distill.n_start=2", "distill.w_min=1.0",
                      "distill.w_max=3.0", "distill.round_updates={1: 1}", "distill.frozen_dtype=bfloat16",
                      "train.checkpoint_every=0", "data.length=4"])
    assert load_index(out).students == {"1": "student-1"} and seen["frozen"] == {torch.bfloat16}
    fp32 = TextToImage.from_folder(str(model)).unet.state_dict()
    assert seen["start"].keys() == fp32.keys() and all(torch.equal(seen["start"][k], fp32[k]) for k in fp32)


def their_mu(theirs, pipe: TextToImage, size: tuple[int, int] | None = None) -> float:
    """diffusers' FluxPipeline's mu (calculate_shift) for `size` (width, height) px: its token count, 2x2 latent
    patches; the grid shift is e^mu."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    _, _, h, w = pipe.latent_shape(1, size)
    config = theirs.scheduler.config
    return calculate_shift((h // 2) * (w // 2), config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                           config.max_shift)


def their_sigmas(theirs, pipe: TextToImage, steps: int, size: tuple[int, int]) -> list[float]:
    """The times diffusers' FluxPipeline samples `size` px on: its sigmas 1 ... 1/N moved by the size's mu."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(theirs.scheduler.config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=their_mu(theirs, pipe, size))
    return scheduler.sigmas[:-1].tolist()


def test_a_student_draws_any_size_on_the_grid_it_learnt(dev, tmp_path, one_thread):
    """A FLUX.1 student records the shift of the grid it was distilled on (the stage's at the model's 32 px) and draws
    128 px on it: its network sees diffusers' sigmas for 32 px, not the 128 px ones the teacher takes there (a
    warning says so). A student saved before students recorded their grid takes the model's resolution's too."""
    theirs, model = dev
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    pipe = TextToImage.from_folder(str(folder), decoder_precision="fp32")
    size, other = (pipe.index.resolution,) * 2, (128, 128)
    learnt, there = their_sigmas(theirs, pipe, 2, size), their_sigmas(theirs, pipe, 2, other)
    assert max(abs(a - b) for a, b in zip(learnt, there)) > 0.02              # 0.04: the size moves the teacher's grid
    student = GuidedStudent.from_teacher(pipe.unet)
    student.grid_shift = stage.student_schedule(pipe).grid_shift
    stage.export_student(student, str(folder), 2, "float32", "flow")
    assert json.loads((folder / "student-2" / "config.json").read_text())["grid_shift"] == student.grid_shift

    def times(pipe: TextToImage, size) -> list[float]:
        """The times (t in [0, 1]) at which student-2's network is called drawing `size`."""
        seen = []
        hook = pipe.student(2).register_forward_pre_hook(
            lambda net, args: seen.append(args[1][0].item() / pipe.index.time_scale))
        _, info = pipe.sample(["a red circle"], steps=2, guidance=2.0, size=size)
        hook.remove()
        assert info["model"] == "student-2"
        return seen

    pipe = TextToImage.from_folder(str(folder), decoder_precision="fp32")
    with pytest.warns(UserWarning, match="student-2 draws 128x128 px on the grid it was distilled on"):
        assert times(pipe, other) == pytest.approx(learnt, abs=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                     # at its own size: no warning
        assert times(pipe, size) == pytest.approx(learnt, abs=1e-6)
    config = json.loads((folder / "student-2" / "config.json").read_text())
    del config["grid_shift"]                                                # as students were saved before
    (folder / "student-2" / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="distilled on"):
        assert times(TextToImage.from_folder(str(folder), decoder_precision="fp32"), other) == pytest.approx(learnt, abs=1e-6)


def test_schnell_is_refused(tmp_path, one_thread):
    """-schnell is step-distilled already and has no guidance input to carry w: the stage says so."""
    write_flux_pipeline(tmp_path, guidance_embeds=False, dynamic=False)
    convert(str(tmp_path / "flux"), str(tmp_path / "model"))
    with pytest.raises(ValueError, match="FLUX.1-schnell teacher: it is step-distilled already"):
        stage.main(["--config", TINY, f"teacher={tmp_path / 'model'}", f"train.output_dir={tmp_path / 'run'}"])
