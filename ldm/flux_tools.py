"""FLUX.1's image-conditioned relatives: Fill (inpainting), Depth / Canny (a control image) and Kontext (editing).

Each is a FLUX.1-dev-like transformer (ldm.models.flux) fed an image besides the noise; a model folder records which
in model_index.json's `image_input`:

- "fill" (black-forest-labs/FLUX.1-Fill-dev, diffusers' FluxFillPipeline): x_embedder takes 384 packed channels =
  [noisy latents 64 | masked-image latents 64 | mask 256]. Unpacked: 16 + 16 + f^2 channels (f = 8, the
  autoencoder's factor), the mask at full resolution folded into f x f channels per latent pixel (`fill_inputs`).
  Packing channel-concatenated latents equals concatenating the packed parts, so our net has in_channels 96 and the
  extra 80 channels are appended to x at every call (pipeline.ConcatInputs), as for SD-inpainting U-Nets.
- "control" (FLUX.1-Depth-dev, -Canny-dev, FluxControlPipeline): 128 packed = [latents 64 | control latents 64];
  the control image (a depth map or a Canny edge map, made beforehand) goes through the autoencoder like any
  image: in_channels 32, the control latents appended to x.
- "kontext" (FLUX.1-Kontext-dev, FluxKontextPipeline): the plain 64-channel net; the reference image's latents are
  packed into tokens after the image's, with position ids (1, row, col) (ldm.models.flux.reference_ids), and only
  the noisy tokens' prediction is kept. Editing draws from pure noise (no strength).

The images go through the autoencoder's posterior mode (diffusers samples it for Fill and Control, takes the mode
for Kontext; FLUX.1's posterior is narrow, and the mode keeps a seed's image reproducible).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_INPUTS = ("", "fill", "control", "kontext",   # model_index.json's `image_input`; the last is SD's
                "instruct-pix2pix")                  # InstructPix2Pix (ldm.instruct_pix2pix), not FLUX.1's
# diffusers' pipeline class -> image_input (a FluxPipeline folder is "")
PIPELINES = {"FluxFillPipeline": "fill", "FluxControlPipeline": "control", "FluxKontextPipeline": "kontext"}
# The family's default w (our (1 + w) convention) where it differs from FLUX.1-dev's 2.5: BFL's sampling defaults,
# guidance 30 for Fill (FluxFillPipeline's default too) and 10 for Depth (Canny's is 30: give --guidance 29)
DEFAULT_GUIDANCE = {"fill": 29.0, "control": 9.0, "kontext": 1.5}
# FLUX.1 Kontext's preferred (width, height) sizes, about 1 megapixel each (BFL's flux/sampling.py, diffusers'
# PREFERRED_KONTEXT_RESOLUTIONS): a reference image is resized to the one nearest its aspect ratio
KONTEXT_SIZES = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                 (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                 (1456, 720), (1504, 688), (1568, 672))


def image_input_from_channels(in_channels: int, z_channels: int, factor: int) -> str:
    """"fill" / "control" / "" from a FLUX.1 net's latent input channels (16 + 16 + f^2, 16 + 16, 16); ValueError
    for anything else. Kontext cannot be told from its weights (it is -dev's shape)."""
    kinds = {2 * z_channels + factor * factor: "fill", 2 * z_channels: "control", z_channels: ""}
    if in_channels not in kinds:
        raise ValueError(f"a FLUX.1 net taking {in_channels} latent channels ({4 * in_channels} packed) is none of "
                         f"FLUX.1 ({z_channels}), Depth / Canny ({2 * z_channels}) or Fill "
                         f"({2 * z_channels + factor * factor})")
    return kinds[in_channels]


def fill_inputs(encode, images: torch.Tensor, masks: torch.Tensor, factor: int) -> torch.Tensor:
    """FLUX.1 Fill's extra input channels (B, C + f^2, h, w): the latents of the image with the masked part set to
    0 (mid-gray), then the binarised (>= 0.5) pixel mask with each f x f cell folded into f^2 channels in (row,
    column) order, as FluxFillPipeline.prepare_mask_latents builds them. encode: images in [-1, 1] -> latents."""
    masks = (masks >= 0.5).to(images.dtype)
    latents = encode(images * (1 - masks))
    return torch.cat([latents, F.pixel_unshuffle(masks, factor).to(latents.dtype)], dim=1)


class ReferenceTokens(torch.nn.Module):
    """FLUX.1 Kontext with its reference latents bound: every call gets them as extra tokens."""

    def __init__(self, net, latents: torch.Tensor):
        super().__init__()
        self.net, self.cfg, self.latents = net, net.cfg, latents

    def forward(self, x, t, context, **kwargs):
        reference = self.latents.to(device=x.device, dtype=x.dtype)
        reference = reference.repeat(x.shape[0] // reference.shape[0], 1, 1, 1)    # CFG's halves share it
        return self.net(x, t, context, reference=reference, **kwargs)


def kontext_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """The (width, height) FLUX.1 Kontext resizes a reference image to: the preferred size whose aspect ratio is
    nearest the image's (the narrower of equals), floored to `multiple` (16: the autoencoder's 8 x the 2 x 2
    tokens). The image's own size plays no part: a small picture is enlarged to about a megapixel."""
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_SIZES)
    return w // multiple * multiple, h // multiple * multiple


def kontext_image(image, multiple: int):
    """A PIL image resized (Lanczos, aspect not kept exactly, no crop) to `kontext_size`, as BFL's sampling code and
    diffusers' FluxKontextPipeline (its default _auto_resize) prepare the reference."""
    from PIL import Image
    return image.resize(kontext_size(*image.size, multiple), Image.LANCZOS)
