"""FLUX.1 Fill, Depth / Canny and Kontext (ldm.flux_tools) imported from tiny random diffusers pipelines: our model
folder draws what diffusers' FluxFillPipeline, FluxControlPipeline and FluxKontextPipeline draw from the same noise.

The tiny autoencoder downsamples 2x (not FLUX.1's 8x), so Fill's mask takes 2 x 2 = 4 channels a latent pixel
(packed: 64 + 64 + 16 = 144). diffusers samples the autoencoder's posterior for Fill's masked image and the control
image, we take its mode: the reference pipelines here take the mode too (`posterior_mode`)."""
import json

import diffusers
import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from ldm.data.transforms import to_tensor
from ldm.flux_tools import KONTEXT_SIZES, kontext_size
from ldm.models.from_diffusers import convert
from ldm.models.to_diffusers import export
from ldm.pipeline import TextToImage
from sd_layouts import flux_images, write_flux_pipeline

PROMPTS = ["a red cube on a blue floor", "a cat"]


@pytest.fixture
def posterior_mode(monkeypatch):
    """diffusers' Fill and Control pipelines encode with the posterior's mode, as ours do."""
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


def write_tool_pipeline(folder, pipeline_class, in_channels: int):
    """A tiny random FLUX.1-dev-like pipeline of `pipeline_class` at folder/"flux" whose transformer takes
    `in_channels` packed channels (and predicts 64)."""
    return write_flux_pipeline(folder, pipeline_class=pipeline_class, in_channels=in_channels)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB picture (noise through a blur: the tiny autoencoder sees some structure)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, height // 4, width // 4, generator=g), size=(height, width),
                                        mode="bilinear", align_corners=False)
    return Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def rect_mask(width: int, height: int, box) -> Image.Image:
    """White (repaint) inside box = (left, top, right, bottom), black elsewhere; one edge off the latent grid."""
    mask = np.zeros((height, width), np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)


def as_input(image: Image.Image) -> torch.Tensor:
    return to_tensor(image)[None]                                  # (1, 3, H, W) in [-1, 1]


# ---- Fill --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux-fill")
    theirs = write_tool_pipeline(folder, diffusers.FluxFillPipeline, 4 * (16 + 16 + 2 * 2))
    index = convert(str(folder / "flux"), str(folder / "model"))
    return theirs, folder / "model", index


def test_fill_imports(fill, tmp_path):
    _, model, index = fill
    assert index.image_input == "fill" and index.guidance == 29.0 and index.guidance_embed      # scale 30
    assert json.loads((model / "unet" / "config.json").read_text())["in_channels"] == 16 + 16 + 4
    assert TextToImage.from_folder(str(model)).inpainting_unet
    export(str(model), str(tmp_path / "back"))                       # exports as the pipeline class that runs it
    assert type(diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "back"))) is diffusers.FluxFillPipeline


def test_fill_draws_what_diffusers_draws(fill, posterior_mode, one_thread):
    """The masked image's latents and the pixel mask folded 2 x 2 into channels, appended to x at every step: our
    latents decode to diffusers' images; inpaint keeps the unmasked pixels the input's own."""
    theirs, model, _ = fill
    pipe = TextToImage.from_folder(str(model), decoder_precision="fp32")
    for (width, height), box in (((32, 32), (5, 8, 27, 21)), ((48, 32), (0, 0, 17, 32))):
        image, mask = random_image(width, height), rect_mask(width, height, box)
        images, masks = as_input(image), torch.from_numpy(np.asarray(mask) / 255.0).float()[None, None]
        reference = flux_images(theirs, pipe, PROMPTS, 3, 30.0, size=(width, height), image=image, mask_image=mask)
        z, info = pipe.sample(PROMPTS, steps=3, size=(width, height), inpaint=pipe.inpainting_inputs(images, masks))
        assert info["nfe"] == 3
        ours = pipe.decode(z) * 0.5 + 0.5
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
        painted, _ = pipe.inpaint(images, masks, PROMPTS, steps=3)
        torch.testing.assert_close(painted * 0.5 + 0.5, masks * reference + (1 - masks) * (images * 0.5 + 0.5),
                                   atol=1e-5, rtol=0)
    free = pipe.generate(PROMPTS[:1], steps=2)[0]                 # txt2img: all-ones mask over a gray image
    assert free.shape == (1, 3, 32, 32)


def single_file_import(tool, tmp_path, name: str) -> None:
    """The tool pipeline's transformer written in BFL's layout as tmp_path/name, imported by `from_single_file`
    into tmp_path/"single" with the pipeline's text encoders: the folder's index equals the diffusers import's."""
    from safetensors.torch import save_file

    from ldm.models.from_single_file import main as from_single_file
    from tests.models.test_flux_original import _to_original
    theirs, model, _ = tool
    save_file(_to_original(theirs.transformer.state_dict()), str(tmp_path / name))
    pipeline = model.parent / "flux"
    from_single_file([str(tmp_path / name), "--out", str(tmp_path / "single"), "--text-encoders", str(pipeline),
                      "--unet-config", str(pipeline / "transformer" / "config.json")])
    assert json.loads((tmp_path / "single" / "model_index.json").read_text()) == \
        json.loads((model / "model_index.json").read_text())


def test_fill_single_file_and_cli(fill, posterior_mode, tmp_path, one_thread):
    """BFL's flux1-fill-dev.safetensors layout (told by img_in's width) imports to the same folder; ldm.inpaint runs
    on it, keeping the unmasked pixels."""
    from ldm import inpaint
    theirs, model, _ = fill
    single_file_import(fill, tmp_path, "flux1-fill-dev.safetensors")
    image, mask = random_image(32, 32, seed=1), rect_mask(32, 32, (9, 3, 30, 14))
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    inpaint.main(["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "a cat", "--model",
                  str(tmp_path / "single"), "--steps", "2", "--decoder-precision", "fp32", "--out", str(tmp_path / "out.png")])
    out = np.asarray(Image.open(tmp_path / "out.png")).astype(int)
    keep = np.asarray(mask) == 0
    assert np.abs(out - np.asarray(image).astype(int))[keep].max() <= 1          # the kept pixels, rounded
    pipe = TextToImage.from_folder(str(model), decoder_precision="fp32")
    masks = torch.from_numpy(np.asarray(mask) / 255.0).float()[None, None]
    reference = flux_images(theirs, pipe, ["a cat"], 2, 30.0, image=image, mask_image=mask)
    drawn = torch.from_numpy(out.copy()).permute(2, 0, 1)[None] / 255.0
    assert ((drawn - reference).abs() * masks).max() <= 1 / 255 + 1e-4          # the painted ones: diffusers'


# ---- Depth / Canny -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def control(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux-control")
    theirs = write_tool_pipeline(folder, diffusers.FluxControlPipeline, 4 * (16 + 16))
    index = convert(str(folder / "flux"), str(folder / "model"))
    return theirs, folder / "model", index


def test_control_draws_what_diffusers_draws(control, posterior_mode, tmp_path, one_thread, capsys):
    """The control image's latents appended to x at every step (txt2img --control-image): diffusers' images, square
    and 48x32; the control image matters; --controlnet and a missing image are refused."""
    from ldm import txt2img
    theirs, model, index = control
    assert index.image_input == "control" and index.guidance == 9.0
    pipe = TextToImage.from_folder(str(model), decoder_precision="fp32")
    for size in ((32, 32), (48, 32)):
        hint = random_image(*size, seed=2)
        reference = flux_images(theirs, pipe, PROMPTS, 3, 10.0, size=size, control_image=hint)
        with torch.no_grad():
            latents = pipe.encode_images(as_input(hint))
        images, info = pipe.generate(PROMPTS, steps=3, size=size, reference=latents)
        assert info["nfe"] == 3
        torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=1e-5, rtol=0)
    other, _ = pipe.generate(PROMPTS, steps=3, size=size, reference=pipe.encode_images(as_input(random_image(*size))))
    assert (other - images).abs().max() > 0.01
    with pytest.raises(ValueError, match="draws from a control image"):
        pipe.generate(PROMPTS, steps=2)
    hint.save(tmp_path / "depth.png")
    out = tmp_path / "out.png"
    txt2img.main([PROMPTS[1], "--model", str(model), "--control-image", str(tmp_path / "depth.png"), "--size", "48x32",
                  "--steps", "3", "--decoder-precision", "fp32", "--out", str(out)])
    drawn = torch.from_numpy(np.array(Image.open(out))).permute(2, 0, 1) / 255.0
    alone = flux_images(theirs, pipe, PROMPTS[1:], 3, 10.0, size=size, control_image=hint)      # --seed 0, alone
    assert (drawn - alone).abs().max() <= 1 / 255 + 1e-4
    for flags in ([], ["--control-image", str(out), "--controlnet", str(model)]):
        with pytest.raises(SystemExit) as e:
            txt2img.main(["a cat", "--model", str(model), *flags, "--out", str(tmp_path / "x.png")])
        assert e.value.code == 2 and "takes its control image in the net" in capsys.readouterr().err


def test_control_single_file(control, tmp_path):
    """BFL's flux1-depth-dev.safetensors layout (img_in 4 x 32 wide) imports as the diffusers folder does."""
    _, model, _ = control
    single_file_import(control, tmp_path, "flux1-depth-dev.safetensors")
    ours, single = (TextToImage.from_folder(str(m)).unet.state_dict() for m in (model, tmp_path / "single"))
    assert all(torch.equal(ours[k], single[k]) for k in ours) and ours.keys() == single.keys()


# ---- Kontext -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux-kontext")
    theirs = write_tool_pipeline(folder, diffusers.FluxKontextPipeline, 64)
    index = convert(str(folder / "flux"), str(folder / "model"))
    return theirs, folder / "model", index


def test_kontext_single_file_with_its_kind(kontext, tmp_path):
    """A Kontext file has -dev's shapes: --flux-kind kontext gives the diffusers import's index and weights; without
    it the file is -dev; on a -schnell-shaped file, or an SD file, the option is refused."""
    from safetensors.torch import save_file

    from ldm.models.from_single_file import convert as from_single_file
    from tests.models.test_flux_original import _to_original
    theirs, model, index = kontext
    file = tmp_path / "flux1-kontext-dev.safetensors"
    state = _to_original(theirs.transformer.state_dict())
    save_file(state, str(file))
    pipeline = model.parent / "flux"
    common = dict(text_encoders_from=str(pipeline), unet_config=str(pipeline / "transformer" / "config.json"))
    single = from_single_file(str(file), str(tmp_path / "single"), flux_kind="kontext", **common)
    assert single == index
    ours, theirs_net = (TextToImage.from_folder(str(m)).unet.state_dict() for m in (model, tmp_path / "single"))
    assert ours.keys() == theirs_net.keys() and all(torch.equal(ours[k], theirs_net[k]) for k in ours)
    assert from_single_file(str(file), str(tmp_path / "dev"), **common).image_input == ""
    schnell = tmp_path / "schnell.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("guidance_in.")}, str(schnell))
    config = json.loads((pipeline / "transformer" / "config.json").read_text())
    (tmp_path / "schnell.json").write_text(json.dumps({**config, "guidance_embeds": False}))
    with pytest.raises(ValueError, match="--flux-kind kontext, but this is no -dev-shaped"):
        from_single_file(str(schnell), str(tmp_path / "s"), flux_kind="kontext", text_encoders_from=str(pipeline),
                         unet_config=str(tmp_path / "schnell.json"))


def kontext_images(theirs, pipe, prompts, steps, size, image=None):
    """diffusers' Kontext images at `size` exactly (max_area = its area) with `image` taken at its own size."""
    call = {} if image is None else {"_auto_resize": False}
    kontext = lambda prompt, **kwargs: theirs(image=image, prompt=prompt, **kwargs)      # noqa: E731 (image first)
    return flux_images(kontext, pipe, prompts, steps, 2.5, size=size, max_area=size[0] * size[1], **call)


def test_kontext_draws_what_diffusers_draws(kontext, one_thread):
    """The reference latents as tokens after the image's with ids (1, row, col), the prediction of the noisy tokens
    kept: diffusers' images for a reference of another size than the output, both ways round; without a reference,
    Kontext is a text-to-image FLUX.1."""
    theirs, model, index = kontext
    assert index.image_input == "kontext" and index.guidance == 1.5 and index.guidance_embed     # scale 2.5
    pipe = TextToImage.from_folder(str(model), decoder_precision="fp32")
    for size, ref_size in (((32, 32), (40, 24)), ((48, 32), (24, 36))):
        image = random_image(*ref_size, seed=3)
        reference = kontext_images(theirs, pipe, PROMPTS, 3, size, image)
        edited, info = pipe.edit(as_input(image), PROMPTS, steps=3, size=size)
        assert info["nfe"] == 3 and edited.shape[-2:] == (size[1], size[0])
        torch.testing.assert_close(edited * 0.5 + 0.5, reference, atol=1e-5, rtol=0)
    plain, _ = pipe.generate(PROMPTS, steps=3, size=size)
    torch.testing.assert_close(plain * 0.5 + 0.5, kontext_images(theirs, pipe, PROMPTS, 3, size), atol=1e-5, rtol=0)
    assert (plain - edited).abs().max() > 0.01                                       # the reference mattered


def test_kontext_sizes_and_cli(kontext, fill, tmp_path, one_thread, capsys):
    """Kontext's preferred sizes are diffusers'; the img2img CLI edits with the reference at --size, refuses
    --strength; a FLUX.1 other than Kontext and Depth / Canny takes no reference and does not edit."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    from ldm import img2img
    assert list(KONTEXT_SIZES) == [tuple(s) for s in PREFERRED_KONTEXT_RESOLUTIONS]
    assert kontext_size(1920, 1080, 16) == (1392, 752) and kontext_size(500, 500, 16) == (1024, 1024)
    assert kontext_size(1000, 1400, 16) == (880, 1184) and kontext_size(3, 1, 16) == (1568, 672)
    theirs, model, _ = kontext
    image = random_image(44, 28, seed=4)
    image.save(tmp_path / "in.png")
    img2img.main(["--image", str(tmp_path / "in.png"), PROMPTS[1], "--model", str(model), "--size", "44x28",
                  "--steps", "2", "--decoder-precision", "fp32", "--out", str(tmp_path / "out.png")])
    pipe = TextToImage.from_folder(str(model), decoder_precision="fp32")
    drawn = torch.from_numpy(np.array(Image.open(tmp_path / "out.png"))).permute(2, 0, 1) / 255.0
    assert (drawn - kontext_images(theirs, pipe, PROMPTS[1:], 2, (44, 28), image)).abs().max() <= 1 / 255 + 1e-4
    with pytest.raises(SystemExit) as e:
        img2img.main(["--image", str(tmp_path / "in.png"), "x", "--model", str(model), "--strength", "0.5"])
    assert e.value.code == 2 and "no strength to set" in capsys.readouterr().err
    other = TextToImage.from_folder(str(fill[1]))
    with pytest.raises(ValueError, match="reference latents are for FLUX.1 Depth / Canny"):
        other.generate(["x"], steps=1, reference=torch.zeros(1, 16, 16, 16))
    with pytest.raises(ValueError, match="edit needs a FLUX.1 Kontext model"):
        other.edit(as_input(image), ["x"], steps=1)


def test_kontext_cli_resizes_as_diffusers(kontext, tmp_path, one_thread, monkeypatch):
    """Without --size the reference goes to the preferred size nearest its aspect ratio (Lanczos, no crop) and the
    output takes that size: diffusers' _auto_resize, both given a short list of small sizes (the real ones are about
    a megapixel, too big for the tiny autoencoder's 2x)."""
    import diffusers.pipelines.flux.pipeline_flux_kontext as theirs_module

    from ldm import flux_tools, img2img
    small = [(24, 40), (32, 32), (40, 24)]
    monkeypatch.setattr(flux_tools, "KONTEXT_SIZES", tuple(small))
    monkeypatch.setattr(theirs_module, "PREFERRED_KONTEXT_RESOLUTIONS", small)
    theirs, model, _ = kontext
    rng = np.random.default_rng(5)                                        # sharp: the resampling filter shows
    image = Image.fromarray(rng.integers(0, 256, (28, 52, 3), dtype=np.uint8))   # aspect 1.86: 40x24 is nearest
    image.save(tmp_path / "in.png")
    img2img.main(["--image", str(tmp_path / "in.png"), PROMPTS[0], "--model", str(model), "--steps", "2",
                  "--decoder-precision", "fp32", "--out", str(tmp_path / "out.png")])
    drawn = torch.from_numpy(np.array(Image.open(tmp_path / "out.png"))).permute(2, 0, 1) / 255.0
    assert drawn.shape == (3, 24, 40)
    pipe = TextToImage.from_folder(str(model), decoder_precision="fp32")
    kontext = lambda prompt, **kwargs: theirs(image=image, prompt=prompt, **kwargs)      # noqa: E731
    reference = flux_images(kontext, pipe, PROMPTS[:1], 2, 2.5, size=(40, 24), max_area=40 * 24)
    assert (drawn - reference).abs().max() <= 1 / 255 + 1e-4
    processor = theirs.image_processor                                  # the reference pixels themselves
    expected = processor.preprocess(processor.resize(image, 24, 40), 24, 40)
    torch.testing.assert_close(to_tensor(flux_tools.kontext_image(image, 4))[None], expected, atol=1e-6, rtol=0)
