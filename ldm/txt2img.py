"""Text to image from a model folder, with a distilled student when one matches --steps.

    python -m ldm.txt2img "a red circle left of a blue square" --steps 4 --guidance 2 --out circle.png
    python -m ldm.txt2img "a green triangle" --n 8 --out grid.png          # a grid of 8 samples
    python -m ldm.txt2img --from-file prompts.txt --outdir out/              # out/0000.png, out/0001.png, ...
    python -m ldm.txt2img "a red circle" --size 256x64 --window 64:16 --out pano.png   # a MultiDiffusion panorama

`--steps N` uses the student distilled to N steps (one network evaluation per step) when the model
folder has one, else the teacher with DDIM and classifier-free guidance (two per step); `--teacher`
forces the teacher. Guidance uses the Imagen convention (1 + w) cond - w uncond: w = 0 is the plain
conditional model, Stable Diffusion's scale s is w = s - 1. FLUX.1-dev takes its guidance 1 + w as an input of
the net; `--true-cfg S` runs CFG on top of it against --negative, S being diffusers' true_cfg_scale (w = S - 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from PIL import Image

from ldm.cli import (add_model_args, control_options, finish, load_pipeline, parse_replayed, parse_size,
                     refuse_instruct, resolve_window, sampling_options, settings, tagged_loras)
from ldm.diffusion.variation import grid_seeds


def read_prompts(path: str) -> list[tuple[int, str]]:
    """(line number from 0, prompt) for each non-blank line; blank lines keep their number."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--from-file: no such file {path}")
    with open(path, encoding="utf-8") as f:
        return [(i, line.strip()) for i, line in enumerate(f.read().splitlines()) if line.strip()]


def parse_hires(text: str) -> tuple[float, float]:
    """'2' -> (2.0, 0.7); '1.5:0.6' -> (1.5, 0.6): scale > 1, strength in (0, 1]."""
    scale, _, strength = text.partition(":")
    try:
        value = (float(scale), float(strength) if strength else 0.7)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SCALE[:STRENGTH] such as 2:0.6, got {text!r}") from None
    if value[0] <= 1 or not 0 < value[1] <= 1:
        raise argparse.ArgumentTypeError(f"SCALE must be > 1 and STRENGTH in (0, 1], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm.txt2img", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default=None, help='the prompt ("" is the unconditional model)')
    parser.add_argument("--n", type=int, default=1, metavar="K",
                        help="images per prompt, saved as one grid; image i has seed SEED+i (for the samplers without "
                             "noise of their own, ddim, euler, heun, dpmpp_2m, lms, dpm_2, deis, ..., it is what --seed "
                             "SEED+i draws alone)")
    parser.add_argument("--out", default="txt2img.png", metavar="FILE.png", help="output for a single prompt")
    parser.add_argument("--from-file", metavar="PROMPTS.txt",
                        help="one prompt per line; writes OUTDIR/{line:04d}.png (line 0 first, blank lines skipped)")
    parser.add_argument("--outdir", default="txt2img", metavar="DIR", help="output folder for --from-file")
    parser.add_argument("--replay", metavar="FILE.png", default=None,
                        help="draw again with the settings stored in a PNG this command wrote (prompt, seed, model, "
                             "...); flags given with it override them")
    parser.add_argument("--hires", type=parse_hires, default=None, metavar="SCALE[:STRENGTH]",
                        help="'hires fix' (as the A1111 web UI's, latent upscaler): draw at --size, enlarge the "
                             "latents SCALE times, redraw them at STRENGTH (default 0.7) with --steps; e.g. 2:0.6")
    parser.add_argument("--size", type=parse_size, default=None, metavar="WxH",
                        help="image width x height in pixels, e.g. 512x768 (default: the model's square resolution); "
                             "each side a multiple of the autoencoder's and U-Net's downsampling (8 x 8 for SD)")
    add_model_args(parser)
    return parser


REPLAYED = ("prompt", "negative", "steps", "guidance", "seed", "n", "sampler", "spacing", "teacher",
            "guidance_rescale", "prompt_weights", "model", "lora", "embedding", "size", "hires", "controlnet",
            "control_image", "control_scale", "control_mode", "control_range", "clip_skip", "freeu", "ip_adapter",
            "image_encoder", "ip_image", "ip_scale", "shift", "dtype", "true_cfg", "guidance_interval", "window",
            "apg", "eta", "restart", "pag", "pag_layers", "sag", "t2i_adapter", "adapter_image", "adapter_scale",
            "adapter_factor", "deepcache", "subseed", "subseed_strength", "lora_dir")


def png_settings(parser: argparse.ArgumentParser, path: str) -> dict:
    """The settings a PNG of ours holds (its `ldm` chunk, see ldm.cli.settings); a usage error if it holds none."""
    try:
        with Image.open(path) as im:
            return json.loads(im.text["ldm"])
    except (OSError, KeyError, ValueError) as err:
        parser.error(f"--replay {path}: no settings of ours in it ({type(err).__name__}: {err})")


def replay_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """The settings a txt2img PNG holds, as parser defaults."""
    run = png_settings(parser, path)
    if "image" in run:
        parser.error(f"--replay {path}: drawn by img2img/inpaint from {run['image']}; replay it there")
    return {k: tuple(v) if k in ("size", "hires", "freeu") else v for k, v in run.items() if k in REPLAYED}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_replayed(parser, argv, replay_defaults)   # --replay: the PNG's settings, flags given now win
    if (args.prompt is None) == (args.from_file is None):
        parser.error("give exactly one of a prompt or --from-file")
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    jobs = [(args.out, args.prompt)] if args.from_file is None else \
        [(os.path.join(args.outdir, f"{i:04d}.png"), p) for i, p in read_prompts(args.from_file)]
    if not jobs:
        parser.error(f"--from-file {args.from_file}: no prompts, every line is blank")
    pipe = load_pipeline(parser, args, [prompt for _, prompt in jobs])
    refuse_instruct(parser, args, pipe)
    control = check_sizes(parser, args, pipe)
    for path, prompt in jobs:
        start = time.perf_counter()
        with tagged_loras(parser, args, pipe, prompt) as text:     # <lora:...> tags: merged for this prompt
            images, info = draw(pipe, args, text, control)
        finish(images, info, start, path, settings(args, prompt, info))


def check_sizes(parser: argparse.ArgumentParser, args, pipe) -> dict:
    """--size and --hires's size checked against the networks, --window resolved, and the ControlNet / adapter
    inputs loaded (`control_options`, what `draw` takes), all before any model runs (usage errors)."""
    width, height = args.size or (pipe.index.resolution,) * 2
    for flag, size in (("--size", (width, height)),
                       ("--hires", (round(width * args.hires[0]), round(height * args.hires[0])) if args.hires else None)):
        try:
            pipe.latent_shape(1, size)
        except ValueError as err:
            parser.error(f"{flag}: {err}")
    control = control_options(parser, args, pipe, args.size)
    if args.hires and "reference" in control:
        parser.error("--hires: FLUX.1 Depth / Canny's control image is fixed at --size; draw at the size you want")
    resolve_window(parser, args, pipe, [(width, height)] + ([(round(width * args.hires[0]),
                                                              round(height * args.hires[0]))] if args.hires else []),
                   control)
    return control


def draw(pipe, args, prompt: str, control: dict, **extra) -> tuple:
    """The --n images of one prompt, (n, 3, H, W) in [-1, 1], and the run's info; `extra`: more keyword arguments
    of `TextToImage.sample` (ldm.serve's step callback)."""
    # image i of a grid is `--seed SEED+i` alone; with variation, SEED and `--subseed S+i` (A1111's rule)
    seeds, subseeds = grid_seeds(args.seed, args.n, args.subseed, args.subseed_strength or 0.0)
    options = {**sampling_options(args), **control, "seed": seeds, "subseed": subseeds, "size": args.size, **extra}
    if args.hires:
        return pipe.hires([prompt] * args.n, scale=args.hires[0], strength=args.hires[1], **options)
    return pipe.generate([prompt] * args.n, **options)


if __name__ == "__main__":
    main()
