"""An SD-inpainting model (a U-Net with 4 + 1 + 4 input channels) imported and run as diffusers'
StableDiffusionInpaintPipeline runs it: the same latents from the same noise, mask and masked image."""
import pytest
import torch
from sd_layouts import PROMPTS, on_our_grid, write_sd_pipeline

from ldm.bench_models import TINY
from ldm.diffusion.samplers import initial_noise
from ldm.models.from_diffusers import convert
from ldm.pipeline import TextToImage

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpainting")
    theirs = write_sd_pipeline(root, unet_options={"in_channels": 9})
    convert(str(root / "sd"), str(root / "model"))
    return root, theirs


def test_inpainting_unet_draws_what_diffusers_draws(setup, one_thread):
    root, theirs = setup
    pipe = TextToImage.from_folder(str(root / "model"), decoder_precision="fp32")
    assert pipe.inpainting_unet
    side = TINY.image
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, side, side, generator=g) * 2 - 1
    masks = torch.zeros(2, 1, side, side)
    masks[:, :, 4:20, 6:26] = 1
    extra = pipe.inpainting_inputs(images, masks)
    assert extra.shape == (2, 5, side // 2, side // 2)
    # the mask channel on the latent grid, and the latents of the image with the hole at 0 (gray)
    torch.testing.assert_close(extra[:, :1], torch.nn.functional.interpolate(masks, size=(side // 2, side // 2)))
    torch.testing.assert_close(extra[:, 1:], pipe.encode_images(torch.where(masks > 0, 0.0, images)))
    z, info = pipe.sample(PROMPTS, steps=4, seed=0, inpaint=extra)   # n divides T: diffusers' DDIM steps on our grid
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(4), pipe.latent_shape(2),
                          generator=torch.Generator().manual_seed(0))
    inpaint = diffusers.StableDiffusionInpaintPipeline(**theirs.components)
    on_our_grid(inpaint)
    with torch.no_grad():
        reference = inpaint(PROMPTS, image=images * 0.5 + 0.5, mask_image=masks, masked_image_latents=extra[:, 1:],
                            latents=noise, strength=1.0, num_inference_steps=4,
                            guidance_scale=1 + pipe.index.guidance, output_type="latent").images
    torch.testing.assert_close(z, reference, atol=1e-4, rtol=1e-4)
    out, _ = pipe.inpaint(images, masks, PROMPTS, steps=4, seed=0)          # the CLI's path: pasted back
    torch.testing.assert_close(out * (1 - masks), images * (1 - masks))
    torch.testing.assert_close(out * masks, (pipe.decode(z) * masks))


def test_txt2img_with_an_inpainting_model_paints_everything(setup, one_thread):
    root, _ = setup
    pipe = TextToImage.from_folder(str(root / "model"), decoder_precision="fp32")
    blank = torch.zeros(1, 3, TINY.image, 2 * TINY.image)
    z, _ = pipe.sample(PROMPTS[:1], steps=2, seed=0, size=(2 * TINY.image, TINY.image))
    same, _ = pipe.sample(PROMPTS[:1], steps=2, seed=0, size=(2 * TINY.image, TINY.image),
                          inpaint=pipe.inpainting_inputs(blank, torch.ones_like(blank[:, :1])))
    torch.testing.assert_close(z, same)
    assert z.shape == (1, 4, TINY.image // 2, TINY.image)
