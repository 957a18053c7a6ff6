"""InstructPix2Pix (Brooks et al. 2023): a diffusers StableDiffusionInstructPix2PixPipeline imported, and our edit
drawing what diffusers' pipeline draws from the same noise and image (DDIM on our trailing grid), at several
(text, image) guidance scales; the img2img CLI's flags, PNG settings, replay and refusals."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sd_layouts import PROMPTS, on_our_grid, write_sd_pipeline, write_sdxl_pipeline

from ldm.bench_models import TINY
from ldm.diffusion.samplers import initial_noise
from ldm.models.from_diffusers import convert
from ldm.pipeline import TextToImage, load_index

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random InstructPix2Pix pipeline (SD's U-Net with 4 + 4 input channels) saved and imported."""
    root = tmp_path_factory.mktemp("ip2p")
    sd = write_sd_pipeline(root, unet_options={"in_channels": 8})
    theirs = diffusers.StableDiffusionInstructPix2PixPipeline(**sd.components)
    theirs.save_pretrained(str(root / "ip2p"))
    convert(str(root / "ip2p"), str(root / "model"))
    return root, theirs


def test_import_records_the_image_input(setup):
    root, _ = setup
    index = load_index(str(root / "model"))
    assert (index.image_input, index.guidance, index.prediction) == ("instruct-pix2pix", 6.5, "eps")


def images_in(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, TINY.image, TINY.image, generator=g) * 2 - 1


@pytest.mark.parametrize("text_scale,image_scale,nfe", [(7.5, 1.5, 3), (3.0, 2.5, 3), (1.0, 1.0, 1)])
def test_edit_draws_what_diffusers_draws(setup, one_thread, text_scale, image_scale, nfe):
    """Eq. 3 with s_T = 1 + w, s_I = image_guidance: the latents diffusers' pipeline reaches from the same noise and
    the same image; (1, 1) is the conditional model alone (diffusers then runs no guidance, one call a step)."""
    root, theirs = setup
    pipe = TextToImage.from_folder(str(root / "model"), decoder_precision="fp32")
    images, steps = images_in(), 4                      # 4 divides T: diffusers' DDIM steps on our grid
    side = TINY.image
    z, info = pipe.sample(PROMPTS, steps=steps, seed=0, guidance=text_scale - 1, image_guidance=image_scale,
                          size=(side, side), reference=pipe.encode_images(images) / pipe.autoencoder.config.scaling_factor)
    assert info["nfe"] == nfe * steps and info["image_guidance"] == image_scale
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(steps), pipe.latent_shape(2),
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = on_our_grid(theirs)(PROMPTS, image=images * 0.5 + 0.5, latents=noise, num_inference_steps=steps,
                                        guidance_scale=text_scale, image_guidance_scale=image_scale,
                                        output_type="latent").images
    assert reference.std() > 0.1
    # the random U-Net's eps is large: latents reach ~60, so fp32 rounding is judged against their scale
    err = ((z - reference).abs().max() / reference.abs().max()).item()
    assert err < 1e-5, err                              # 1.6e-6 seen (9.3e-5 absolute at (7.5, 1.5))
    edited, info = pipe.edit(images, PROMPTS, steps=steps, seed=0, guidance=text_scale - 1,
                             image_guidance=image_scale)                  # the same through edit()
    torch.testing.assert_close(edited, pipe.decode(z), atol=1e-5, rtol=0)


def test_sdxl_edit_draws_what_diffusers_draws(tmp_path, one_thread):
    """StableDiffusionXLInstructPix2PixPipeline: SDXL's U-Net with 4 + 4 channels, both encoders, the size numbers in
    all three parts and zeroed embeddings for the empty prompt, as diffusers' pipeline runs them."""
    import inspect
    xl = write_sdxl_pipeline(tmp_path, unet_options={"in_channels": 8})
    cls = diffusers.StableDiffusionXLInstructPix2PixPipeline
    parts = inspect.signature(cls.__init__).parameters
    theirs = cls(**{k: v for k, v in xl.components.items() if k in parts}, add_watermarker=False)
    theirs.save_pretrained(str(tmp_path / "ip2p"))
    assert convert(str(tmp_path / "ip2p"), str(tmp_path / "model")).image_input == "instruct-pix2pix"
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    side, steps = pipe.index.resolution, 4
    images = images_in(3)
    z, _ = pipe.sample(PROMPTS, steps=steps, seed=0, guidance=6.5, image_guidance=1.5, size=(side, side),
                       reference=pipe.encode_images(images) / pipe.autoencoder.config.scaling_factor)
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(steps), pipe.latent_shape(2),
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = on_our_grid(theirs)(PROMPTS, image=images * 0.5 + 0.5, latents=noise, num_inference_steps=steps,
                                        guidance_scale=7.5, image_guidance_scale=1.5, output_type="latent").images
    err = ((z - reference).abs().max() / reference.abs().max()).item()
    assert err < 1e-5, err                              # 1.7e-6 seen (1.1e-4 absolute)


def test_image_latents_are_the_unscaled_posterior_mode(setup, one_thread):
    """diffusers' prepare_image_latents: vae.encode(image).latent_dist.mode(), not times scaling_factor."""
    from ldm.instruct_pix2pix import image_latents
    root, theirs = setup
    pipe = TextToImage.from_folder(str(root / "model"), decoder_precision="fp32")
    images = images_in(1, batch=1)
    with torch.no_grad():
        expected = theirs.vae.encode(images).latent_dist.mode()
    assert theirs.vae.config.scaling_factor != 1
    torch.testing.assert_close(image_latents(pipe, images), expected, atol=1e-5, rtol=1e-5)


def test_pix2pix_cfg_is_equation_3():
    """The wrapper against eq. 3 written out on a model whose output is known per branch."""
    from ldm.diffusion.guidance import pix2pix_cfg

    def model(x, t, context, image):                       # a linear toy: text and image shift the output
        return x * 0 + context[:, :1, None, None] * 10 + image.mean(dim=(1, 2, 3), keepdim=True) + t
    x = torch.randn(2, 1, 2, 2)
    context, image = torch.tensor([[1.0], [2.0]]), torch.full((2, 1, 2, 2), 3.0)
    null_text, null_image = {"context": torch.tensor([[-1.0]])}, {"image": torch.zeros(1, 1, 2, 2)}
    w, s_i = 4.0, 1.7
    out = pix2pix_cfg(model, w, s_i, null_text, null_image)(x, torch.tensor(0.5), context=context, image=image)
    both = model(x, 0.5, context, image)
    image_only = model(x, 0.5, torch.tensor([[-1.0], [-1.0]]), image)
    neither = model(x, 0.5, torch.tensor([[-1.0], [-1.0]]), torch.zeros_like(image))
    torch.testing.assert_close(out, neither + s_i * (image_only - neither) + (1 + w) * (both - image_only))


def test_sample_refusals(setup):
    root, _ = setup
    pipe = TextToImage.from_folder(str(root / "model"), decoder_precision="fp32")
    with pytest.raises(ValueError, match="edits an image"):
        pipe.sample(PROMPTS[:1], steps=1)                   # txt2img on an InstructPix2Pix model
    latents = torch.zeros(1, 4, TINY.latent, TINY.latent)
    with pytest.raises(ValueError, match="--guidance-rescale"):
        pipe.sample(PROMPTS[:1], steps=1, reference=latents, guidance_rescale=0.7)
    with pytest.raises(ValueError, match="do not fit"):
        pipe.sample(PROMPTS[:1], steps=1, reference=latents, size=(2 * TINY.image, TINY.image))


def write_png(path, width=38, height=30, seed=0):
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return Image.fromarray(pixels)


def test_cli_edits_records_and_replays(setup, tmp_path, one_thread, capsys):
    """python -m ldm.img2img on an InstructPix2Pix model: the image's own size floored to the networks' multiple,
    pipe.edit's image, both scales in the PNG (A1111's "Image CFG scale"), and --replay draws it again."""
    from ldm import img2img
    from ldm.data.transforms import to_tensor
    root, _ = setup
    model = str(root / "model")
    source = write_png(tmp_path / "in.png")
    common = ["--model", model, "--steps", "2", "--decoder-precision", "fp32", "--prompt-weights", "off"]
    img2img.main(["--image", str(tmp_path / "in.png"), "make it blue", "--guidance", "2", "--image-guidance", "1.2",
                  "--out", str(tmp_path / "a.png"), *common])
    assert "NFE 6" in capsys.readouterr().out                           # 3 calls a step
    pipe = TextToImage.from_folder(model, decoder_precision="fp32")
    multiple = pipe.autoencoder.config.downsample_factor * pipe.unet.cfg.downsample_factor
    size = (38 // multiple * multiple, 30 // multiple * multiple)
    image = to_tensor(source.resize(size, Image.LANCZOS))[None]
    edited, _ = pipe.edit(image, ["make it blue"], steps=2, guidance=2.0, image_guidance=1.2, seed=0)
    with Image.open(tmp_path / "a.png") as im:
        drawn, text = np.asarray(im).astype(int), dict(im.text)
    assert drawn.shape == (size[1], size[0], 3)
    expected = (edited[0].permute(1, 2, 0) * 127.5 + 127.5).clamp(0, 255).numpy()
    assert np.abs(drawn - expected).max() <= 1                           # uint8 rounding
    assert "CFG scale: 3, Image CFG scale: 1.2," in text["parameters"]   # s_T = 1 + w
    run = json.loads(text["ldm"])
    assert (run["edit"], run["image_guidance"], run["guidance"]) == ("instruct-pix2pix", 1.2, 2.0)
    fp32 = ["--decoder-precision", "fp32"]                               # not a setting of the image: not replayed
    img2img.main(["--replay", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png"), *fp32])
    img2img.main(["--replay", str(tmp_path / "a.png"), "--image-guidance", "1", "--out", str(tmp_path / "c.png"),
                  *fp32])
    with Image.open(tmp_path / "b.png") as b, Image.open(tmp_path / "c.png") as c:
        assert np.array_equal(np.asarray(b), drawn)
        assert not np.array_equal(np.asarray(c), drawn)                  # a flag given with --replay wins
        assert json.loads(c.text["ldm"])["image_guidance"] == 1.0


def test_cli_refusals(setup, tmp_path, capsys):
    from ldm import img2img
    root, _ = setup
    model = str(root / "model")
    write_png(tmp_path / "in.png")
    cases = [(["make it blue", "--model", model], "--image IN.png"),                         # no image
             (["--image", str(tmp_path / "in.png"), "x", "--model", model, "--strength", "0.5"], "no strength"),
             (["--image", str(tmp_path / "in.png"), "x", "--model", model, "--guidance-rescale", "0.7"],
              "--guidance-rescale is not supported with an InstructPix2Pix"),
             (["--image", str(tmp_path / "in.png"), "x", "--model", model, "--t2i-adapter", "shapes64-edges-adapter",
               "--adapter-image", str(tmp_path / "in.png")],                          # not dropped in silence
              "--t2i-adapter is not supported with an InstructPix2Pix"),
             (["--image", str(tmp_path / "in.png"), "x", "--model", model, "--sampler", "euler_cfg_pp"],  # no traceback
              "--sampler euler_cfg_pp (CFG++)"),
             (["--image", str(tmp_path / "in.png"), "x", "--image-guidance", "1.5"],            # the shipped model
              "--image-guidance is for InstructPix2Pix models")]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            img2img.main(argv)
        assert message in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(SystemExit):
        img2img.main(["--replay", str(tmp_path / "plain.png")])
    assert "no settings of ours" in capsys.readouterr().err
    from ldm import inpaint, txt2img                # they draw no image input: a usage error, not a traceback
    Image.new("L", (38, 30), 255).save(tmp_path / "mask.png")
    for main, argv in [(txt2img.main, ["make it blue", "--model", model, "--steps", "1"]),
                       (inpaint.main, ["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                                       "make it blue", "--model", model, "--steps", "1"])]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and "python -m ldm.img2img --image" in capsys.readouterr().err
