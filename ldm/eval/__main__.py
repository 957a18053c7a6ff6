"""Evaluation CLIs on the shapes world (docs/eval.md).

    python -m ldm.eval score --images out/ --prompts prompts.txt [--out result.json] [--fd-n N]
    python -m ldm.eval report --model ldm/assets/shapes64 [--n 500] [--out-dir docs/eval/shapes64]
    python -m ldm.eval edits --model runs/latent-shapes64-instruct/model [--n 200] [--image-guidance 1,1.5,2]
    python -m ldm.eval position --model ldm/assets/shapes64 [--n 32] [--steps 1,16] [--ws 0,4]
    python -m ldm.eval compare A/report.json[:RUN] B/report.json[:RUN] [--out result.json]
    python -m ldm.eval fid --images DIR --ref DIR|STATS.npz [--inception WEIGHTS] [--out result.json]
    python -m ldm.eval fid-stats --images DIR --out STATS.npz [--inception WEIGHTS]
    python -m ldm.eval clip-score --images DIR --prompts FILE --clip DIR_OR_HUB_NAME [--out result.json]

`score` judges a folder of generated PNGs (txt2img --from-file writes out/{line:04d}.png) against
their prompts; `report` samples the teacher and its students itself and writes report.md/json,
plots and sample grids; `position` measures how far position words move an object (fast, no
oracle: usable on training checkpoints); `compare` tests whether two runs' accuracies differ,
prompt by prompt (a paired test: McNemar's, with a confidence interval). `fid`, `fid-stats` and
`clip-score` are the standard real-image metrics, for any images (fid.py, clip_score.py).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def number_list(kind):
    """argparse type: "8,16,32" -> [8, 16, 32], naming the bad item otherwise."""
    def parse(text: str):
        try:
            values = [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {kind.__name__}, got {text!r}")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    sc = commands.add_parser("score", help="prompt accuracy and FD of a folder of generated images",
                             description="Judge DIR/{line:04d}.png against line `line` of the prompts file "
                             "(blank lines skipped but counted) and print prompt accuracy and FD.")
    sc.add_argument("--images", required=True, metavar="DIR", help="folder of generated PNGs, one image per file")
    sc.add_argument("--prompts", required=True, metavar="FILE", help="prompts, one per line")
    sc.add_argument("--out", metavar="RESULT.json", help="also write the result as JSON")
    sc.add_argument("--fd-n", type=int, default=None, metavar="N",
                    help="held-out real images for FD (default: as many as generated images)")
    sc.add_argument("--fd-seed", type=int, default=0, metavar="S",
                    help="held-out seed of the real images, as in heldout_prompts(n, S) (default: 0)")

    rp = commands.add_parser("report", help="evaluate a model folder's teacher and students",
                             description="Sample the held-out prompts with the teacher (DDIM + CFG) at each "
                             "step count and with each distilled student; write report.md, report.json, "
                             "plots and sample grids.")
    rp.add_argument("--model", required=True, metavar="DIR", help="model folder with model_index.json")
    rp.add_argument("--n", type=int, default=500, help="held-out prompts, and real images for FD (default: 500)")
    rp.add_argument("--out-dir", default=None, metavar="DIR", help="default: docs/eval/<model folder name>")
    rp.add_argument("--seed", type=int, default=0, help="prompts, real images and sampling noise (default: 0)")
    rp.add_argument("--teacher-steps", type=number_list(int), default=[8, 16, 32, 64], metavar="LIST",
                    help="teacher DDIM step counts (default: 8,16,32,64)")
    rp.add_argument("--student-steps", type=number_list(int), default=[1, 2, 4, 8], metavar="LIST",
                    help="student step counts, where the model folder has one (default: 1,2,4,8)")
    rp.add_argument("--guidance", type=float, default=None, metavar="W",
                    help="guidance weight w, (1 + w) cond - w uncond (default: the model's)")
    rp.add_argument("--ws", type=number_list(float), default=[0, 1, 2, 3, 5, 8], metavar="LIST",
                    help="guidance weights of the teacher sweep (default: 0,1,2,3,5,8)")
    rp.add_argument("--student-sweep", type=int, default=4, metavar="STEPS",
                    help="also sweep this student over --ws (it takes w as an input); 0: no student "
                         "sweep (default: 4)")
    rp.add_argument("--batch", type=int, default=50, help="prompts per sampling batch (default: 50)")
    rp.add_argument("--student-sampler", choices=["ddim", "stochastic"], default="ddim",
                    help="the students' sampler: deterministic DDIM, or Meng et al.'s N-step stochastic "
                         "sampler (sec. 4.3); the teacher's is --teacher-sampler (default: ddim)")
    rp.add_argument("--teacher-sampler", default="ddim", metavar="NAME",
                    help="the teacher's sampler, any of ldm.txt2img's --sampler (default: ddim)")
    rp.add_argument("--teacher-eta", type=float, default=None, metavar="E",
                    help="the teacher's sampler noise in [0, 1], as ldm.txt2img's --eta: DDIM's eta, TCD's gamma, "
                         "the ancestral samplers' eta (default: the sampler's own, ddim 0, tcd 0.3, the ancestral "
                         "ones 1)")
    rp.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                    help="merge a LoRA into the teacher (repeatable), e.g. stages/distill_lcm.py's LCM-LoRA with "
                         "--teacher-sampler lcm --teacher-steps 1,2,4,8 --guidance 0 --ws 0; the students are "
                         "not run then")
    rp.add_argument("--guidance-interval", default=None, metavar="LO:HI",
                    help="the teacher's CFG only where LO < sigma_t / alpha_t <= HI (as ldm.txt2img's; "
                         "docs/sampling.md); the students are not run then")
    rp.add_argument("--apg", default=None, metavar="R[:ETA[:BETA]]",
                    help="the teacher's CFG as adaptive projected guidance (Sadat et al. 2024, arXiv 2410.02416; as "
                         "ldm.txt2img's --apg: ETA, BETA default 0, -0.5); the students are not run then")
    rp.add_argument("--pag", type=float, default=None, metavar="S",
                    help="the teacher's perturbed-attention guidance at scale S beside CFG (Ahn et al. 2024, "
                         "arXiv 2403.17377; as ldm.txt2img's --pag: 3 net calls a step, 2 at w = 0); the students "
                         "are not run then")
    rp.add_argument("--pag-layers", default="mid", metavar="LIST",
                    help="with --pag: the self-attention layers perturbed, comma-separated (default: mid)")
    rp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # the choices of ldm.pipeline.DECODER_PRECISIONS, which is not imported here: it would load the
    # model code (~1.6 s) for every --help
    rp.add_argument("--decoder-precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="autoencoder decoder, for every run alike: auto = bf16 on CPUs with native bf16, "
                         "else fp32 (default: auto)")

    po = commands.add_parser("position", help="how far position words move an object (teacher, fast)",
                             description="Sample 'a large red circle' with each position suffix (same noise) "
                             "and print the red centroid's shift left-right and top-bottom, beside the data's.")
    po.add_argument("--model", required=True, metavar="DIR", help="model folder with model_index.json")
    po.add_argument("--n", type=int, default=32, help="samples per prompt (default: 32)")
    po.add_argument("--steps", type=number_list(int), default=[1, 16], metavar="LIST",
                    help="teacher DDIM step counts; 1 = the x0 prediction from pure noise (default: 1,16)")
    po.add_argument("--ws", type=number_list(float), default=[0.0, 4.0], metavar="LIST",
                    help="guidance weights (default: 0,4)")
    po.add_argument("--seed", type=int, default=0)
    po.add_argument("--out", metavar="RESULT.json", help="also write the result as JSON")
    po.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    from ldm.eval.edits import add_parser as add_edits_parser   # light: argparse only at import
    add_edits_parser(commands)

    cp = commands.add_parser("compare", help="paired test of two runs' prompt accuracy (same prompts)",
                             description="Compare prompt accuracy prompt by prompt: B - A with a 95% "
                             "confidence interval and McNemar's exact p-value. A and B are report.json files "
                             "(or their folders) made with the same --n and --seed; FILE:RUN picks one run "
                             "on each side (run names as in the report's sample grids: teacher-64-w2, "
                             "student-4-w2), else every run the two reports share is compared.")
    cp.add_argument("a", metavar="A[:RUN]", help="the baseline report (and run)")
    cp.add_argument("b", metavar="B[:RUN]", help="the report (and run) compared with it")
    cp.add_argument("--out", metavar="RESULT.json", help="also write the comparisons as JSON")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fi = commands.add_parser("fid", help="FID (and KID) of an image folder against a folder or statistics",
                             description="FID in the pool3 features of pytorch-fid's FID Inception-v3 "
                             "(ldm/eval/fid.py says exactly what is computed); KID too when --ref is a folder. "
                             "Unreadable images are skipped and counted.")
    fi.add_argument("--images", required=True, metavar="DIR", help="folder of images (any size and mode)")
    fi.add_argument("--ref", required=True, metavar="DIR|STATS.npz",
                    help="reference images, or their statistics from fid-stats (or pytorch-fid's .npz)")
    fi.add_argument("--kid-subsets", type=int, default=100, metavar="N",
                    help="KID subsets, when --ref is a folder; 0: no KID (default: 100)")
    fi.add_argument("--kid-subset-size", type=int, default=1000, metavar="M",
                    help="images per KID subset, capped at the smaller folder (default: 1000)")
    fi.add_argument("--seed", type=int, default=0, help="KID's subset draws (default: 0)")
    fi.add_argument("--out", metavar="RESULT.json", help="also write the result as JSON")
    fs = commands.add_parser("fid-stats", help="save a folder's FID statistics (mu, sigma) once",
                             description="Write the pool3 mean and covariance of a folder's images to a .npz "
                             "with pytorch-fid's keys mu and sigma (plus n), for fid --ref.")
    fs.add_argument("--images", required=True, metavar="DIR", help="folder of reference images")
    fs.add_argument("--out", required=True, metavar="STATS.npz", help="the statistics file to write")
    for sub in (fi, fs):
        sub.add_argument("--inception", metavar="WEIGHTS", default=None,
                         help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: torch.hub's "
                              "checkpoints folder, where pytorch-fid keeps it); nothing is downloaded")
        sub.add_argument("--batch-size", type=int, default=50, metavar="N", help="images per batch (default: 50)")
        sub.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                         help="image-reading processes; 0: read in this process (default: min(8, CPUs))")
        sub.add_argument("--device", default=device)

    cs = commands.add_parser("clip-score", help="CLIP score of a folder of generated images and their prompts",
                             description="torchmetrics' CLIP score, max(100 * mean cos(image, prompt), 0), of "
                             "DIR/{line:04d}.png against line `line` of the prompts file (blank lines skipped "
                             "but counted), with a transformers CLIPModel; see ldm/eval/clip_score.py.")
    cs.add_argument("--images", required=True, metavar="DIR", help="folder of generated PNGs, one image per file")
    cs.add_argument("--prompts", required=True, metavar="FILE", help="prompts, one per line")
    cs.add_argument("--clip", required=True, metavar="DIR_OR_HUB_NAME",
                    help="CLIPModel + CLIPProcessor folder, or a hub name in the local cache "
                         "(e.g. openai/clip-vit-large-patch14, torchmetrics' default)")
    cs.add_argument("--batch-size", type=int, default=32, metavar="N", help="pairs per batch (default: 32)")
    cs.add_argument("--device", default=device)
    cs.add_argument("--out", metavar="RESULT.json", help="also write the result as JSON")
    return parser


def emit(text: str, result, out: str | None) -> None:
    """Print a command's table; with --out also write its result as JSON."""
    from ldm.eval.score import write_json
    print(text)
    if out:
        write_json(result, out)
        print(f"wrote {out}")


def real_image_metric(parser: argparse.ArgumentParser, args) -> None:
    """fid, fid-stats and clip-score: run, print, write --out."""
    if args.batch_size < 1 or getattr(args, "workers", 0) < 0:
        parser.error(f"need --batch-size >= 1 and --workers >= 0, got {args.batch_size} and "
                     f"{getattr(args, 'workers', 0)}")
    try:
        if args.command == "clip-score":
            from ldm.eval.clip_score import clip_score, format_clip_score
            result = clip_score(args.images, args.prompts, args.clip, args.batch_size, args.device)
            return emit(format_clip_score(result), result, args.out)
        from ldm.eval import fid
        if args.command == "fid-stats":
            result = fid.fid_stats(args.images, args.out, args.inception, args.batch_size, args.device,
                                   args.workers)
            return print(fid.format_stats(result))
        if args.kid_subsets < 0 or args.kid_subset_size < 2:
            parser.error(f"need --kid-subsets >= 0 and --kid-subset-size >= 2, got {args.kid_subsets} and "
                         f"{args.kid_subset_size}")
        result = fid.fid(args.images, args.ref, args.inception, args.batch_size, args.device, args.workers,
                         args.kid_subsets, args.kid_subset_size, args.seed)
        return emit(fid.format_fid(result), result, args.out)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"python -m ldm.eval {args.command}: error: {err}\n")


def parsed(parser: argparse.ArgumentParser, flag: str, parse, text: str | None):
    """`parse(text)` (one of ldm.cli's option parsers), None for None; its error as `flag`'s usage error."""
    if text is None:
        return None
    try:
        return parse(text)
    except argparse.ArgumentTypeError as err:
        parser.error(f"{flag}: {err}")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "score":
        from ldm.eval.score import format_table, score_folder
        if args.fd_n is not None and args.fd_n < 2:
            parser.error(f"--fd-n must be >= 2, got {args.fd_n}")
        try:
            result = score_folder(args.images, args.prompts, args.fd_n, args.fd_seed)
        except (FileNotFoundError, ValueError) as err:
            parser.exit(2, f"python -m ldm.eval score: error: {err}\n")
        return emit(format_table(result), result, args.out)
    if args.command in ("fid", "fid-stats", "clip-score"):
        return real_image_metric(parser, args)
    if args.command == "edits":                            # InstructPix2Pix: held-out edit triples (ldm/eval/edits.py)
        from ldm.eval.edits import main as edits_main
        edits_main(parser, args)
        return
    if args.command == "compare":
        from ldm.eval.compare import compare, format_comparisons
        try:
            results = compare(args.a, args.b)
        except (FileNotFoundError, ValueError, KeyError) as err:
            parser.exit(2, f"python -m ldm.eval compare: error: {err}\n")
        return emit(format_comparisons(results), results, args.out)

    from ldm.eval.report import make_report
    from ldm.eval.score import percent
    from ldm.pipeline import INDEX_NAME
    if not os.path.isfile(os.path.join(args.model, INDEX_NAME)):
        parser.error(f"--model {args.model!r} is not a model folder: "
                     f"{os.path.join(args.model, INDEX_NAME)} is missing")
    if args.command == "position":
        from ldm.eval.position import format_probe, probe
        if args.n < 1 or min(args.steps) < 1:
            parser.error(f"need --n >= 1 and --steps >= 1, got --n {args.n} and --steps {args.steps}")
        result = probe(args.model, args.n, args.steps, args.ws, args.device, args.seed)
        return emit(format_probe(result), result, args.out)
    for flag, values in (("--teacher-steps", args.teacher_steps), ("--student-steps", args.student_steps)):
        if min(values) < 1:
            parser.error(f"{flag} must be >= 1, got {values}")
    if args.n < 2 or args.batch < 1:
        parser.error(f"need --n >= 2 and --batch >= 1, got --n {args.n} and --batch {args.batch}")
    from ldm.diffusion.samplers import SAMPLERS, check_eta
    from ldm.models.lora import parse_lora_arg
    if args.teacher_sampler not in SAMPLERS:
        parser.error(f"--teacher-sampler {args.teacher_sampler!r}: pick one of {', '.join(sorted(SAMPLERS))}")
    try:
        check_eta(args.teacher_sampler, args.teacher_eta, "--teacher-eta", "--teacher-sampler")
    except ValueError as err:
        parser.error(str(err))
    loras = [parse_lora_arg(arg) for arg in args.lora]
    from ldm.cli import parse_apg, parse_guidance_interval, parse_pag_layers
    interval = parsed(parser, "--guidance-interval", parse_guidance_interval, args.guidance_interval)
    apg = parsed(parser, "--apg", parse_apg, args.apg)
    pag = None
    if args.pag is not None:
        from ldm.models.nets import net_structure
        from ldm.models.unet import UNet, self_attention_layers
        from ldm.pipeline import load_index
        pag = (args.pag, parsed(parser, "--pag-layers", parse_pag_layers, args.pag_layers))
        net = net_structure(os.path.join(args.model, load_index(args.model).unet))   # names checked, no weights
        if not isinstance(net, UNet):
            parser.error(f"--pag works on U-Nets; this model's network is {type(net).__name__}")
        try:
            self_attention_layers(net, pag[1])
        except ValueError as err:
            parser.error(f"--pag-layers: {err}")
    for (path, _), arg in zip(loras, args.lora):
        if not os.path.isfile(path):
            parser.error(f"--lora {arg!r}: no file {path!r}")
    out_dir = args.out_dir or os.path.join("docs", "eval", os.path.basename(os.path.normpath(args.model)))
    report = make_report(args.model, out_dir, n=args.n, seed=args.seed, teacher_steps=args.teacher_steps,
                         student_steps=args.student_steps, guidance=args.guidance, ws=args.ws,
                         batch=args.batch, device=args.device, student_sampler=args.student_sampler,
                         decoder_precision=args.decoder_precision, student_sweep=args.student_sweep,
                         teacher_sampler=args.teacher_sampler, loras=loras, guidance_interval=interval,
                         pag=pag, apg=apg, teacher_eta=args.teacher_eta)
    student_sweep = report["student_sweep"]["rows"] if report["student_sweep"] else []
    for row in report["rows"] + report["sweep"]["rows"] + student_sweep:
        print(f"{row['model']:>10} {row['steps']:>3} steps  w={row['guidance']:<4g} NFE {row['nfe']:>4}  "
              f"accuracy {percent(row['accuracy']):>6}  FD {row['fd']:<8.4g} "
              f"{1e3 * row['seconds_per_image']:.2f} ms/image")
    for goal in report["goals"]:
        print(f"{goal['status']:>8}: {goal['goal']}: {goal['detail']}")
    print(f"wrote {os.path.join(out_dir, 'report.md')} and report.json, plots, samples/")


if __name__ == "__main__":
    main()
