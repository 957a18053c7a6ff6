"""The CFG++ samplers through TextToImage and ldm.txt2img on a tiny random model: the unconditional branch reaches the
sampler through cfg's wrapper and the NFE counter; with the negative prompt equal to the prompt (cond = uncond) or
w = -1 (the paper's lambda = 0) each equals its plain twin; students and wrappers without that branch refused."""
import re

import pytest
import torch

from ldm import txt2img
from ldm.cli import CLI_SAMPLERS
from ldm.diffusion.samplers import CFG_PP_SAMPLERS
from ldm.pipeline import TextToImage

from tests.tiny_models import random_model_with_student

TWIN = {"euler_cfg_pp": "ddim", "dpmpp_2m_cfg_pp": "dpmpp_2m", "euler_ancestral_cfg_pp": "euler_a",
        "dpmpp_2s_ancestral_cfg_pp": "dpmpp_2s_ancestral"}


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread_module):
    return random_model_with_student(tmp_path_factory.mktemp("model"), resolution=32, w_features=16,
                                     dtype=torch.float16)


@pytest.fixture(scope="module")
def pipe(model):
    return TextToImage.from_folder(model, decoder_precision="fp32")


@pytest.mark.parametrize("name", sorted(CFG_PP_SAMPLERS))
def test_equals_its_twin_when_the_negative_is_the_prompt(pipe, name):
    """--negative = the prompt: both halves of the 2B pass see the same text, eps_u is the guided eps."""
    runs = {(s, negative): pipe.sample(["a red circle on the left"], steps=4, teacher=True, sampler=s, guidance=2.0,
                                       seed=3, negative=negative)[0]
            for s in (name, TWIN[name]) for negative in ("a red circle on the left", "")}
    # euler_a steps y = x / alpha, 22026 x at this cosine schedule's first time: float32 rounds y - D to ~1e-3 (ddim,
    # the dpmpp twins and the CFG++ forms step x: 1e-6). euler, in y too, is ddim's and euler_cfg_pp's ODE step
    tol = 5e-3 if name == "euler_ancestral_cfg_pp" else 1e-5
    torch.testing.assert_close(runs[name, "a red circle on the left"], runs[TWIN[name], "a red circle on the left"],
                               rtol=0, atol=tol)
    assert (runs[name, ""] - runs[TWIN[name], ""]).abs().max() > 0.1        # the empty prompt's uncond: they differ


@pytest.mark.parametrize("name", ["euler_cfg_pp", "dpmpp_2m_cfg_pp"])
def test_w_minus_one_is_the_unconditional_twin(pipe, name):
    """guided = uncond at w = -1: x0-hat and renoising both unconditional, as the plain sampler at w = -1."""
    a, info = pipe.sample(["a green triangle"], steps=5, teacher=True, sampler=name, guidance=-1.0, seed=1)
    b, _ = pipe.sample(["a green triangle"], steps=5, teacher=True, sampler=TWIN[name], guidance=-1.0, seed=1)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert info["nfe"] == 10 and info["sampler"] == name


def test_txt2img_counts_two_calls_a_step_even_at_w_0(model, tmp_path, capsys):
    assert set(CFG_PP_SAMPLERS) <= set(CLI_SAMPLERS)
    for sampler in sorted(CFG_PP_SAMPLERS):
        for w in ("1", "0"):
            txt2img.main(["a red circle", "--model", model, "--steps", "3", "--teacher", "--sampler", sampler,
                          "--guidance", w, "--out", str(tmp_path / f"{sampler}{w}.png")])
            calls = 2 * 3 - 1 if sampler == "dpmpp_2s_ancestral_cfg_pp" else 3    # its last step: one call
            assert f"teacher, 3 steps, {sampler}, w={w}, NFE {2 * calls}," in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--steps", "2"], "a CFG\\+\\+ --sampler .* needs the teacher"),                     # student-2 fits
    (["--steps", "3", "--teacher", "--guidance-interval", "0.5:10"], "--sampler euler_cfg_pp \\(CFG\\+\\+\\)"),
    (["--steps", "3", "--teacher", "--guidance-rescale", "0.7"], "--sampler euler_cfg_pp \\(CFG\\+\\+\\)"),
    (["--steps", "3", "--teacher", "--eta", "0.5"], "--sampler euler_cfg_pp has no such option"),
])
def test_refusals_are_usage_errors(model, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        txt2img.main(["a red circle", "--model", model, "--sampler", "euler_cfg_pp", *args,
                      "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_ancestral_ones_take_eta(model, tmp_path, capsys):
    for sampler in ("euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp"):
        txt2img.main(["a red circle", "--model", model, "--steps", "2", "--teacher", "--sampler", sampler,
                      "--eta", "0.5", "--guidance", "0.5", "--out", str(tmp_path / f"{sampler}.png")])
        assert f"{sampler}, w=0.5" in capsys.readouterr().out


@pytest.mark.parametrize("prompt", ["a [red:blue:0.5] circle", "a [red|blue] circle", "a red circle AND a blue square"])
def test_prompt_editing_and_composition_are_usage_errors(model, tmp_path, capsys, prompt):
    """Prompt editing, alternation and AND swap the model function for one without CFG's unconditional branch:
    refused before any model runs, naming the sampler (was the pipeline's ValueError, a traceback)."""
    with pytest.raises(SystemExit) as e:
        txt2img.main([prompt, "--model", model, "--sampler", "euler_cfg_pp", "--steps", "3", "--teacher",
                      "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--sampler euler_cfg_pp (CFG++)" in err, err


def test_inpaint_with_a_plain_unet_is_a_usage_error(model, tmp_path, capsys):
    """A plain U-Net inpaints by holding the known latents at every step (a mask around the model function), which
    gives no unconditional branch: refused up front, naming the sampler (was a traceback from the pipeline)."""
    from PIL import Image
    from ldm import inpaint
    Image.new("RGB", (32, 32), (90, 90, 90)).save(tmp_path / "in.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    with pytest.raises(SystemExit) as e:
        inpaint.main(["a red circle", "--model", model, "--image", str(tmp_path / "in.png"), "--mask",
                      str(tmp_path / "mask.png"), "--sampler", "euler_cfg_pp", "--steps", "3", "--teacher",
                      "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--sampler euler_cfg_pp (CFG++)" in err and "mask" in err, err
