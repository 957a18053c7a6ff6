"""Image to image (SDEdit, Meng et al. 2022) with the few-step students or the teacher; FLUX.1 Kontext editing.

    python -m ldm.img2img --image in.png "a blue square" --strength 0.6 --steps 4 --out out.png
    python -m ldm.img2img --image in.png "make the sky purple" --model models/flux-kontext --steps 28
    python -m ldm.img2img --image in.png "make it blue" --image-guidance 1.5 --model models/ip2p --steps 20
    python -m ldm.img2img --replay img2img.png --seed 3          # the PNG's settings, a flag given now wins

The image is encoded, noised to the time on the --steps grid that leaves round(strength * steps)
steps, and only those steps are run: strength 1 ignores the image, strength 0 returns its
reconstruction. The input is resized (shorter side) and centre-cropped to the model resolution.

A FLUX.1 Kontext model (model_index.json's image_input "kontext") edits instead: it draws from pure noise, all
--steps, with the image's latents as reference tokens (ldm.flux_tools), so --strength does not apply. The image is
resized to the Kontext size nearest its aspect ratio (about a megapixel, sides multiples of 16; BFL's and
diffusers' default), or with --size resized to cover WxH and centre-cropped; the output has the reference's size.

An InstructPix2Pix model (image_input "instruct-pix2pix", Brooks et al. 2023; ldm.instruct_pix2pix) edits too: from
pure noise, the image's latents as the U-Net's extra input channels, no --strength. Its guidance has two scales
(eq. 3): the instruction's s_T = 1 + W (--guidance W, our convention: diffusers' guidance_scale 7.5 is --guidance
6.5) and the image's s_I = --image-guidance S (diffusers' image_guidance_scale, default 1.5; higher keeps more of the
image). Three net calls a step. The image keeps its size, floored to the networks' multiple (64 px for SD), or with
--size is resized to cover WxH and centre-cropped.
"""
from __future__ import annotations

import argparse
import sys
import time

from ldm.cli import (add_input_size, add_model_args, control_options, finish, input_size, load_image, load_pipeline,
                     parse_replayed, resolve_window, sampling_options, settings, tagged_loras)
from ldm.instruct_pix2pix import IMAGE_GUIDANCE, INSTRUCT, refuse_options

STRENGTH = 0.6   # SDEdit's default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm.img2img", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default=None, help='the prompt, or the instruction ("" allowed)')
    parser.add_argument("--image", default=None, metavar="IN.png", help="the image to edit (required)")
    parser.add_argument("--strength", type=float, default=None,
                        help=f"how much to change, in [0, 1] (default {STRENGTH}); not for FLUX.1 Kontext or "
                             "InstructPix2Pix")
    parser.add_argument("--image-guidance", type=float, default=None, metavar="S",
                        help="InstructPix2Pix models: the image's guidance scale s_I (Brooks et al. 2023, eq. 3; "
                             f"diffusers' image_guidance_scale, 1 is none; default {IMAGE_GUIDANCE}): higher keeps "
                             "the edit closer to the input image. --guidance W sets the instruction's s_T = 1 + W")
    parser.add_argument("--replay", metavar="FILE.png", default=None,
                        help="draw again with the settings stored in a PNG this command wrote (image, prompt, seed, "
                             "model, ...); flags given with it override them")
    parser.add_argument("--out", default="img2img.png", metavar="OUT.png")
    add_input_size(parser)
    add_model_args(parser)
    return parser


def edit_input(parser: argparse.ArgumentParser, args, pipe, kontext: bool):
    """The image FLUX.1 Kontext or InstructPix2Pix edits, (1, 3, H, W) in [-1, 1]: --size's cover-and-crop, else its
    own size fitted to the networks' multiple: the size Kontext prefers (`kontext_image`), or for InstructPix2Pix
    floored to it (resized, as diffusers' image processor floors it to the autoencoder's factor)."""
    from PIL import Image

    from ldm.data.transforms import open_image, to_tensor
    from ldm.flux_tools import kontext_image
    if args.size:
        return load_image(args.image, input_size(parser, args, pipe))
    try:
        image = open_image(args.image)
    except (OSError, ValueError) as err:
        parser.error(f"--image {args.image}: {err}")
    multiple = pipe.autoencoder.config.downsample_factor * pipe.unet.cfg.downsample_factor
    if kontext:
        return to_tensor(kontext_image(image, multiple))[None]
    size = (image.width // multiple * multiple, image.height // multiple * multiple)
    if min(size) < multiple:
        parser.error(f"--image {args.image}: {image.width}x{image.height} is smaller than the networks' {multiple} px")
    return to_tensor(image if size == image.size else image.resize(size, Image.LANCZOS))[None]


def replay_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """The settings an img2img PNG holds (its `ldm` chunk, see ldm.cli.settings), as parser defaults."""
    from ldm.txt2img import REPLAYED, png_settings
    run = png_settings(parser, path)
    if "image" not in run or "mask" in run:
        parser.error(f"--replay {path}: not drawn by img2img (by {'inpaint' if 'mask' in run else 'txt2img'}); "
                     "replay it there")
    keys = set(REPLAYED) | {"image", "strength", "image_guidance"}
    flags = {action.dest for action in parser._actions}          # img2img has no --n, --hires
    return {k: tuple(v) if k in ("size", "freeu") else v for k, v in run.items() if k in keys and k in flags}


def instruct_edit(parser: argparse.ArgumentParser, args, pipe) -> None:
    """InstructPix2Pix: the usage errors before anything runs, then the edit and its PNG."""
    if args.strength is not None:
        parser.error("--strength: InstructPix2Pix edits from pure noise with the image as the U-Net's input; there is "
                     "no strength to set (--image-guidance S says how closely to keep the image)")
    if args.window is not None:
        parser.error("--window: InstructPix2Pix's image input is not cut into windows")
    try:
        refuse_options(control=args.controlnet, ip=args.ip_adapter, guidance_rescale=args.guidance_rescale,
                       guidance_interval=args.guidance_interval is not None, apg=args.apg is not None,
                       pag=bool(args.pag), sag=bool(args.sag), adapter=args.t2i_adapter)
    except ValueError as err:
        parser.error(str(err))
    image = edit_input(parser, args, pipe, kontext=False)
    start = time.perf_counter()
    with tagged_loras(parser, args, pipe, args.prompt) as text:
        images, info = pipe.edit(image, [text], image_guidance=args.image_guidance, **sampling_options(args))
    finish(images, info, start, args.out, settings(args, args.prompt, info, image=args.image, edit=INSTRUCT,
                                                   image_guidance=info["image_guidance"]))


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_replayed(parser, argv, replay_defaults)   # --replay: the PNG's settings, flags given now win
    if args.prompt is None or args.image is None:
        parser.error("give a prompt and --image IN.png (or --replay FILE.png)")
    if args.strength is not None and not 0.0 <= args.strength <= 1.0:
        parser.error(f"--strength must be in [0, 1], got {args.strength}")
    pipe = load_pipeline(parser, args, [args.prompt])
    if args.image_guidance is not None and pipe.index.image_input != INSTRUCT:
        parser.error(f"--image-guidance is for InstructPix2Pix models (model_index.json's image_input "
                     f"{INSTRUCT!r}); {args.model}'s is {pipe.index.image_input!r}")
    if pipe.index.image_input == INSTRUCT:
        instruct_edit(parser, args, pipe)
        return
    if pipe.index.image_input == "kontext":
        if args.strength is not None:
            parser.error("--strength: FLUX.1 Kontext edits from pure noise with the image as reference tokens; "
                         "there is no strength to set")
        image = edit_input(parser, args, pipe, kontext=True)
        control = control_options(parser, args, pipe, (image.shape[-1], image.shape[-2]))
        resolve_window(parser, args, pipe, [(image.shape[-1], image.shape[-2])], control)
        start = time.perf_counter()
        with tagged_loras(parser, args, pipe, args.prompt) as text:
            images, info = pipe.edit(image, [text], **sampling_options(args), **control)
        finish(images, info, start, args.out, settings(args, args.prompt, info, image=args.image, edit="kontext"))
        return
    strength = STRENGTH if args.strength is None else args.strength
    size = input_size(parser, args, pipe)
    image = load_image(args.image, size)
    control = control_options(parser, args, pipe, size)
    resolve_window(parser, args, pipe, [size], control)
    start = time.perf_counter()
    with tagged_loras(parser, args, pipe, args.prompt) as text:
        images, info = pipe.img2img(image, [text], strength=strength, **sampling_options(args), **control)
    finish(images, info, start, args.out, settings(args, args.prompt, info, strength=strength, image=args.image))


if __name__ == "__main__":
    main()
