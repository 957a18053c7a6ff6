"""MultiDiffusion windows (--window) and outpainting (--outpaint) in the pipeline and the CLIs, on a tiny random model."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import img2img, inpaint, txt2img
from ldm.inpaint import outpaint_canvas
from ldm.pipeline import TextToImage

from tests.tiny_models import random_model_with_student

RES = 32      # the tiny model: autoencoder factor 4, U-Net factor 2: sides multiples of 8 px


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread_module):
    return random_model_with_student(tmp_path_factory.mktemp("model"), resolution=RES, w_features=16,
                                     dtype=torch.float16)


@pytest.fixture(scope="module")
def pipe(model):
    return TextToImage.from_folder(model)


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------------------------------- pipeline

@pytest.mark.parametrize("steps, teacher", [(2, False), (3, True)])
def test_native_size_window_is_plain_sampling(pipe, steps, teacher):
    """One window covering the latent: the model itself, bit for bit."""
    plain, _ = pipe.sample(["a red circle"], steps=steps, teacher=teacher, seed=3)
    one, info = pipe.sample(["a red circle"], steps=steps, teacher=teacher, seed=3, window=(RES, 8))
    assert torch.equal(plain, one) and info["windows"] == 1


def test_windows_count_their_evaluations_and_change_a_big_latent(pipe):
    size = (3 * RES, RES)                           # latent 24 x 8: windows of 8 at 0, 4, ..., 16
    plain, info_plain = pipe.sample(["a red circle"] * 2, steps=3, teacher=True, seed=[0, 1], size=size)
    fused, info = pipe.sample(["a red circle"] * 2, steps=3, teacher=True, seed=[0, 1], size=size, window=(RES, 16))
    assert fused.shape == plain.shape == (2, 4, RES // 4, 3 * RES // 4)
    assert info["windows"] == 5 and info["nfe"] == 5 * info_plain["nfe"] == 5 * 3 * 2    # CFG: 2 a window
    assert not torch.allclose(fused, plain)         # the network saw windows, not the whole latent
    single, _ = pipe.sample(["a red circle"], steps=3, teacher=True, seed=[1], size=size, window=(RES, 16))
    torch.testing.assert_close(single[0], fused[1], atol=1e-5, rtol=1e-5)   # samples do not mix across the batch


@pytest.mark.parametrize("size, window, message", [
    ((3 * RES, RES), (2 * RES, 16), "larger than the image"),
    ((3 * RES, RES), (RES, 6), "multiple of 4 px"),
    ((3 * RES, RES), (RES, 40), "no gaps"),
    ((3 * RES, RES), (RES - 4, 8), "multiple of 8"),     # the U-Net cannot take the window
])
def test_window_refusals(pipe, size, window, message):
    with pytest.raises(ValueError, match=message):
        pipe.sample(["a red circle"], steps=2, size=size, window=window)


def test_windows_refuse_sdxl_size_numbers_and_inpainting_unets(pipe, monkeypatch):
    shape = pipe.latent_shape(1, (3 * RES, RES))
    monkeypatch.setattr(pipe.unet.cfg, "added_cond", "text_time", raising=False)
    with pytest.raises(ValueError, match="SDXL"):
        pipe.latent_windows(shape, (RES, 8))
    monkeypatch.undo()
    monkeypatch.setattr(TextToImage, "inpainting_unet", property(lambda self: True))
    with pytest.raises(ValueError, match="inpainting U-Net"):
        pipe.latent_windows(shape, (RES, 8))


# --------------------------------------------------------------------------------------------------------- CLI

def test_txt2img_window_png_settings_and_replay(model, tmp_path, capsys):
    out = tmp_path / "pano.png"
    txt2img.main(["a red circle", "--model", model, "--steps", "2", "--size", f"{3 * RES}x{RES}",
                  "--window", "native:16", "--out", str(out)])
    assert pixels(out).shape == (RES, 3 * RES, 3)
    assert "NFE 10" in capsys.readouterr().out       # 2 student steps x 5 windows
    with Image.open(out) as im:
        text = dict(im.text)
    assert json.loads(text["ldm"])["window"] == f"{RES}:16"
    assert text["parameters"].endswith(f"MultiDiffusion window: {RES}, MultiDiffusion stride: 16")
    txt2img.main(["--replay", str(out), "--out", str(tmp_path / "again.png")])
    assert np.array_equal(pixels(out), pixels(tmp_path / "again.png"))
    txt2img.main(["a red circle", "--model", model, "--steps", "2", "--size", f"{3 * RES}x{RES}",
                  "--out", str(tmp_path / "plain.png")])
    assert not np.array_equal(pixels(out), pixels(tmp_path / "plain.png"))
    txt2img.main(["a red circle", "--model", model, "--steps", "2", "--size", f"{3 * RES}x{RES}",
                  "--window", str(RES), "--out", str(tmp_path / "default.png")])     # default stride SIDE/2
    with Image.open(tmp_path / "default.png") as im:
        assert json.loads(im.text["ldm"])["window"] == f"{RES}:16"
    assert np.array_equal(pixels(out), pixels(tmp_path / "default.png"))


@pytest.mark.parametrize("flag, message", [
    ("64:16", "larger than the image"), (f"{RES}:6", "multiple of 4 px"), ("x:8", "SIDE[:STRIDE]"),
    (f"{RES}:0", "positive")])
def test_txt2img_window_errors_are_usage_errors(model, tmp_path, capsys, flag, message):
    with pytest.raises(SystemExit) as e:
        txt2img.main(["a red circle", "--model", model, "--steps", "2", "--size", f"{3 * RES}x{RES}",
                      "--window", flag, "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def write_image(path, width=RES, height=RES, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def test_img2img_with_windows(model, tmp_path, capsys):
    write_image(tmp_path / "in.png", 3 * RES, RES)
    img2img.main(["a blue square", "--image", str(tmp_path / "in.png"), "--size", f"{3 * RES}x{RES}",
                  "--strength", "1", "--steps", "2", "--window", f"{RES}:16", "--model", model,
                  "--out", str(tmp_path / "out.png")])
    assert pixels(tmp_path / "out.png").shape == (RES, 3 * RES, 3) and "NFE 10" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- outpainting

@pytest.mark.parametrize("fill", ["edge", "noise"])
def test_outpaint_canvas_and_mask(fill):
    image = torch.rand(1, 3, 8, 12) * 2 - 1
    inner = torch.zeros(1, 1, 8, 12)
    inner[..., 2:4, 5:7] = 1
    canvas, mask = outpaint_canvas(image, inner, (4, 0, 8, 12), fill, torch.Generator().manual_seed(0))
    assert canvas.shape == (1, 3, 20, 24) and mask.shape == (1, 1, 20, 24)
    assert torch.equal(canvas[..., 0:8, 4:16], image)                  # the input where it was
    expected = torch.ones(1, 1, 20, 24)                               # the pad, and the given mask inside
    expected[..., 0:8, 4:16] = inner
    assert torch.equal(mask, expected)
    if fill == "edge":                                                 # each pad pixel: its nearest edge pixel
        assert torch.equal(canvas[..., 0:8, 0:4], image[..., :, :1].expand(-1, -1, -1, 4))
        assert torch.equal(canvas[..., 0:8, 16:], image[..., :, -1:].expand(-1, -1, -1, 8))
        assert torch.equal(canvas[..., 8:, 4:16], image[..., -1:, :].expand(-1, -1, 12, -1))
        assert torch.equal(canvas[..., 19, 23], image[..., 7, 11])     # a corner: the corner pixel
    else:
        pad = mask.bool().expand_as(canvas) & ~inside(inner).expand_as(canvas)
        assert canvas[pad].abs().max() <= 1 and canvas[pad].std() > 0.4   # uniform in [-1, 1]: std 0.577


def inside(inner):
    """Where the given mask is 1 inside the canvas of test_outpaint_canvas_and_mask (not the pad)."""
    return torch.nn.functional.pad(inner, (4, 8, 0, 12)).bool()


def test_outpaint_without_a_mask_paints_the_pad_only():
    canvas, mask = outpaint_canvas(torch.zeros(2, 3, 4, 4), None, (0, 4, 0, 0), "edge")
    assert canvas.shape == (2, 3, 8, 4) and torch.equal(mask[:, :, :4], torch.ones(2, 1, 4, 4))
    assert torch.equal(canvas, torch.zeros(2, 3, 8, 4))                # edge pixels of a black image
    assert torch.equal(mask[:, :, 4:], torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="fill"):
        outpaint_canvas(torch.zeros(1, 3, 4, 4), None, (4, 0, 0, 0), "blur")


def test_inpaint_outpaint_keeps_the_input_and_paints_the_border(model, tmp_path, capsys):
    write_image(tmp_path / "in.png")
    inpaint.main(["a red circle", "--image", str(tmp_path / "in.png"), "--outpaint", "8,0,24,8", "--steps", "2",
                  "--model", model, "--out", str(tmp_path / "out.png")])
    out, src = pixels(tmp_path / "out.png"), pixels(tmp_path / "in.png")
    assert out.shape == (RES + 8, RES + 32, 3)
    assert np.array_equal(out[:RES, 8:8 + RES], src)                   # the known region is the input's own
    pad = np.ones(out.shape[:2], bool)
    pad[:RES, 8:8 + RES] = False
    edge = np.pad(src, ((0, 8), (8, 24), (0, 0)), mode="edge")
    assert not np.array_equal(out[pad], edge[pad])                    # the border is painted, not the fill
    with Image.open(tmp_path / "out.png") as im:
        run = json.loads(im.text["ldm"])
    assert run["outpaint"] == [8, 0, 24, 8] and run["outpaint_fill"] == "noise" and run["mask"] is None


def test_inpaint_outpaint_to_a_panorama_with_windows(model, tmp_path, capsys):
    write_image(tmp_path / "in.png")
    inpaint.main(["a red circle", "--image", str(tmp_path / "in.png"), "--outpaint", f"0,0,{2 * RES},0",
                  "--window", f"{RES}:16", "--steps", "2", "--model", model, "--out", str(tmp_path / "out.png")])
    out = pixels(tmp_path / "out.png")
    assert out.shape == (RES, 3 * RES, 3) and np.array_equal(out[:, :RES], pixels(tmp_path / "in.png"))
    assert "NFE 10" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--outpaint", "2,0,0,0"], "multiple of 4 px"),                  # off the latent grid
    (["--outpaint", "4,0,0,0"], "the canvas 36x32"),                  # on it, but the U-Net cannot take 36
    (["--outpaint", "0,0,0"], "LEFT,TOP,RIGHT,BOTTOM"),
    (["--outpaint", "0,0,0,0"], "not all 0"),
    ([], "give --mask"),
])
def test_inpaint_outpaint_errors(model, tmp_path, capsys, args, message):
    write_image(tmp_path / "in.png")
    with pytest.raises(SystemExit) as e:
        inpaint.main(["a red circle", "--image", str(tmp_path / "in.png"), *args, "--steps", "2", "--model", model,
                      "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_documents_outpaint_and_window(capsys):
    with pytest.raises(SystemExit):
        inpaint.main(["--help"])
    text = capsys.readouterr().out
    assert "--outpaint LEFT,TOP,RIGHT,BOTTOM" in text and "--window SIDE[:STRIDE]" in text
