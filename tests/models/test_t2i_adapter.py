"""T2I-Adapter (ldm.models.t2i_adapter) against diffusers: random diffusers T2IAdapters (full_adapter,
full_adapter_xl, light_adapter) read into ours give the same features as diffusers' T2IAdapter; our U-Net adds
them where UNet2DConditionModel adds down_intrablock_additional_residuals; txt2img with them draws what
StableDiffusionAdapterPipeline and StableDiffusionXLAdapterPipeline draw from the same weights and noise
(MultiAdapter, adapter_conditioning_scale and _factor included)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sd_layouts import PROMPTS, diffusers_images, write_sd_pipeline, write_sdxl_pipeline

from ldm.models.convert_unet import diffusers_to_ours, unet_config_from_diffusers
from ldm.models.from_diffusers import convert
from ldm.models.t2i_adapter import AdapterSteps, T2IAdapter, load_t2i_adapter
from ldm.models.unet import UNet
from ldm.pipeline import TextToImage

diffusers = pytest.importorskip("diffusers")

# SD's level layout at toy widths: two transformer levels, then a plain one without a downsampler (SD 1.x's last)
SD_UNET = dict(block_out_channels=(32, 64, 64), down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2)
# SDXL's: a plain level (its feature after the downsampler), two transformer levels, the middle block
SDXL_UNET = dict(block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                 up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), attention_head_dim=(2, 4, 4),
                 transformer_layers_per_block=(1, 1, 2))
# The tiny VAE halves (f = 2): pixel strides 2, 4, 8 on SD's layout, 4, 4, 8, 8 on SDXL's
ADAPTERS = {"full": dict(adapter_type="full_adapter", channels=(32, 64, 64), num_res_blocks=2, downscale_factor=2),
            "light": dict(adapter_type="light_adapter", in_channels=1, channels=(32, 64), num_res_blocks=2,
                          downscale_factor=2),
            "xl": dict(adapter_type="full_adapter_xl", channels=(32, 64, 64, 64), num_res_blocks=1, downscale_factor=4)}


def write_adapter(folder, name: str, seed: int):
    """A random diffusers T2IAdapter of ADAPTERS[name], biases made non-zero too, saved in folder / name."""
    torch.manual_seed(seed)
    net = diffusers.T2IAdapter(**ADAPTERS[name])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.save_pretrained(str(folder / name))
    return net.eval()


def sd_adapter_pipeline(theirs, adapter):
    """StableDiffusionAdapterPipeline on `theirs`' components (it takes no image encoder) with `adapter`."""
    parts = {k: v for k, v in theirs.components.items() if k != "image_encoder"}
    return diffusers.StableDiffusionAdapterPipeline(**parts, adapter=adapter, requires_safety_checker=False)


def sd_adapter_images(theirs, pipe, steps: int, w: float, **call) -> torch.Tensor:
    """diffusers_images for StableDiffusionAdapterPipeline, whose decode gives numpy (B, H, W, 3) whatever the
    output_type: as (B, 3, H, W) in [0, 1]."""
    images = diffusers_images(theirs, pipe, PROMPTS[:1], steps, w, **call)
    return torch.from_numpy(images).permute(0, 3, 1, 2) if isinstance(images, np.ndarray) else images


def hint_png(path, side: int, channels: int, seed: int = 0) -> torch.Tensor:
    """A random control image saved as a PNG, returned as diffusers takes it: (1, C, H, W) in [0, 1]."""
    pixels = (np.random.default_rng(seed).random((side, side, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert("L" if channels == 1 else "RGB")
    image.save(path)
    array = np.asarray(image, dtype=np.float32) / 255
    return torch.from_numpy(array.reshape(side, side, -1)).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(root, diffusers SD pipeline of SD's layout, {name: diffusers T2IAdapter}), our model in root / "model"."""
    root = tmp_path_factory.mktemp("t2i")
    theirs = write_sd_pipeline(root, unet_options=SD_UNET)
    convert(str(root / "sd"), str(root / "model"))
    return root, theirs, {name: write_adapter(root, name, seed) for seed, name in enumerate(("full", "light"))}


@pytest.mark.parametrize("name, size", [("full", (32, 48)), ("light", (32, 32)), ("xl", (48, 32)),
                                        ("full", (24, 40))])      # sides not a power of 2: the pools round up
def test_features_equal_diffusers_t2i_adapter(tmp_path, name, size):
    theirs = write_adapter(tmp_path, name, seed=3)
    ours = load_t2i_adapter(str(tmp_path / name))
    image = torch.rand(2, theirs.config.in_channels, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, features = theirs(image), ours(image)
    assert len(features) == len(reference) == len(ours.strides)
    for f, r, stride, width in zip(features, reference, ours.strides, ours.widths):
        assert f.shape == r.shape == (2, width, -(-size[0] // stride), -(-size[1] // stride))
        torch.testing.assert_close(f, r, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="must divide by its downscale_factor"):
        ours(image[..., :-1])


@pytest.mark.parametrize("layout, name", [(SD_UNET, "full"), (SD_UNET, "light"), (SDXL_UNET, "xl")])
def test_unet_adds_features_where_diffusers_adds_intrablock_residuals(tmp_path, layout, name):
    """Our U-Net given the features = UNet2DConditionModel given them as down_intrablock_additional_residuals
    (SDXL's layout: the fourth on the middle block); an adapter for other widths is refused by name."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**{**dict(sample_size=16, layers_per_block=1, attention_head_dim=2,
                                                    cross_attention_dim=32, norm_num_groups=8), **layout}).eval()
    ours = UNet(unet_config_from_diffusers(dict(unet.config))).eval()
    ours.load_state_dict(diffusers_to_ours(unet.state_dict(), 3))
    adapter = write_adapter(tmp_path, name, seed=1)
    ours_adapter = load_t2i_adapter(str(tmp_path / name))
    ours_adapter.check_base(ours, latent_factor=2)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 700.0])
    context = torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        features = adapter(torch.rand(2, adapter.config.in_channels, 32, 32, generator=g))
        reference = unet(x, t, context, down_intrablock_additional_residuals=[f.clone() for f in features]).sample
        plain = unet(x, t, context).sample
        torch.testing.assert_close(ours(x, t, context, adapter=features), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x, t, context), plain, atol=1e-5, rtol=1e-5)
    assert (reference - plain).abs().max() > 1e-2                          # the features mattered
    other = T2IAdapter("full_adapter", 3, (32, 32, 64), 1, 2)
    with pytest.raises(ValueError, match="does not fit this U-Net"):
        other.check_base(ours, latent_factor=2)


def test_txt2img_with_adapters_draws_what_diffusers_draws(sd, tmp_path, one_thread, capsys):
    """--t2i-adapter at --adapter-scale 0.8 = StableDiffusionAdapterPipeline at adapter_conditioning_scale 0.8; two
    (an RGB full and a gray light one) = its MultiAdapter; scale 0 is no adapter; the PNG replays."""
    from ldm import txt2img
    root, theirs, adapters = sd
    side, steps = 32, 4                 # 4 divides T = 1000: diffusers' DDIM grid is ours
    rgb, gray = hint_png(tmp_path / "rgb.png", side, 3), hint_png(tmp_path / "gray.png", side, 1, seed=1)
    model = ["--model", str(root / "model"), "--steps", str(steps), "--decoder-precision", "fp32"]
    one = ["--t2i-adapter", str(root / "full"), "--adapter-image", str(tmp_path / "rgb.png")]
    txt2img.main([PROMPTS[0], *model, *one, "--adapter-scale", "0.8", "--out", str(tmp_path / "one.png")])
    pipe = TextToImage.from_folder(str(root / "model"), decoder_precision="fp32")
    w = 1 + pipe.index.guidance
    single = sd_adapter_pipeline(theirs, adapters["full"])
    reference = sd_adapter_images(single, pipe, steps, w, image=rgb, adapter_conditioning_scale=0.8)
    drawn = np.asarray(Image.open(tmp_path / "one.png"), dtype=np.int16)
    assert np.abs(drawn - np.round(reference[0].permute(1, 2, 0).numpy() * 255)).max() <= 1     # PNG rounding
    full = load_t2i_adapter(str(root / "full"))
    ours, _ = pipe.generate(PROMPTS[:1], steps=steps, seed=0, adapter=[(full, rgb, 0.8)])
    diff = (ours * 0.5 + 0.5 - reference).abs().max().item()
    print(f"SD full_adapter, 4 DDIM steps, CFG: max |ours - diffusers| = {diff:.2e}")
    assert diff < 1e-5
    plain, _ = pipe.generate(PROMPTS[:1], steps=steps, seed=0)
    assert (ours - plain).abs().max() > 0.05                                # the adapter mattered
    zero, _ = pipe.generate(PROMPTS[:1], steps=steps, seed=0, adapter=[(full, rgb, 0.0)])
    assert torch.equal(zero, plain)

    run = json.loads(Image.open(tmp_path / "one.png").text["ldm"])
    assert (run["t2i_adapter"], run["adapter_scale"]) == ([str(root / "full")], [0.8])
    assert Image.open(tmp_path / "one.png").text["parameters"].endswith(
        ', ControlNet 0: "Model: full, Weight: 0.8, Guidance Start: 0, Guidance End: 1"')   # as A1111 writes units
    txt2img.main(["--replay", str(tmp_path / "one.png"), "--decoder-precision", "fp32",
                  "--out", str(tmp_path / "again.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png"), dtype=np.int16), drawn)

    two = [*one, "--t2i-adapter", str(root / "light"), "--adapter-image", str(tmp_path / "gray.png")]
    txt2img.main([PROMPTS[0], *model, *two, "--adapter-scale", "0.5", "--adapter-scale", "0.7",
                  "--out", str(tmp_path / "two.png")])
    multi = sd_adapter_pipeline(theirs, diffusers.MultiAdapter([adapters["full"], adapters["light"]]))
    reference = sd_adapter_images(multi, pipe, steps, w, image=[rgb, gray], adapter_conditioning_scale=[0.5, 0.7])
    drawn = np.asarray(Image.open(tmp_path / "two.png"), dtype=np.int16)
    assert np.abs(drawn - np.round(reference[0].permute(1, 2, 0).numpy() * 255)).max() <= 1

    for bad, message in (([*one, "--t2i-adapter", str(root / "light")], "go together, one each"),
                         ([*one, "--adapter-factor", "1.5"], "in [0, 1]"),
                         (["--t2i-adapter", str(tmp_path), "--adapter-image", str(tmp_path / "rgb.png")],
                          "not a diffusers T2IAdapter folder")):
        with pytest.raises(SystemExit):
            txt2img.main([PROMPTS[0], *model, *bad])
        assert message in capsys.readouterr().err


def test_adapter_steps_are_diffusers_conditioning_factor():
    """Step i of n acts when i < int(n * factor), as StableDiffusionXLAdapterPipeline (0.29 of 100: 28 steps)."""
    grid = torch.arange(1000, 0, -10, dtype=torch.float64) - 1
    steps = AdapterSteps([0.29, 1.0, 0.0], grid)
    on = [steps(torch.tensor([t], dtype=torch.float32)) for t in grid.tolist()]
    assert [sum(column) for column in zip(*on)] == [28, 100, 0]
    assert on[27][0] and not on[28][0]


def test_sdxl_adapter_draws_what_diffusers_draws(tmp_path_factory, one_thread):
    """A full_adapter_xl on SDXL's layout (its fourth feature on the middle block) at scale 0.9 over the first
    half of 4 steps = StableDiffusionXLAdapterPipeline with adapter_conditioning_factor 0.5."""
    root = tmp_path_factory.mktemp("t2i-xl")
    theirs = write_sdxl_pipeline(root, unet_options={**SDXL_UNET, "layers_per_block": 1})
    convert(str(root / "sdxl"), str(root / "model"), guidance=3.0)
    net = write_adapter(root, "xl", seed=2)
    pipe = TextToImage.from_folder(str(root / "model"), decoder_precision="fp32")
    hint = hint_png(root / "hint.png", 32, 3)
    xl = diffusers.StableDiffusionXLAdapterPipeline(**theirs.components, adapter=net)
    ours = load_t2i_adapter(str(root / "xl"))
    for factor in (0.5, 1.0):
        images, _ = pipe.generate(PROMPTS[:1], steps=4, seed=0, adapter=[(ours, hint, 0.9, factor)])
        reference = diffusers_images(xl, pipe, PROMPTS[:1], 4, 4.0, image=hint, adapter_conditioning_scale=0.9,
                                     adapter_conditioning_factor=factor)
        diff = (images * 0.5 + 0.5 - reference).abs().max().item()
        print(f"SDXL full_adapter_xl, factor {factor}: max |ours - diffusers| = {diff:.2e}")
        assert diff < 1e-5
    half, _ = pipe.generate(PROMPTS[:1], steps=4, seed=0, adapter=[(ours, hint, 0.9, 0.5)])
    assert (half - images).abs().max() > 1e-3                             # the factor mattered


def test_students_refuse_an_adapter(tmp_path, capsys):
    """Like a ControlNet, an adapter steers the teacher only: a student never saw its features."""
    from ldm import txt2img
    from tests.tiny_models import random_model_with_student
    folder = random_model_with_student(tmp_path / "model", steps=2)
    with pytest.raises(SystemExit):
        txt2img.main(["a cat", "--model", folder, "--steps", "2", "--t2i-adapter", str(tmp_path),
                      "--adapter-image", str(tmp_path / "x.png")])
    assert "--t2i-adapter needs the teacher" in capsys.readouterr().err
