"""Inpainting with a denoising strength below 1 (SDEdit inside the mask) and the "fill" masked content."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import img2img, inpaint, txt2img
from ldm.inpaint import fill_masked
from ldm.pipeline import TextToImage

from tests.tiny_models import save_random_model, write_image_and_mask


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread_module):
    folder = tmp_path_factory.mktemp("model")
    save_random_model(str(folder), resolution=32)
    return str(folder)


def test_all_ones_mask_at_a_strength_is_img2img(model):
    """A mask over everything holds nothing: inpaint at strength s draws img2img's image at s, step for step."""
    pipe = TextToImage.from_folder(model, decoder_precision="fp32")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ones = torch.ones(2, 1, 32, 32)
    kw = dict(steps=6, seed=3, teacher=True, sampler="ddim")
    painted, info = pipe.inpaint(images, ones, ["a red circle", "a blue square"], strength=0.5, **kw)
    edited, info2 = pipe.img2img(images, ["a red circle", "a blue square"], strength=0.5, **kw)
    assert info["steps"] == info2["steps"] == 3
    torch.testing.assert_close(painted, edited, atol=1e-6, rtol=0)
    full, info3 = pipe.inpaint(images, ones, ["a red circle", "a blue square"], **kw)   # strength 1: 6 steps
    assert info3["steps"] == 6 and (full - painted).abs().max() > 1e-2


def test_strength_keeps_the_unmasked_pixels_and_the_layout(model, tmp_path, capsys):
    src, mask = write_image_and_mask(tmp_path)
    outs = {}
    for strength in ("1", "0.25"):
        out = tmp_path / f"out{strength}.png"
        inpaint.main(["a red circle", "--image", src, "--mask", mask, "--steps", "8", "--teacher", "--model", model,
                      "--strength", strength, "--out", str(out)])
        outs[strength] = np.asarray(Image.open(out)).astype(float)
    assert "2 steps" in capsys.readouterr().out                      # round(0.25 * 8)
    source = np.asarray(Image.open(src)).astype(float)
    keep = np.asarray(Image.open(mask)) == 0
    for out in outs.values():
        assert np.array_equal(out[keep], source[keep])
    # a low strength stays near the picture under the mask; from pure noise it does not
    near = np.abs(outs["0.25"][~keep] - source[~keep]).mean()
    assert near < np.abs(outs["1"][~keep] - source[~keep]).mean()
    with Image.open(tmp_path / "out0.25.png") as im:
        assert json.loads(im.text["ldm"])["strength"] == 0.25
        assert ", Denoising strength: 0.25" in im.text["parameters"]      # A1111's key
    with Image.open(tmp_path / "out1.png") as im:
        assert "Denoising strength" not in im.text["parameters"]


def test_img2img_and_hires_write_a1111_denoising_keys(model, tmp_path):
    src, _ = write_image_and_mask(tmp_path)
    img2img.main(["a red circle", "--image", src, "--steps", "4", "--teacher", "--model", model, "--strength", "0.6",
                  "--out", str(tmp_path / "i.png")])
    txt2img.main(["a red circle", "--steps", "2", "--teacher", "--model", model, "--hires", "2:0.5",
                  "--out", str(tmp_path / "h.png")])
    with Image.open(tmp_path / "i.png") as i, Image.open(tmp_path / "h.png") as h:
        assert ", Denoising strength: 0.6," in i.text["parameters"] + ","
        assert ", Denoising strength: 0.5, Hires upscale: 2, Hires upscaler: Latent" in h.text["parameters"]


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_strength_out_of_range_is_a_usage_error(model, tmp_path, capsys, value):
    src, mask = write_image_and_mask(tmp_path)
    with pytest.raises(SystemExit):
        inpaint.main(["x", "--image", src, "--mask", mask, "--model", model, "--strength", value])
    assert "--strength must be in (0, 1]" in capsys.readouterr().err


def test_fill_is_the_normalised_convolution():
    """At the first blur every masked pixel a kept one reaches is sum g keep img / sum g keep, written out here
    pixel by pixel (the blur's Gaussian is cut at 3 sigma); kept pixels are the image's."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 12, 14, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 12, 14)
    mask[..., 3:9, 4:10] = 1
    out = fill_masked(image, mask, sigma=2.0)
    assert torch.equal(out * (1 - mask), image * (1 - mask))
    img, keep = image[0].double().numpy(), 1 - mask[0, 0].double().numpy()
    ys, xs = np.mgrid[:12, :14]
    for y, x in [(3, 4), (5, 7), (8, 9), (6, 5)]:
        dy, dx = np.abs(ys - y), np.abs(xs - x)
        w = np.exp(-0.5 * (dy / 2.0) ** 2) * np.exp(-0.5 * (dx / 2.0) ** 2) * (dy <= 6) * (dx <= 6) * keep
        expected = (img * w).sum(axis=(1, 2)) / w.sum()
        np.testing.assert_allclose(out[0, :, y, x].double().numpy(), expected, atol=1e-5)


def test_fill_reproduces_constants_and_reaches_far_holes():
    colour = torch.tensor([0.3, -0.5, 0.9]).view(1, 3, 1, 1)
    image = colour.expand(2, 3, 64, 64).clone()
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, 2:62, 2:62] = 1                                      # a hole far wider than the first blur
    mask[1] = 1                                                     # nothing kept: mid-gray
    image[:, :, 10:50, 10:50] = 5.0                                 # under the mask: must not leak in
    out = fill_masked(image, mask)
    torch.testing.assert_close(out[0], colour[0].expand(3, 64, 64), atol=1e-5, rtol=0)
    assert torch.equal(out[1], torch.zeros(3, 64, 64))


def test_masked_content_fill_starts_from_the_filled_picture(model, tmp_path):
    src, mask = write_image_and_mask(tmp_path)
    args = ["a red circle", "--image", src, "--mask", mask, "--steps", "8", "--teacher", "--model", model,
            "--strength", "0.5"]
    inpaint.main(args + ["--out", str(tmp_path / "orig.png")])
    inpaint.main(args + ["--masked-content", "fill", "--out", str(tmp_path / "fill.png")])
    orig, fill = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("orig", "fill"))
    keep = np.asarray(Image.open(mask)) == 0
    assert np.array_equal(orig[keep], fill[keep]) and not np.array_equal(orig[~keep], fill[~keep])
    with Image.open(tmp_path / "fill.png") as im:
        assert json.loads(im.text["ldm"])["masked_content"] == "fill"
