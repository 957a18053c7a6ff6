"""--sampler tcd and --eta (the sampler's noise: DDIM's eta, TCD's gamma) in the CLIs and `TextToImage.sample`,
on a tiny random model folder with one student."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import img2img, txt2img
from ldm.pipeline import TextToImage

from tests.tiny_models import random_model_with_student

RES = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread_module):
    return random_model_with_student(tmp_path_factory.mktemp("model"), resolution=RES, w_features=16)


def draw(model, path, *args):
    txt2img.main(["a red circle", "--model", model, *args, "--out", str(path)])
    return np.asarray(Image.open(path), dtype=np.int16)


def png_text(path):
    with Image.open(path) as im:
        return im.text["parameters"], json.loads(im.text["ldm"])


def test_tcd_sampler_takes_eta_as_gamma(model, tmp_path, capsys):
    """tcd on the lcm grid by default; no --eta is gamma 0.3; --eta 1 is the lcm sampler; the PNG keeps --eta,
    and --replay draws the image again."""
    teacher = ["--teacher", "--steps", "3", "--guidance", "0"]
    plain = draw(model, tmp_path / "plain.png", *teacher, "--sampler", "tcd")
    assert "teacher, 3 steps, tcd (lcm), w=0, NFE 3," in capsys.readouterr().out
    assert "eta" not in png_text(tmp_path / "plain.png")[1]
    assert np.array_equal(plain, draw(model, tmp_path / "03.png", *teacher, "--sampler", "tcd", "--eta", "0.3"))
    assert np.array_equal(draw(model, tmp_path / "lcm.png", *teacher, "--sampler", "lcm"),
                          draw(model, tmp_path / "1.png", *teacher, "--sampler", "tcd", "--eta", "1"))
    zero = draw(model, tmp_path / "0.png", *teacher, "--sampler", "tcd", "--eta", "0")
    assert not np.array_equal(zero, plain)
    assert np.array_equal(zero, draw(model, tmp_path / "0b.png", *teacher, "--sampler", "tcd", "--eta", "0",
                                     "--seed", "0"))
    half = draw(model, tmp_path / "half.png", *teacher, "--sampler", "tcd", "--eta", "0.5")
    parameters, run = png_text(tmp_path / "half.png")
    assert "Sampler: TCD," in parameters and parameters.endswith(", Eta: 0.5") and run["eta"] == 0.5
    capsys.readouterr()
    assert np.array_equal(half, draw(model, tmp_path / "again.png", "--replay", str(tmp_path / "half.png")))


def test_eta_is_ddims_for_teacher_and_student(model, tmp_path, capsys):
    """--eta E with ddim: DDIM's eta (another image for E > 0), in the PNG as A1111's 'Eta DDIM'; students take it."""
    teacher = ["--teacher", "--steps", "3", "--guidance", "1"]
    assert not np.array_equal(draw(model, tmp_path / "t0.png", *teacher),
                              draw(model, tmp_path / "t1.png", *teacher, "--eta", "1"))
    parameters, run = png_text(tmp_path / "t1.png")
    assert parameters.endswith(", Eta DDIM: 1") and run["eta"] == 1.0
    student = draw(model, tmp_path / "s.png", "--steps", "2")
    noisy = draw(model, tmp_path / "s5.png", "--steps", "2", "--eta", "0.5")
    assert "student-2, 2 steps, ddim, w=2, NFE 2," in capsys.readouterr().out.splitlines()[-1]
    assert not np.array_equal(student, noisy) and png_text(tmp_path / "s5.png")[1]["drawn_by"] == "student-2"
    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(img)
    img2img.main(["a blue square", "--image", str(img), "--strength", "0.5", "--steps", "4", "--teacher",
                  "--sampler", "tcd", "--eta", "0.2", "--model", model, "--out", str(tmp_path / "i.png")])
    assert png_text(tmp_path / "i.png")[1]["eta"] == 0.2


@pytest.mark.parametrize("args,message", [
    (["--sampler", "euler", "--eta", "0.5"], "--eta is the noise of --sampler ddim, tcd, "),
    (["--sampler", "lcm", "--eta", "0.5"], "--sampler lcm has no such option"),
    (["--sampler", "tcd", "--eta", "1.5"], "--eta must be in [0, 1], got 1.5"),
    (["--eta", "-0.1"], "--eta must be in [0, 1], got -0.1"),
    (["--eta", "nan"], "--eta must be in [0, 1], got nan"),
])
def test_eta_refusals_are_usage_errors(model, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        txt2img.main(["a red circle", "--model", model, "--teacher", *args, "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_pipeline_eta_option(model):
    """TextToImage.sample(eta=...): the sampler's knob; refused where there is none and outside [0, 1]."""
    pipe = TextToImage.from_folder(model, device="cpu")
    z, info = pipe.sample(["a red circle"], steps=2, teacher=True, guidance=0.0, sampler="tcd")
    assert (info["sampler"], info["spacing"]) == ("tcd", "lcm")
    z1, _ = pipe.sample(["a red circle"], steps=2, teacher=True, guidance=0.0, sampler="tcd", eta=1.0)
    lcm, _ = pipe.sample(["a red circle"], steps=2, teacher=True, guidance=0.0, sampler="lcm")
    torch.testing.assert_close(z1, lcm, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(z, z1)
    for sampler, eta, message in (("heun", 0.5, "--eta is the noise of --sampler ddim, tcd, "),
                                  ("ddim", 2.0, r"eta must be in \[0, 1\], got 2.0")):
        with pytest.raises(ValueError, match=message):
            pipe.sample(["a red circle"], steps=2, teacher=True, sampler=sampler, eta=eta)


def test_eta_is_the_ancestral_samplers_noise(model, tmp_path, capsys):
    """--eta reaches k-diffusion's ancestral samplers: DPM2 a at --eta 0 is DPM2's image exactly, no --eta is their
    full noise (eta 1), and DPM++ 2S a at --eta 0.5 differs from both ends; the PNG says A1111's 'Eta'."""
    teacher = ["--teacher", "--steps", "3", "--guidance", "1"]
    assert np.array_equal(draw(model, tmp_path / "dpm2.png", *teacher, "--sampler", "dpm_2"),
                          draw(model, tmp_path / "a0.png", *teacher, "--sampler", "dpm_2_ancestral", "--eta", "0"))
    assert np.array_equal(draw(model, tmp_path / "a.png", *teacher, "--sampler", "dpm_2_ancestral"),
                          draw(model, tmp_path / "a1.png", *teacher, "--sampler", "dpm_2_ancestral", "--eta", "1"))
    ends = [draw(model, tmp_path / f"s{e}.png", *teacher, "--sampler", "dpmpp_2s_ancestral", "--eta", e)
            for e in ("0", "1")]
    half = draw(model, tmp_path / "s05.png", *teacher, "--sampler", "dpmpp_2s_ancestral", "--eta", "0.5")
    assert not any(np.array_equal(half, end) for end in ends)
    parameters, run = png_text(tmp_path / "s05.png")
    assert "Sampler: DPM++ 2S a," in parameters and parameters.endswith(", Eta: 0.5") and run["eta"] == 0.5


def test_replay_under_a_sampler_without_eta_drops_the_replayed_eta(model, tmp_path, capsys):
    """A dpmpp_sde PNG with --eta 0.3 replayed with --sampler lms: the PNG's eta cannot be cleared by a flag, so it
    is dropped (the lms image drawn afresh); given again with --eta it is still refused."""
    teacher = ["--teacher", "--steps", "3", "--guidance", "1"]
    draw(model, tmp_path / "sde.png", *teacher, "--sampler", "dpmpp_sde", "--eta", "0.3")
    assert png_text(tmp_path / "sde.png")[1]["eta"] == 0.3
    lms = draw(model, tmp_path / "lms.png", *teacher, "--sampler", "lms")
    assert np.array_equal(lms, draw(model, tmp_path / "again.png", "--replay", str(tmp_path / "sde.png"),
                                    "--sampler", "lms"))
    assert "eta" not in png_text(tmp_path / "again.png")[1]
    with pytest.raises(SystemExit) as exit_:
        draw(model, tmp_path / "no.png", "--replay", str(tmp_path / "sde.png"), "--sampler", "lms", "--eta", "0.3")
    assert exit_.value.code == 2 and "--sampler lms has no such option" in capsys.readouterr().err
