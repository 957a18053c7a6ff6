"""Inpainting with the few-step students or the teacher, in latent space (RePaint / SDEdit style).

    python -m ldm.inpaint --image in.png --mask mask.png "a red circle" --steps 4 --out out.png
    python -m ldm.inpaint --image in.png --outpaint 0,0,64,0 "a red circle left of a blue square" --out wider.png

White mask pixels (> 127) are repainted, black ones kept. The mask is max-pooled to the latent
grid, so every latent cell touching the white region is generated; at every step the kept
region is re-noised from the encoded input (`ldm.pipeline.keep_known`). The kept pixels of the
output are the input's own. Image and mask are resized and centre-cropped to the model resolution.

An inpainting model (SD-inpainting, FLUX.1 Fill) is given the mask and the masked image as inputs instead and
draws the whole picture from pure noise (FLUX.1 Fill: guidance scale 30, w = 29, by default); the kept pixels
are still pasted back from the input.

An inpainting ControlNet (SD3's alimama-creative/SD3-Controlnet-Inpainting) reads --control-image (the image to
repaint, usually --image itself) blacked out under --mask, and the mask; the model then draws the whole picture from
pure noise, as diffusers' StableDiffusion3ControlNetInpaintingPipeline does, and the kept pixels are pasted back.

Outpainting (--outpaint LEFT,TOP,RIGHT,BOTTOM) grows the canvas by that many pixels on each side and repaints the
new border: the input (at --size) is padded, the pad filled with uniform noise (--outpaint-fill noise; or the
image's edge pixels repeated: edge), and the mask is the pad (with --mask, the pad and the mask's white pixels). The pads are multiples of the
autoencoder's factor, so the pad covers whole latent cells and the kept cells are the input's own. With --window a
canvas larger than the model's size is drawn by MultiDiffusion windows, e.g. a 64-px image outpainted to 256x64.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from ldm.cli import (add_input_size, add_model_args, control_options, finish, input_size, load_image, load_pipeline,
                     refuse_instruct, resolve_window, sampling_options, settings, tagged_loras)
from ldm.diffusion.samplers import CFG_PP_SAMPLERS

OUTPAINT_FILLS = ("edge", "noise")
MASKED_CONTENT = ("original", "fill")


def parse_outpaint(text: str) -> tuple[int, int, int, int]:
    """'0,0,64,0' -> (left, top, right, bottom) in pixels, each >= 0, not all 0."""
    try:
        pads = tuple(int(v) for v in text.split(","))
    except ValueError:
        pads = ()
    if len(pads) != 4 or min(pads) < 0 or not any(pads):
        raise argparse.ArgumentTypeError(f"expected LEFT,TOP,RIGHT,BOTTOM pixels >= 0 (not all 0) such as 0,0,64,0, "
                                         f"got {text!r}")
    return pads


def outpaint_canvas(image: torch.Tensor, mask: torch.Tensor | None, pads: tuple[int, int, int, int],
                    fill: str = "noise", generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """image (B, 3, H, W) in [-1, 1] and its mask (B, 1, H, W) or None -> the image on a canvas grown by pads =
    (left, top, right, bottom) px, and the mask of what to paint: 1 over the pad (and where `mask` is 1).
    fill: the pad's pixels, "edge" (the nearest edge pixel repeated) or "noise" (uniform in [-1, 1]); only the
    encoder sees them (and through its receptive field the kept latent cells next to the pad)."""
    if fill not in OUTPAINT_FILLS:
        raise ValueError(f"outpaint fill must be one of {OUTPAINT_FILLS}, got {fill!r}")
    left, top, right, bottom = pads
    padding = (left, right, top, bottom)                    # F.pad's order: last dim first
    canvas = F.pad(image, padding, mode="replicate")
    mask = torch.zeros_like(image[:, :1]) if mask is None else mask.to(image.dtype)
    mask = F.pad(mask, padding, value=1.0)
    if fill == "noise":
        pad = F.pad(torch.zeros_like(image[:, :1]), padding, value=1.0)
        noise = torch.rand(canvas.shape, generator=generator, dtype=canvas.dtype) * 2 - 1
        canvas = pad * noise.to(canvas.device) + (1 - pad) * canvas
    return canvas, mask


def blur_zero_padded(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x (B, C, H, W) blurred by a Gaussian of std `sigma` px, separably, zero outside the picture (no data there)."""
    radius = min(math.ceil(3 * sigma), max(x.shape[-2:]))       # past the picture the taps only meet zeros
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = (k / k.sum()).repeat(x.shape[1], 1, 1)                  # (C, 1, 2r + 1): one kernel per channel
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0)), k.unsqueeze(2), groups=x.shape[1])     # along W
    return F.conv2d(F.pad(x, (0, 0, radius, radius)), k.unsqueeze(3), groups=x.shape[1])  # along H


def fill_masked(image: torch.Tensor, mask: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    """image (B, 3, H, W) with its masked pixels (mask 1) painted by the blurred colours of the kept ones around
    them (the A1111 web UI's "fill" masked content, our way): normalised convolution, blur(image * keep) /
    blur(keep) (Knutsson & Westin 1993), whose blur doubles until it reaches every masked pixel; kept pixels stay."""
    keep = 1 - mask.to(image.dtype).expand(image.shape[0], 1, *image.shape[-2:])
    out, todo = image * keep, keep.expand_as(image) == 0
    while todo.any() and sigma <= 2 * max(image.shape[-2:]):
        weight = blur_zero_padded(keep, sigma)                  # the kept share of the kernel's mass
        ready = todo & (weight > 1e-6)
        out = torch.where(ready, blur_zero_padded(image * keep, sigma) / weight.clamp_min(1e-6), out)
        todo &= ~ready
        sigma *= 2
    return torch.where(todo, torch.zeros_like(out), out)       # no kept pixel at all: mid-gray


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm.inpaint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help='what to paint in the masked region ("" allowed)')
    parser.add_argument("--image", required=True, metavar="IN.png", help="the image")
    parser.add_argument("--mask", default=None, metavar="MASK.png",
                        help="white = repaint, black = keep (needed unless --outpaint)")
    parser.add_argument("--outpaint", type=parse_outpaint, default=None, metavar="LEFT,TOP,RIGHT,BOTTOM",
                        help="grow the canvas by these pixels on each side (multiples of the autoencoder's factor, "
                             "8 for SD, 4 for the shipped model; the canvas a size the model takes) and paint the "
                             "new border; the output is that larger size")
    parser.add_argument("--outpaint-fill", default="noise", choices=OUTPAINT_FILLS,
                        help="what the encoder sees in the border before it is painted: uniform noise (default; "
                             "on shapes64 the painted border and the seam came closer to native samples, "
                             "docs/eval/panorama) or the image's edge pixels repeated (edge)")
    parser.add_argument("--strength", type=float, default=1.0, metavar="S",
                        help="in (0, 1]: 1 (default) draws the masked region from pure noise; below 1 it starts from "
                             "the image noised to the grid time that leaves round(S * steps) steps, so the masked part "
                             "keeps the image's layout and colours (the A1111 web UI's denoising strength)")
    parser.add_argument("--masked-content", default="original", choices=MASKED_CONTENT,
                        help="what the encoder sees under the mask, which --strength < 1 starts from: the image "
                             "(original, default) or the blurred colours of the kept pixels around it (fill), as the "
                             "A1111 web UI's 'masked content'")
    parser.add_argument("--out", default="inpaint.png", metavar="OUT.png")
    add_input_size(parser)
    add_model_args(parser)
    return parser


def outpaint_settings(args) -> dict:
    """--outpaint and its fill, --strength and --masked-content when not their defaults, for the PNG's settings."""
    run = {} if args.outpaint is None else {"outpaint": list(args.outpaint), "outpaint_fill": args.outpaint_fill}
    if args.strength != 1.0:
        run["strength"] = args.strength
    if args.masked_content != "original":
        run["masked_content"] = args.masked_content
    return run


def check_strength(parser: argparse.ArgumentParser, args) -> None:
    if not 0.0 < args.strength <= 1.0:
        parser.error(f"--strength must be in (0, 1], got {args.strength}")


def refuse_cfg_pp(parser: argparse.ArgumentParser, args, pipe, control: dict) -> None:
    """A usage error for a CFG++ --sampler where the known part is held by the mask at every step."""
    if args.sampler in CFG_PP_SAMPLERS and pipe.holds_known(control.get("control")):
        parser.error(f"--sampler {args.sampler} (CFG++) renoises with CFG's unconditional prediction, which a plain "
                     "U-Net's inpainting (the known part held by a mask at every step) does not give: pick another "
                     "sampler, or an inpainting model or ControlNet")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.mask is None and args.outpaint is None:
        parser.error("give --mask (what to repaint), --outpaint (a border to paint), or both")
    check_strength(parser, args)
    pipe = load_pipeline(parser, args, [args.prompt])
    refuse_instruct(parser, args, pipe)
    size = input_size(parser, args, pipe)
    image = load_image(args.image, size)
    mask = None if args.mask is None else (load_image(args.mask, size, mode="L") > 0).float()   # (1, 1, H, W): > 127
    if args.outpaint:
        if args.controlnet or args.t2i_adapter:   # its image would be the input stretched over the larger canvas
            parser.error("--outpaint is not combined with --controlnet or --t2i-adapter")
        factor = pipe.autoencoder.config.downsample_factor
        if any(p % factor for p in args.outpaint):
            parser.error(f"--outpaint {','.join(map(str, args.outpaint))}: each pad must be a multiple of {factor} px "
                         "(the autoencoder's factor), so that the pad covers whole latent cells")
        left, top, right, bottom = args.outpaint
        size = (size[0] + left + right, size[1] + top + bottom)
        try:
            pipe.latent_shape(1, size)
        except ValueError as err:
            parser.error(f"--outpaint: the canvas {size[0]}x{size[1]}: {err}")
        image, mask = outpaint_canvas(image, mask, args.outpaint, args.outpaint_fill,
                                      torch.Generator().manual_seed(args.seed))
    if mask.sum() == 0:
        print(f"warning: mask {args.mask} has no white pixel: the output is the input", file=sys.stderr)
    if args.masked_content == "fill":
        image = fill_masked(image, mask)
    control = control_options(parser, args, pipe, size, inpainting=True)
    refuse_cfg_pp(parser, args, pipe, control)
    resolve_window(parser, args, pipe, [size], control)
    start = time.perf_counter()
    with tagged_loras(parser, args, pipe, args.prompt) as text:
        images, info = pipe.inpaint(image, mask.to(pipe.device), [text], strength=args.strength,
                                    **sampling_options(args), **control)
    finish(images, info, start, args.out, settings(args, args.prompt, info, image=args.image, mask=args.mask,
                                                        **outpaint_settings(args)))


if __name__ == "__main__":
    main()
