"""FLUX.1 (-dev and -schnell) imported from tiny random diffusers pipelines: our model folder draws what diffusers'
FluxPipeline draws from the same noise on the same grid (its resolution-dependent shift, its guidance input)."""
import json

import pytest
import torch

from ldm.models.from_diffusers import convert
from ldm.pipeline import TextToImage
from sd_layouts import flux_images, write_flux_pipeline

PROMPTS = ["a red cube on a blue floor", "a cat"]


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux-dev")
    return write_flux_pipeline(folder), folder


def test_flux_dev_draws_what_diffusers_draws(dev, tmp_path, one_thread, capsys):
    """-dev: one net call a step with the guidance scale 1 + w as its input (no CFG), the dynamic shift of the
    drawn size's token count, square and 48x32; the folder records both."""
    theirs, folder = dev
    index = convert(str(folder / "flux"), str(tmp_path / "model"))
    assert index.guidance_embed and index.guidance == 2.5 and index.dynamic_shift["max_shift"] == 1.15
    assert json.loads((tmp_path / "model" / "unet" / "config.json").read_text())["kind"] == "flux"
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    for size in (None, (48, 32)):
        images, info = pipe.generate(PROMPTS, steps=4, seed=0, size=size)
        assert info["nfe"] == 4                                              # guidance is an input: no CFG
        reference = flux_images(theirs, pipe, PROMPTS, 4, 3.5, size=size)
        torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=2e-4, rtol=0)
    half = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32", dtype=torch.bfloat16)
    bf16, _ = half.generate(PROMPTS, steps=4, seed=0, size=(48, 32))    # bf16 weights: close, not equal
    assert 0 < ((bf16 * 0.5 + 0.5) - reference).abs().mean() < 5e-3
    other, _ = pipe.generate(PROMPTS, steps=4, seed=0, guidance=0.0)
    assert ((other * 0.5 + 0.5) - flux_images(theirs, pipe, PROMPTS, 4, 3.5)).abs().max() > 0.01  # the input mattered
    with pytest.raises(ValueError, match="takes no negative prompt"):
        pipe.generate(PROMPTS, steps=2, negative="blurry")
    with pytest.raises(ValueError, match="FreeU works on U-Nets"):
        pipe.set_freeu((1.1, 1.2, 0.9, 0.2))
    from ldm import txt2img
    for flag, message in ((["--negative", "blurry"], "distilled into the net"), (["--clip-skip", "2"], "pooled output")):
        with pytest.raises(SystemExit) as e:
            txt2img.main(["a cat", "--model", str(tmp_path / "model"), *flag, "--out", str(tmp_path / "x.png")])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_flux_schnell_draws_what_diffusers_draws(tmp_path, one_thread):
    """-schnell: no guidance input, no CFG at w = 0 (its default), a fixed grid (shift 1)."""
    theirs = write_flux_pipeline(tmp_path, guidance_embeds=False, dynamic=False)
    index = convert(str(tmp_path / "flux"), str(tmp_path / "model"))
    assert not index.guidance_embed and index.guidance == 0.0 and index.dynamic_shift is None
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    images, info = pipe.generate(PROMPTS, steps=2, seed=3)
    assert info["nfe"] == 2
    torch.testing.assert_close(images * 0.5 + 0.5, flux_images(theirs, pipe, PROMPTS, 2, 0.0, seed=3),
                               atol=2e-4, rtol=0)
