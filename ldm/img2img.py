"""Image to image (SDEdit, Meng et al. 2022) with the few-step students or the teacher.

    python -m ldm.img2img --image in.png "a blue square" --strength 0.6 --steps 4 --out out.png

The image is encoded, noised to the time on the --steps grid that leaves round(strength * steps)
steps, and only those steps are run: strength 1 ignores the image, strength 0 returns its
reconstruction. The input is resized (shorter side) and centre-cropped to the model resolution.
"""
from __future__ import annotations

import argparse
import sys
import time

from ldm.cli import (add_input_size, add_model_args, control_options, finish, input_size, load_image, load_pipeline,
                     sampling_options, settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm.img2img", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help='the prompt ("" allowed)')
    parser.add_argument("--image", required=True, metavar="IN.png", help="the image to edit")
    parser.add_argument("--strength", type=float, default=0.6, help="how much to change, in [0, 1] (default 0.6)")
    parser.add_argument("--out", default="img2img.png", metavar="OUT.png")
    add_input_size(parser)
    add_model_args(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not 0.0 <= args.strength <= 1.0:
        parser.error(f"--strength must be in [0, 1], got {args.strength}")
    pipe = load_pipeline(parser, args, [args.prompt])
    size = input_size(parser, args, pipe)
    image = load_image(args.image, size)
    control = control_options(parser, args, pipe, size)
    start = time.perf_counter()
    images, info = pipe.img2img(image, [args.prompt], strength=args.strength, **sampling_options(args), **control)
    finish(images, info, start, args.out, settings(args, args.prompt, info, strength=args.strength, image=args.image))


if __name__ == "__main__":
    main()
