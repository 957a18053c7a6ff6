"""Image to image (SDEdit, Meng et al. 2022) with the few-step students or the teacher; FLUX.1 Kontext editing.

    python -m ldm.img2img --image in.png "a blue square" --strength 0.6 --steps 4 --out out.png
    python -m ldm.img2img --image in.png "make the sky purple" --model models/flux-kontext --steps 28

The image is encoded, noised to the time on the --steps grid that leaves round(strength * steps)
steps, and only those steps are run: strength 1 ignores the image, strength 0 returns its
reconstruction. The input is resized (shorter side) and centre-cropped to the model resolution.

A FLUX.1 Kontext model (model_index.json's image_input "kontext") edits instead: it draws from pure noise, all
--steps, with the image's latents as reference tokens (ldm.flux_tools), so --strength does not apply. The image is
resized to the Kontext size nearest its aspect ratio (about a megapixel, sides multiples of 16; BFL's and
diffusers' default), or with --size resized to cover WxH and centre-cropped; the output has the reference's size.
"""
from __future__ import annotations

import argparse
import sys
import time

from ldm.cli import (add_input_size, add_model_args, control_options, finish, input_size, load_image, load_pipeline,
                     resolve_window, sampling_options, settings)

STRENGTH = 0.6   # SDEdit's default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm.img2img", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help='the prompt ("" allowed)')
    parser.add_argument("--image", required=True, metavar="IN.png", help="the image to edit")
    parser.add_argument("--strength", type=float, default=None,
                        help=f"how much to change, in [0, 1] (default {STRENGTH}); not for FLUX.1 Kontext")
    parser.add_argument("--out", default="img2img.png", metavar="OUT.png")
    add_input_size(parser)
    add_model_args(parser)
    return parser


def kontext_input(parser: argparse.ArgumentParser, args, pipe):
    """FLUX.1 Kontext's reference image (1, 3, H, W) in [-1, 1]: --size's cover-and-crop, else `kontext_image`."""
    from ldm.data.transforms import open_image, to_tensor
    from ldm.flux_tools import kontext_image
    if args.size:
        return load_image(args.image, input_size(parser, args, pipe))
    try:
        image = open_image(args.image)
    except (OSError, ValueError) as err:
        parser.error(f"--image {args.image}: {err}")
    multiple = pipe.autoencoder.config.downsample_factor * pipe.unet.cfg.downsample_factor
    return to_tensor(kontext_image(image, multiple))[None]


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.strength is not None and not 0.0 <= args.strength <= 1.0:
        parser.error(f"--strength must be in [0, 1], got {args.strength}")
    pipe = load_pipeline(parser, args, [args.prompt])
    if pipe.index.image_input == "kontext":
        if args.strength is not None:
            parser.error("--strength: FLUX.1 Kontext edits from pure noise with the image as reference tokens; "
                         "there is no strength to set")
        image = kontext_input(parser, args, pipe)
        control = control_options(parser, args, pipe, (image.shape[-1], image.shape[-2]))
        resolve_window(parser, args, pipe, [(image.shape[-1], image.shape[-2])], control)
        start = time.perf_counter()
        images, info = pipe.edit(image, [args.prompt], **sampling_options(args), **control)
        finish(images, info, start, args.out, settings(args, args.prompt, info, image=args.image, edit="kontext"))
        return
    strength = STRENGTH if args.strength is None else args.strength
    size = input_size(parser, args, pipe)
    image = load_image(args.image, size)
    control = control_options(parser, args, pipe, size)
    resolve_window(parser, args, pipe, [size], control)
    start = time.perf_counter()
    images, info = pipe.img2img(image, [args.prompt], strength=strength, **sampling_options(args), **control)
    finish(images, info, start, args.out, settings(args, args.prompt, info, strength=strength, image=args.image))


if __name__ == "__main__":
    main()
