"""stages/distill_lcm.py with configs/lcm/tiny.yaml on tiny random teacher folders: it writes an LCM-LoRA file in
diffusers' layout that merges into the teacher as the trained updates act and draws through txt2img's lcm sampler;
its first online prediction is the teacher's conditional one; `--resume latest` repeats a straight run exactly; on a
discrete schedule it trains on diffusers' LCM timesteps and the pipeline samples on them; bad keys are refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from stage_scripts import load_stage

from ldm import txt2img
from ldm.diffusion.param import Denoiser
from ldm.distill.lcm import lora_bypassed
from ldm.pipeline import TextToImage, load_index, save_index, save_random_model
from ldm.training import find_latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "lcm" / "tiny.yaml")
stage = load_stage("distill_lcm")
pytestmark = pytest.mark.usefixtures("one_thread_module")


def argv(teacher, out, *extra) -> list[str]:
    return ["--config", TINY, f"teacher={teacher}", f"train.output_dir={out}", "train.max_steps=2",
            "train.checkpoint_every=1", *extra]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """The tiny random folder: cosine log-SNR (continuous), v-prediction, as the shipped model."""
    folder = tmp_path_factory.mktemp("teacher")
    save_random_model(str(folder), resolution=32)
    return folder


@pytest.fixture(scope="module")
def straight(teacher, tmp_path_factory):
    """(output folder, LoRA file, [max |online f - the base net's conditional f|] of each update) of a 2-update run."""
    out, gaps = tmp_path_factory.mktemp("straight"), []
    real = stage.consistency

    def consistency(model, z, t, schedule, **cond):
        f = real(model, z, t, schedule, **cond)
        if torch.is_grad_enabled():                       # the online call (the targets run under no_grad)
            with torch.no_grad(), lora_bypassed(model.net):
                gaps.append((f - real(model, z, t, schedule, **cond)).abs().max().item())
        return f
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage, "consistency", consistency)
        path = stage.main(argv(teacher, out))
    return out, path, gaps


def test_writes_an_lcm_lora_that_merges_exactly_and_draws_through_txt2img(straight, teacher, tmp_path, capsys):
    out, path, _ = straight
    assert path == out / "lcm_lora.safetensors" and (out / "samples" / "step-000002.png").is_file()
    assert Image.open(out / "samples" / "step-000002.png").size == (2 * 34 + 2, 3 * 34 + 2)   # rows: 1, 2, 4 steps
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    settings = json.loads(meta["lcm"])
    assert meta["kind"] == "lcm-lora" and settings["n_grid"] == 50 and settings["skip"] == 1
    assert (settings["w_min"], settings["w_max"], settings["teacher"], settings["step"]) == (1.0, 3.0, str(teacher), 2)
    assert json.loads(meta["lora_adapter_metadata"])["unet.r"] == 4
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert any(".time_emb_proj." in k for k in keys) and any(".ff.net.2." in k for k in keys)

    # The trained updates (the checkpoint's trainable weights, on the stage's own LoRA net) against the file merged
    # into a fresh teacher by the pipeline's --lora: the same x0-predictions.
    trained = TextToImage.from_folder(str(teacher))
    stage.add_updates(trained.unet, stage.LoRASettings(rank=4, targets=stage.LoRASettings().targets))
    updates = load_file(str(find_latest_checkpoint(out) / "model.safetensors"))
    assert all(".lora_" in k for k in updates) and any(v.abs().max() > 0 for k, v in updates.items() if "lora_B" in k)
    trained.unet.load_state_dict(updates, strict=False)
    merged = TextToImage.from_folder(str(teacher))
    assert merged.add_lora(str(path)) == len(updates) // 2
    gen = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([0.26, 0.76])
    cond = merged.encode_prompts(["a red circle", ""])
    x0 = [Denoiser(p.unet, p.schedule, p.index.prediction, p.index.time_scale)(z, t, **cond) for p in (trained, merged)]
    torch.testing.assert_close(x0[1], x0[0], rtol=1e-5, atol=1e-5)
    with lora_bypassed(trained.unet):
        base = Denoiser(trained.unet, trained.schedule, "v", 1000.0)(z, t, **cond)
    assert (base - x0[0]).abs().max() > 1e-4                                         # the updates do something

    png = tmp_path / "lcm.png"
    txt2img.main(["a red circle", "--model", str(teacher), "--lora", str(path), "--teacher", "--sampler", "lcm",
                  "--spacing", "lcm", "--steps", "4", "--guidance", "0", "--out", str(png)])
    assert "teacher, 4 steps, lcm (lcm), w=0, NFE 4" in capsys.readouterr().out
    assert Image.open(png).size == (32, 32)


def test_the_first_online_prediction_is_the_teachers_conditional_one(straight):
    _, _, gaps = straight
    assert len(gaps) == 2 and gaps[0] == 0.0        # B = 0: the LoRA net is the frozen base, bit for bit
    assert gaps[1] > 1e-6                           # after one update it is not


def test_resume_latest_repeats_the_straight_run(straight, teacher, tmp_path):
    _, path, _ = straight
    stage.main(argv(teacher, tmp_path, "train.max_steps=1", "val.steps=[1]"))
    resumed = stage.main(argv(teacher, tmp_path, "val.steps=[1]", "--resume", "latest"))
    a, b = load_file(str(path)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(resumed), "pt") as f:
        assert json.loads(f.metadata()["lcm"])["step"] == 2


def test_a_discrete_teacher_trains_on_diffusers_lcm_timesteps_and_samples_on_them(tmp_path, monkeypatch):
    """An eps-predicting teacher on SD's scaled_linear schedule (our tiny U-Net; an SD import has the same schedule):
    the pairs are (t_{n+1}, t_n) of 19, 39, ..., 999 (0 below 19), and --sampler lcm defaults to the lcm grid."""
    folder = tmp_path / "teacher"
    save_random_model(str(folder), resolution=32)
    index = load_index(str(folder))
    index.schedule, index.prediction, index.time_scale = {"name": "scaled_linear"}, "eps", 1.0
    save_index(str(folder), index)
    pairs, real = [], stage.draw_pairs
    monkeypatch.setattr(stage, "draw_pairs", lambda *args: pairs.append(real(*args)) or pairs[-1])
    path = stage.main(argv(folder, tmp_path / "out", "train.max_steps=1", "train.batch_size=8", "val.steps=[2]",
                           "lora.targets=[to_q,to_v]"))
    s, t = (torch.cat(x) for x in zip(*pairs))
    assert len(s) == 8 and set(s.tolist()) <= {20.0 * n - 1 for n in range(1, 51)}
    assert torch.equal(t, torch.where(s == 19, 0.0, s - 20))
    pipe = TextToImage.from_folder(str(folder))
    targets = [n for n, _ in pipe.unet.named_modules() if n.endswith((".to_q", ".to_v"))]
    assert len(targets) >= 4 and pipe.add_lora(str(path)) == len(targets)
    images, info = pipe.generate(["a red circle"], steps=4, guidance=0.0, teacher=True, sampler="lcm")
    assert info["spacing"] == "lcm" and info["nfe"] == 4 and bool(torch.isfinite(images).all())


def test_bad_keys_are_refused_by_name_and_help_explains(teacher, tmp_path, capsys):
    for bad, named in (("lcm.skips=2", "lcm.skips"), ("lora.targets=[conv1]", "lora.targets"),
                       ("lcm.loss=l1", "lcm.loss")):
        with pytest.raises(SystemExit) as exit_:
            stage.main(argv(teacher, tmp_path, bad))
        assert exit_.value.code == 2 and named in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        stage.main(["--config", TINY, f"train.output_dir={tmp_path}"])
    assert exit_.value.code == 2 and "teacher=DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        stage.main(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and "Latent consistency distillation" in text and "lcm.target_decay" in text
