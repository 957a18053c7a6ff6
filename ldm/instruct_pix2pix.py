"""InstructPix2Pix (Brooks et al. 2023): a U-Net that edits an image as a written instruction says.

The net is SD's with 4 more input channels: [noisy latents | latents of the input image]. It draws from pure noise
(there is no strength), and is guided on both conditions with one scale each (eq. 3: guidance.pix2pix_cfg), three
net calls a step. A model folder says so with model_index.json's image_input "instruct-pix2pix" (from_diffusers
writes it for diffusers' StableDiffusionInstructPix2PixPipeline and StableDiffusionXLInstructPix2PixPipeline).

The image's latents are the autoencoder's posterior mode *not* multiplied by its scaling factor, as the model was
trained (timbrooks/instruct-pix2pix) and as diffusers' prepare_image_latents feeds them; the null image is zero
latents. (CosXL Edit, diffusers' `is_cosxl_edit`, scales them; a saved pipeline does not record that: not read.)

Guidance: s_T = 1 + w with our --guidance W (diffusers' guidance_scale 7.5 is w = 6.5, the default an import
writes), s_I as diffusers' image_guidance_scale (default 1.5). Caution: diffusers runs no guidance at all unless
guidance_scale > 1 and image_guidance_scale >= 1 (then D(z, c_I, c_T) alone); we apply eq. 3 at any scales, so at
s_T = 1 < s_I, or s_I < 1, our image differs from its. At s_T = s_I = 1 both are the conditional model, one call.
"""
from __future__ import annotations

import torch

from ldm.diffusion.guidance import pix2pix_cfg

INSTRUCT = "instruct-pix2pix"          # model_index.json's image_input
PIPELINES = ("StableDiffusionInstructPix2PixPipeline", "StableDiffusionXLInstructPix2PixPipeline")
IMAGE_GUIDANCE = 1.5                   # s_I: diffusers' default image_guidance_scale (the paper's examples: 1.0-2.0)
# Options of TextToImage.sample an InstructPix2Pix run does not take, named as the CLI names them
REFUSED = {"control": "--controlnet", "inpaint": "an inpainting U-Net's mask", "ip": "--ip-adapter",
           "guidance_rescale": "--guidance-rescale", "guidance_interval": "--guidance-interval", "apg": "--apg",
           "pag": "--pag", "sag": "--sag", "true_cfg": "--true-cfg", "adapter": "--t2i-adapter"}


def check_unet(in_channels: int, z_channels: int, source: str) -> None:
    """ValueError unless an InstructPix2Pix pipeline's U-Net takes 2 x the latent channels (noise + image)."""
    if in_channels != 2 * z_channels:
        raise ValueError(f"{source}: an InstructPix2Pix U-Net takes {2 * z_channels} input channels (noisy latents + "
                         f"the image's latents); this one takes {in_channels}")


def unscaled(config, z: torch.Tensor) -> torch.Tensor:
    """encode_latents' unit-scale latents -> the posterior's own units, which the U-Net's image channels take."""
    return z / config.scaling_factor + (config.shift_factor or 0.0)


def image_latents(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> (B, C, h, w): the posterior mode, unscaled (diffusers' prepare_image_latents:
    vae.encode(image).latent_dist.mode(), no scaling_factor)."""
    return unscaled(pipe.autoencoder.config, pipe.encode_images(images))


def training_image_latents(autoencoder, images: torch.Tensor) -> torch.Tensor:
    """`image_latents` for a training batch: the same mode, the same unscaling, from the bare autoencoder."""
    return unscaled(autoencoder.config, autoencoder.encode_latents(images, sample=False))


def widen_input(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A trained text-to-image U-Net's input conv (O, C, k, k) -> (O, in_channels, k, k), the new image channels zero
    (Brooks et al. 2023, sec. 3.2.1): at zero weights the widened net is exactly the one it starts from."""
    if in_channels < weight.shape[1]:
        raise ValueError(f"cannot widen an input conv of {weight.shape[1]} channels to {in_channels}")
    extra = weight.new_zeros(weight.shape[0], in_channels - weight.shape[1], *weight.shape[2:])
    return torch.cat([weight, extra], dim=1)


def drop_conditions(texts: list[str], latents: torch.Tensor, p: float,
                    generator: torch.Generator | None = None) -> tuple[list[str], torch.Tensor]:
    """Brooks et al. 2023, sec. 3.2.1: with probability p each, only the instruction -> "", only the image -> the null
    image (zero latents, as `instruct_model` guides with), or both; so one net learns the three terms of eq. 3."""
    u = torch.rand(len(texts), generator=generator)                        # (B,) one draw: the three are disjoint
    drop_text = ((u < p) | ((u >= 2 * p) & (u < 3 * p))).tolist()
    drop_image = (u >= p) & (u < 3 * p)
    keep = (~drop_image).to(device=latents.device, dtype=latents.dtype).view(-1, *[1] * (latents.ndim - 1))
    return [("" if d else t) for t, d in zip(texts, drop_text)], latents * keep


class ImageLatentsInput(torch.nn.Module):
    """The U-Net with extra_args' `image_latents` appended to x at every call (the guidance wrapper batches them)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.cfg = unet, unet.cfg

    def forward(self, x, t, context, *args, image_latents, **kwargs):
        return self.unet(torch.cat([x, image_latents.to(device=x.device, dtype=x.dtype)], dim=1), t, context, *args,
                         **kwargs)


def refuse_options(**options) -> None:
    """ValueError naming the first of `options` (keys of REFUSED) that is set."""
    for key, value in options.items():
        if value:
            raise ValueError(f"{REFUSED[key]} is not supported with an InstructPix2Pix model (its guidance is eq. 3 "
                             "of Brooks et al. 2023 over the image and the instruction: --guidance, --image-guidance)")


def instruct_model(pipe, latents: torch.Tensor | None, w: float, image_scale: float | None, uncond: dict,
                   shape: tuple[int, ...] | None):
    """(x0-model, extra_args maker, info) for TextToImage.model_function: the teacher's U-Net with the image's
    `latents` (1 or B, C, h, w; `image_latents`) as its extra channels, guided by eq. 3 with s_T = 1 + w and
    s_I = `image_scale` (None: IMAGE_GUIDANCE); `uncond` is the empty (or negative) prompt's conditioning."""
    if latents is None:
        raise ValueError("an InstructPix2Pix model edits an image: give it (TextToImage.edit; python -m ldm.img2img "
                         "--image IN.png \"make it blue\")")
    image_scale = IMAGE_GUIDANCE if image_scale is None else float(image_scale)
    if shape is not None and (latents.ndim != 4 or latents.shape[0] not in (1, shape[0]) or
                              tuple(latents.shape[1:]) != tuple(shape[1:])):
        raise ValueError(f"image latents {tuple(latents.shape)} do not fit the drawn latents {tuple(shape)}: the "
                         "image sets the size")
    net = pipe.denoiser(ImageLatentsInput(pipe.unet), pipe.index.prediction)
    model = pix2pix_cfg(net, w, image_scale, uncond, {"image_latents": torch.zeros_like(latents[:1])})

    def extra_args(cond):
        batch = len(next(iter(cond.values())))
        return {**cond, "image_latents": latents.expand(batch, *latents.shape[1:])}
    calls = 1 if w == 0 and image_scale == 1 else 3
    return model, extra_args, {"model": "teacher", "nfe_per_step": calls, "image_guidance": image_scale}
