"""Inpainting with the few-step students or the teacher, in latent space (RePaint / SDEdit style).

    python -m ldm.inpaint --image in.png --mask mask.png "a red circle" --steps 4 --out out.png

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
"""
from __future__ import annotations

import argparse
import sys
import time

from ldm.cli import (add_input_size, add_model_args, control_options, finish, input_size, load_image, load_pipeline,
                     sampling_options, settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm.inpaint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help='what to paint in the masked region ("" allowed)')
    parser.add_argument("--image", required=True, metavar="IN.png", help="the image")
    parser.add_argument("--mask", required=True, metavar="MASK.png", help="white = repaint, black = keep")
    parser.add_argument("--out", default="inpaint.png", metavar="OUT.png")
    add_input_size(parser)
    add_model_args(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    pipe = load_pipeline(parser, args, [args.prompt])
    size = input_size(parser, args, pipe)
    image = load_image(args.image, size)
    mask = (load_image(args.mask, size, mode="L") > 0).float()   # (1, 1, H, W): > 127
    if mask.sum() == 0:
        print(f"warning: mask {args.mask} has no white pixel: the output is the input", file=sys.stderr)
    control = control_options(parser, args, pipe, size, inpainting=True)
    start = time.perf_counter()
    images, info = pipe.inpaint(image, mask.to(pipe.device), [args.prompt], **sampling_options(args), **control)
    finish(images, info, start, args.out, settings(args, args.prompt, info, image=args.image, mask=args.mask))


if __name__ == "__main__":
    main()
