"""--control-range through the edits: ldm.img2img, ldm.inpaint (an SD-inpainting U-Net) and txt2img --hires (its
second pass) draw what diffusers' StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetInpaintPipeline
and StableDiffusionControlNetPipeline + Img2Img draw with control_guidance_start / _end, on tiny random SD models.
The range counts the steps that run (img2img: round(strength x steps) of them), as diffusers' controlnet_keep does.

diffusers samples the autoencoder's posterior where we take its mode; the references here take the mode too."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sd_layouts import PROMPTS, on_our_grid, write_sd_pipeline

from ldm.bench_models import TINY
from ldm.diffusion.samplers import initial_noise
from ldm.models.from_diffusers import convert
from ldm.pipeline import TextToImage

diffusers = pytest.importorskip("diffusers")
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402

SCALE = 0.8


@pytest.fixture
def posterior_mode(monkeypatch):
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny SD model, an SD-inpainting one (4 + 1 + 4 channels) of the same widths, a random ControlNetModel made
    from the plain U-Net (it reads the 4 latent channels for both), an image, a mask and a control image."""
    root = tmp_path_factory.mktemp("control_range_edits")
    theirs = write_sd_pipeline(root / "plain")
    inpainting = write_sd_pipeline(root / "inpainting", unet_options={"in_channels": 9})
    convert(str(root / "plain" / "sd"), str(root / "model"))
    convert(str(root / "inpainting" / "sd"), str(root / "inpaint-model"))
    torch.manual_seed(1)
    net = diffusers.ControlNetModel.from_unet(theirs.unet, conditioning_embedding_out_channels=(16, 32))  # f = 2
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                p.normal_(0, 0.1)                         # zero-initialised: a trained one's are not
    net.save_pretrained(str(root / "cn"))
    side = TINY.image
    smooth = lambda seed: F.interpolate(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed)),  # noqa
                                        size=(side, side), mode="bilinear", align_corners=False)
    for name, seed in (("image", 1), ("hint", 2)):
        Image.fromarray((smooth(seed)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(root / f"{name}.png")
    mask = np.zeros((side, side), np.uint8)
    mask[4:20, 6:26] = 255                               # on the latent grid: max-pool and nearest agree
    Image.fromarray(mask).save(root / "mask.png")
    return root, theirs, inpainting, net


def png(path) -> torch.Tensor:
    """A PNG as (1, C, H, W) in [0, 1]."""
    a = np.asarray(Image.open(path), dtype=np.float32) / 255
    return torch.from_numpy(a if a.ndim == 3 else a[..., None]).permute(2, 0, 1)[None]


def assert_drawn(path, reference: torch.Tensor, plain: torch.Tensor) -> None:
    """The PNG at `path` is `reference` (1, 3, H, W) in [0, 1] up to PNG rounding, and not `plain`."""
    drawn = png(path)
    diff = (drawn - reference).abs().max().item()
    print(f"{path.name}: max |ours - diffusers| = {diff * 255:.3f} / 255")
    assert diff <= 1 / 255 + 1e-5
    assert (drawn - plain).abs().max() > 4 / 255                              # the range mattered


def cli_args(root, steps: int, control_range: str) -> list[str]:
    return ["--steps", str(steps), "--controlnet", str(root / "cn"), "--control-image", str(root / "hint.png"),
            "--control-scale", str(SCALE), "--control-range", control_range, "--decoder-precision", "fp32"]


def test_img2img_control_range_equals_diffusers(setup, posterior_mode, tmp_path, one_thread):
    """img2img at strength 0.75 of 4 steps runs 3; 0.5:1 acts on the last of them (i / 3 >= 0.5), as
    StableDiffusionControlNetImg2ImgPipeline's control_guidance_start=0.5 (a range over the whole grid would
    act on two)."""
    from ldm import img2img
    root, theirs, _, net = setup
    out = tmp_path / "img2img.png"
    img2img.main([PROMPTS[0], "--model", str(root / "model"), "--image", str(root / "image.png"), "--strength", "0.75",
                  *cli_args(root, 4, "0.5:1"), "--out", str(out)])
    pipe = on_our_grid(diffusers.StableDiffusionControlNetImg2ImgPipeline(**theirs.components, controlnet=net))
    w = TextToImage.from_folder(str(root / "model")).index.guidance
    call = dict(image=png(root / "image.png"), control_image=png(root / "hint.png"), strength=0.75,
                num_inference_steps=4, guidance_scale=1 + w, controlnet_conditioning_scale=SCALE, output_type="pt")
    with torch.no_grad():
        reference = pipe(PROMPTS[0], control_guidance_start=0.5, generator=torch.Generator().manual_seed(0),
                         **call).images
        throughout = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **call).images
    assert_drawn(out, reference, throughout)


def test_inpaint_control_range_equals_diffusers(setup, posterior_mode, tmp_path, one_thread):
    """An SD-inpainting model with a ControlNet over 0.25:0.75 of 4 steps (steps 1 and 2) = diffusers'
    StableDiffusionControlNetInpaintPipeline at strength 1 from the same noise, the kept pixels pasted back."""
    from ldm import inpaint
    root, _, inpainting, net = setup
    out = tmp_path / "inpaint.png"
    inpaint.main([PROMPTS[0], "--model", str(root / "inpaint-model"), "--image", str(root / "image.png"),
                  "--mask", str(root / "mask.png"), *cli_args(root, 4, "0.25:0.75"), "--out", str(out)])
    ours = TextToImage.from_folder(str(root / "inpaint-model"))
    assert ours.inpainting_unet
    noise = initial_noise(ours.schedule, ours.schedule.timesteps(4), ours.latent_shape(1),
                          generator=torch.Generator().manual_seed(0))
    pipe = on_our_grid(diffusers.StableDiffusionControlNetInpaintPipeline(**inpainting.components, controlnet=net))
    image, mask = png(root / "image.png"), png(root / "mask.png")
    call = dict(image=image, mask_image=mask, control_image=png(root / "hint.png"), strength=1.0, latents=noise,
                num_inference_steps=4, guidance_scale=1 + ours.index.guidance, controlnet_conditioning_scale=SCALE,
                output_type="pt")
    with torch.no_grad():
        reference = pipe(PROMPTS[0], control_guidance_start=0.25, control_guidance_end=0.75, **call).images
        throughout = pipe(PROMPTS[0], **call).images
    paste = lambda x: mask * x + (1 - mask) * image                                           # noqa: E731
    assert_drawn(out, paste(reference), paste(throughout))


def test_inpaint_with_a_plain_unet_runs_the_controlnet_where_diffusers_does(setup, monkeypatch, tmp_path, one_thread):
    """A plain U-Net inpaints by holding the known latents with noise of its own (`keep_known`), so its images are not
    StableDiffusionControlNetInpaintPipeline's; with --control-range 0.25:0.75 over 4 steps its ControlNet runs at
    the timesteps where that pipeline gives the ControlNet a non-zero scale (749 and 499)."""
    from ldm import inpaint
    from ldm.models.controlnet import ControlNet
    root, theirs, _, net = setup
    ours_at, theirs_at = [], []
    forward = ControlNet.forward

    def recorded(self, x, t, *args, **kwargs):                # our ControlNet's forward, its net times noted
        ours_at.append(round(float(t.flatten()[0])))
        return forward(self, x, t, *args, **kwargs)
    monkeypatch.setattr(ControlNet, "forward", recorded)
    inpaint.main([PROMPTS[0], "--model", str(root / "model"), "--image", str(root / "image.png"), "--mask",
                  str(root / "mask.png"), *cli_args(root, 4, "0.25:0.75"), "--out", str(tmp_path / "inpaint.png")])
    pipe = on_our_grid(diffusers.StableDiffusionControlNetInpaintPipeline(**theirs.components, controlnet=net))

    def record(module, args, kwargs):
        if kwargs["conditioning_scale"] != 0:
            theirs_at.append(int(args[1]))
    hook = net.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(PROMPTS[0], image=png(root / "image.png"), mask_image=png(root / "mask.png"),
                 control_image=png(root / "hint.png"), num_inference_steps=4, control_guidance_start=0.25,
                 control_guidance_end=0.75, output_type="latent")
    finally:
        hook.remove()
    assert ours_at == theirs_at == [749, 499]


def test_hires_second_pass_control_range_equals_diffusers(setup, posterior_mode, tmp_path, one_thread):
    """txt2img --hires 2:0.5 --control-range 0:0.5 over 4 steps: the first pass's ControlNet acts on steps 0 and 1
    (StableDiffusionControlNetPipeline), the second pass's (2 steps at twice the size, the control image enlarged
    bilinearly as the latents) on its step 0 only (StableDiffusionControlNetImg2ImgPipeline, the latents as its
    image, control_guidance_end=0.5)."""
    from ldm import txt2img
    root, theirs, _, net = setup
    out = tmp_path / "hires.png"
    txt2img.main([PROMPTS[0], "--model", str(root / "model"), "--hires", "2:0.5", *cli_args(root, 4, "0:0.5"),
                  "--out", str(out)])
    ours = TextToImage.from_folder(str(root / "model"))
    w, side = ours.index.guidance, TINY.image
    noise = initial_noise(ours.schedule, ours.schedule.timesteps(4), ours.latent_shape(1),
                          generator=torch.Generator().manual_seed(0))
    txt = on_our_grid(diffusers.StableDiffusionControlNetPipeline(**theirs.components, controlnet=net))
    edit = on_our_grid(diffusers.StableDiffusionControlNetImg2ImgPipeline(**theirs.components, controlnet=net))
    hint = png(root / "hint.png")
    big = F.interpolate(hint, size=(2 * side, 2 * side), mode="bilinear", align_corners=False)
    common = dict(num_inference_steps=4, guidance_scale=1 + w, controlnet_conditioning_scale=SCALE)

    def hires(**ranged):
        with torch.no_grad():
            z = txt(PROMPTS[0], image=hint, latents=noise, output_type="latent", **common, **ranged).images
            z = F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False)
            return edit(PROMPTS[0], image=z, control_image=big, strength=0.5, height=2 * side, width=2 * side,
                        generator=torch.Generator().manual_seed(0), output_type="pt", **common, **ranged).images

    assert_drawn(out, hires(control_guidance_end=0.5), hires())
