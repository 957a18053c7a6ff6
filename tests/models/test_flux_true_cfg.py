"""FLUX.1-dev's "true CFG" (sample(true_cfg=s), the CLI's --true-cfg S) against diffusers' FluxPipeline(true_cfg_scale=s,
negative_prompt=...): our CFG at w = s - 1 around the guidance-bound net, both halves at the distilled scale, on a tiny
random -dev; with an IP-Adapter the negative half sees a black image, as diffusers' default negative_ip_adapter_image."""
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sd_layouts import flux_images, ip_image, write_flux_pipeline, write_image_encoder

from ldm.models.from_diffusers import convert
from ldm.pipeline import TextToImage, save_random_model

diffusers = pytest.importorskip("diffusers")
PROMPTS = ["a red cube on a blue floor", "a cat"]
NEGATIVE = "a blurry picture"

# the IP-Adapter helpers of test_flux_ip_adapter.py (pytest's importlib mode puts no test folder on sys.path)
_spec = importlib.util.spec_from_file_location("flux_ip_helpers", Path(__file__).with_name("test_flux_ip_adapter.py"))
flux_ip = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flux_ip)


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """A tiny random FLUX.1-dev (diffusers' pipeline) and its import."""
    folder = tmp_path_factory.mktemp("flux-true-cfg")
    theirs = write_flux_pipeline(folder)
    convert(str(folder / "flux"), str(folder / "model"))
    return theirs, folder / "model"


def test_true_cfg_draws_what_diffusers_draws(dev, one_thread):
    """s = 4 with a negative prompt: two calls a step, diffusers' images; s = 1 is the plain -dev image, bit for bit."""
    theirs, model = dev
    pipe = TextToImage.from_folder(str(model), decoder_precision="fp32")
    ours, info = pipe.generate(PROMPTS, steps=3, seed=0, true_cfg=4.0, negative=NEGATIVE)
    assert info["nfe"] == 6
    reference = flux_images(theirs, pipe, PROMPTS, 3, 3.5, true_cfg_scale=4.0, negative_prompt=NEGATIVE)
    print("max |ours - diffusers|", ((ours * 0.5 + 0.5) - reference).abs().max().item())
    torch.testing.assert_close(ours * 0.5 + 0.5, reference, atol=1e-5, rtol=0)
    plain, info = pipe.generate(PROMPTS, steps=3, seed=0)
    assert (ours - plain).abs().max() > 1e-2                                # the negative half mattered
    one, info = pipe.generate(PROMPTS, steps=3, seed=0, true_cfg=1.0, negative=NEGATIVE)
    assert info["nfe"] == 3 and torch.equal(one, plain)
    empty, _ = pipe.generate(PROMPTS, steps=3, seed=0, true_cfg=4.0)        # default negative: the empty prompt
    torch.testing.assert_close(empty * 0.5 + 0.5, flux_images(theirs, pipe, PROMPTS, 3, 3.5, true_cfg_scale=4.0,
                                                              negative_prompt=""), atol=1e-5, rtol=0)


def test_true_cfg_with_image_prompt(dev, tmp_path, one_thread):
    """With an IP-Adapter: the negative half takes the black image's tokens (diffusers' negative_ip_adapter_image
    default) besides the negative prompt."""
    theirs, model = dev
    adapter = flux_ip.write_xlabs_adapter(tmp_path / "ip_adapter.safetensors", theirs.transformer)
    encoder = write_image_encoder(tmp_path / "image_encoder")
    pipe = TextToImage.from_folder(str(model), decoder_precision="fp32")
    pipe.add_ip_adapter(str(adapter), str(encoder), scale=0.7)
    image = ip_image()
    ours, info = pipe.generate(PROMPTS, steps=2, seed=0, ip_image=image, true_cfg=3.0, negative=NEGATIVE)
    assert info["nfe"] == 4
    with_ip = flux_ip.with_flux_ip_adapter(theirs, encoder, adapter, 0.7)
    try:
        reference = flux_images(with_ip, pipe, PROMPTS, 2, 3.5, ip_adapter_image=image, true_cfg_scale=3.0,
                                negative_prompt=NEGATIVE)
    finally:
        with_ip.unload_ip_adapter()                  # the transformer is the module fixture's: give it back plain
    print("max |ours - diffusers|", ((ours * 0.5 + 0.5) - reference).abs().max().item())
    torch.testing.assert_close(ours * 0.5 + 0.5, reference, atol=1e-5, rtol=0)


def test_png_replay_carries_true_cfg(dev, tmp_path, one_thread):
    """--true-cfg S goes into the PNG (diffusers' s, as given) and --replay draws the same image again."""
    _, model = dev
    from ldm import txt2img
    common = ["--decoder-precision", "fp32"]
    txt2img.main(["a cat", "--model", str(model), "--steps", "2", "--true-cfg", "4", "--negative", NEGATIVE,
                  "--out", str(tmp_path / "a.png"), *common])
    with Image.open(tmp_path / "a.png") as im:
        run, parameters, first = json.loads(im.text["ldm"]), im.text["parameters"], np.asarray(im)
    assert run["true_cfg"] == 4.0 and run["negative"] == NEGATIVE
    assert "CFG scale: 3.5, True CFG scale: 4, " in parameters
    txt2img.main(["--replay", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png"), *common])
    with Image.open(tmp_path / "b.png") as im:
        assert json.loads(im.text["ldm"]) == run and np.array_equal(np.asarray(im), first)
    txt2img.main(["--replay", str(tmp_path / "a.png"), "--true-cfg", "1", "--out", str(tmp_path / "c.png"), *common])
    with Image.open(tmp_path / "c.png") as im:                        # a flag given with --replay still wins
        assert json.loads(im.text["ldm"])["true_cfg"] == 1.0
        assert not np.array_equal(np.asarray(im), first)


def test_refusals(dev, tmp_path, capsys, one_thread):
    """A -dev negative prompt without true CFG, a -dev guidance rescale (with true CFG too), true CFG on a model with
    real CFG, on a student, below 1: usage errors that say what to give instead; Python's ValueErrors say the same
    (`TextToImage.check_guidance`, naming the CLI's flags)."""
    _, model = dev
    pipe = TextToImage.from_folder(str(model))
    with pytest.raises(ValueError, match="--negative: .* so it takes no negative prompt: add --true-cfg S"):
        pipe.generate(PROMPTS, steps=1, negative=NEGATIVE)
    for true_cfg in (None, 4.0):                        # once ignored silently by the pipeline
        with pytest.raises(ValueError, match="--guidance-rescale: this model's guidance is distilled into the net"):
            pipe.generate(PROMPTS, steps=1, guidance_rescale=0.7, true_cfg=true_cfg)
    with pytest.raises(ValueError, match="--true-cfg must be >= 1 .*, got 0.5"):
        pipe.generate(PROMPTS, steps=1, true_cfg=0.5)
    save_random_model(str(tmp_path / "unet-model"))
    with pytest.raises(ValueError, match=r"real CFG: give --guidance W = S - 1 \(--guidance 3 for --true-cfg 4\)"):
        TextToImage.from_folder(str(tmp_path / "unet-model")).generate(PROMPTS, steps=1, true_cfg=4.0)
    students = tmp_path / "with-student"                  # a -dev folder that names a 2-step student
    shutil.copytree(model, students)
    index = json.loads((students / "model_index.json").read_text())
    (students / "model_index.json").write_text(json.dumps({**index, "students": {"2": "student-2"}}))
    with pytest.raises(ValueError, match="--true-cfg needs the teacher"):   # refused before the student loads
        TextToImage.from_folder(str(students)).generate(PROMPTS, steps=2, true_cfg=4.0)
    from ldm import txt2img
    for folder, flags, message in (
            (model, ["--negative", "blurry"], "takes no negative prompt: add --true-cfg S"),
            (model, ["--true-cfg", "4", "--guidance-rescale", "0.7"], "--guidance-rescale: this model's guidance is"),
            (tmp_path / "unet-model", ["--true-cfg", "4"], "real CFG: give --guidance W = S - 1 (--guidance 3 for"),
            (model, ["--true-cfg", "0.5"], "--true-cfg must be >= 1"),
            (students, ["--true-cfg", "4"], "--true-cfg needs the teacher")):
        with pytest.raises(SystemExit) as e:
            txt2img.main(["a cat", "--model", str(folder), "--steps", "2", *flags, "--out", str(tmp_path / "x.png")])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_cfg_pp_samplers_take_true_cfg_and_need_it(dev, tmp_path, capsys, one_thread):
    """A CFG++ sampler renoises with CFG's unconditional prediction: FLUX.1-dev runs CFG only with true CFG (s > 1),
    where it takes both halves (with the negative = the prompt it is its plain twin, euler_cfg_pp = ddim); without
    it ldm.txt2img refuses before any model runs, naming --true-cfg (was the pipeline's ValueError, a traceback)."""
    _, model = dev
    pipe = TextToImage.from_folder(str(model), decoder_precision="fp32")
    pp, info = pipe.sample(PROMPTS, steps=3, seed=0, true_cfg=4.0, negative=PROMPTS[0], sampler="euler_cfg_pp")
    twin, _ = pipe.sample(PROMPTS, steps=3, seed=0, true_cfg=4.0, negative=PROMPTS[0], sampler="ddim")
    assert info["nfe"] == 6
    torch.testing.assert_close(pp[0], twin[0], rtol=0, atol=1e-4)       # prompt 0: cond = uncond
    from ldm import txt2img
    for flags in ([], ["--true-cfg", "1"]):
        with pytest.raises(SystemExit) as e:
            txt2img.main(["a cat", "--model", str(model), "--steps", "2", "--sampler", "euler_cfg_pp", *flags,
                          "--out", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--sampler euler_cfg_pp (CFG++)" in err and "--true-cfg S" in err, err
