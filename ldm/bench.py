"""SD-scale model benchmark: our U-Net, VAE, txt2img pipeline, SD3 and FLUX.1 transformers vs diffusers, same weights.

    python -m ldm.bench [--size sd15|tiny|sdxl|tiny-xl|sd3|tiny-sd3|flux-slice|tiny-flux] [--out FILE.json]
                        [--md FILE.md]
                        [--only unet-infer,unet-train,vae-decode,txt2img,mmdit-infer,mmdit-train,flux-infer,flux-train]
                        [--compile both|eager|compiled] [--dtypes fp16,bf16] [--reps N]

Every diffusers module is built from its config (random init, fixed seed) and converted into
ours, and both are run once on a small fp32 input to prove the weights match (max error
printed and stored) before anything is timed. Benches (docs/bench.md says more):
  unet-infer  one U-Net call, CFG batch 2, 77 text tokens; GPU: fp16 and bf16
  unet-train  forward + backward + AdamW step under bf16 autocast, with and without gradient
              checkpointing; peak memory per case
  vae-decode  one latent -> one image
  txt2img     4 DDIM steps with CFG: text encoder + 4 batch-2 U-Net calls + VAE decode
  mmdit-infer, mmdit-train  as unet-infer / unet-train for SD3's transformer (ours: ldm.models.mmdit;
              diffusers: SD3Transformer2DModel), at the sizes that have one (sd3, tiny-sd3)
  flux-infer, flux-train  the same for FLUX.1's transformer (ours: ldm.models.flux; diffusers:
              FluxTransformer2DModel, called as FluxPipeline calls it), batch 1 with the guidance input, at
              flux-slice (FLUX.1-dev's widths and 1024-px sequence, 2 + 4 of its 19 + 38 blocks) and tiny-flux
A size runs the benches of the models it has; the others are skipped, and refused when named in --only.
"ours" calls ldm.ops with backend "auto" (our Triton kernels on CUDA); the peers are diffusers
with its default SDPA attention processor and, when xformers is installed, with xformers.
speed-up = t_peer / t_ours. On CPU everything runs in fp32 at --size tiny by default: that
proves the harness works and says nothing about the GPU goals.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.util
import json
import platform
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm import bench_models as bm
from ldm.kernels.bench import describe_error, make_timer  # timer: CUDA events, warmup, median

BENCHES = ("unet-infer", "unet-train", "vae-decode", "txt2img", "mmdit-infer", "mmdit-train", "flux-infer",
           "flux-train")
NEEDS = {"unet-infer": ("unet",), "unet-train": ("unet",), "vae-decode": ("vae",),  # the Size models a bench runs
         "txt2img": ("unet", "vae", "clip"), "mmdit-infer": ("mmdit",), "mmdit-train": ("mmdit",),
         "flux-infer": ("flux",), "flux-train": ("flux",)}
COMPILE_MODES = {"both": ("eager", "compiled"), "eager": ("eager",), "compiled": ("compiled",)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SDPA, XFORMERS = "diffusers-sdpa", "diffusers-xformers"
# Speed-up goals over diffusers+SDPA per (bench, mode); training also needs peak memory <= the peer's.
# MMDiT, FLUX.1: parity, since both sides run the same cuBLAS matmuls and differ only in attention and host time.
SPEED_GOALS = {("unet-infer", "eager"): 1.15, ("unet-infer", "compiled"): 1.0, ("unet-train", "eager"): 1.1,
               ("mmdit-infer", "eager"): 1.0, ("mmdit-infer", "compiled"): 1.0, ("mmdit-train", "eager"): 1.0,
               ("flux-infer", "eager"): 1.0, ("flux-infer", "compiled"): 1.0, ("flux-train", "eager"): 1.0}
MEMORY_GOALS = ("unet-train", "mmdit-train", "flux-train")  # every mode
# the transformer families: label, (ours, diffusers) pair, weight check, inputs and call (bench_models)
TRANSFORMERS = {"mmdit": ("MMDiT", bm.mmdit_pair, bm.check_mmdit_pair, bm.mmdit_inputs, bm.mmdit_call),
                "flux": ("Flux", bm.flux_pair, bm.check_flux_pair, bm.flux_inputs, bm.flux_call)}
WEIGHT_CHECK_RTOL = 1e-4          # max |ours - diffusers| / max |diffusers| allowed at fp32
TXT2IMG_STEPS, GUIDANCE = 4, 6.5   # w = 6.5 in our convention is diffusers' guidance_scale 7.5


# ----------------------------------------------------------------------------- measuring
def _free(device) -> None:
    """Give a finished case's memory back to CUDA. On CPU each model copy goes with its last reference, and a full
    collection of a big heap (a test process's) costs more than a toy case."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _measure(row: dict, make_step, timer, device, profile_dir=None) -> dict:
    """Time the callable make_step() returns; add ms (and peak GB on CUDA) or the error to row.
    With profile_dir, also write a per-kernel table of 3 more steps there (where the time goes)."""
    step = None
    if row["mode"] == "compiled":
        # Fresh caches per case: the same forward code recompiles for every model copy and
        # dtype, and past dynamo's recompile limit it would silently fall back to eager.
        torch._dynamo.reset()
    try:
        step = make_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)  # the peak then counts weights + this case only
        row["ms"] = timer(step)
        if device.type == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        if profile_dir:
            row["profile"] = _profile(step, device, profile_dir, row)
    except Exception as err:  # a peer that cannot run this case: record why, keep going
        row.update(ms=None, error=describe_error(err))
    del step
    _free(device)
    print(f"  {row['bench']:<10} {row['case']:<24} {row['dtype']:<4} {row['mode']:<8} {row['impl']:<18} "
          + (f"{row['ms']:.3f} ms" if row.get("ms") else row.get("error", "")), flush=True)
    return row


def _profile(step, device, profile_dir, row) -> str:
    """Run step 3 times under torch.profiler; write the top ops by device time; return the path."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize()
    name = "-".join(str(row[k]) for k in ("bench", "dtype", "mode", "impl"))
    name += "-nhwc" if row["case"].endswith(" NHWC") else ""  # not the NCHW table of the same case
    path = Path(profile_dir) / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70))
    return str(path)


def _peers(xformers: bool) -> list[str]:
    return ["ours", SDPA] + ([XFORMERS] if xformers else [])


def _placed(module, impl: str, device, dtype):
    """A fresh copy of module on device/dtype; xformers attention switched on for that peer."""
    module = copy.deepcopy(module).to(device=device, dtype=dtype)
    if impl == XFORMERS:
        module.enable_xformers_memory_efficient_attention()
    return module


def _maybe_compile(fn, mode: str):
    return torch.compile(fn) if mode == "compiled" else fn


# ----------------------------------------------------------------------------- benches
LAYOUTS = {"nchw": ["nchw"], "channels_last": ["channels_last"], "both": ["nchw", "channels_last"]}


def bench_denoiser_infer(bench, pair, inputs, call, batch, device, dtypes, modes, impls, timer, profile_dir=None,
                         layouts=("nchw",)):
    """One denoiser call at the CFG batch: a U-Net or an MMDiT pair (ours, diffusers), inputs(batch, generator)
    -> (x, context, extra inputs) and call(impl, model, extra) -> (x, t, context) -> prediction (bench_models).
    channels_last: both nets' weights and input in NHWC, where cuDNN needs no NCHW <-> NHWC conversion around
    each convolution (27% of either U-Net's GPU time in the H200 profiles of docs/results/profiles)."""
    ours, theirs = pair
    g = torch.Generator().manual_seed(1)
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        x0, ctx, extra = inputs(batch, g)
        x0, ctx = x0.to(device, dtype), ctx.to(device, dtype)
        extra = {k: v.to(device, dtype) for k, v in extra.items()}
        t = torch.full((batch,), 500.0, device=device)
        for layout in layouts:
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = x0.contiguous(memory_format=fmt)
            for mode in modes:
                for impl in impls:
                    def make(impl=impl, mode=mode, fmt=fmt, x=x):
                        model = _placed(ours if impl == "ours" else theirs, impl, device, dtype).to(memory_format=fmt)
                        step = _maybe_compile(call(impl, model, extra), mode)
                        return torch.no_grad()(lambda: step(x, t, ctx))
                    case = _case(x, ctx) + (" NHWC" if layout == "channels_last" else "")
                    row = dict(bench=bench, case=case, dtype=dname, mode=mode, impl=impl)
                    rows.append(_measure(row, make, timer, device, profile_dir))
    return rows


def bench_denoiser_train(bench, pair, inputs, call, batch, device, amp_dtype, modes, impls, timer):
    """Forward + backward + AdamW step (fp32 master weights, autocast), checkpointing off and on; pair, inputs
    and call as in bench_denoiser_infer."""
    ours, theirs = pair
    g = torch.Generator().manual_seed(2)
    x, ctx, extra = inputs(batch, g)
    target = torch.randn(x.shape, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).float().to(device)
    x, ctx, extra = x.to(device), ctx.to(device), {k: v.to(device) for k, v in extra.items()}
    dname = next(k for k, v in DTYPES.items() if v == amp_dtype)
    rows = []
    for ckpt in (False, True):
        for mode in modes:
            for impl in impls:
                def make(impl=impl, mode=mode, ckpt=ckpt):
                    model = _placed(ours if impl == "ours" else theirs, impl, device, torch.float32).train()
                    if ckpt:
                        model.enable_gradient_checkpointing()
                    forward = _maybe_compile(call(impl, model, extra), mode)
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

                    def step():
                        opt.zero_grad(set_to_none=True)
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                            out = forward(x, t, ctx)
                        F.mse_loss(out.float(), target).backward()
                        opt.step()
                    return step
                row = dict(bench=bench, case=_case(x, ctx, ckpt), dtype=dname, mode=mode, impl=impl)
                rows.append(_measure(row, make, timer, device))
    return rows


def _case(x, ctx, ckpt=None) -> str:
    """A denoiser case's label: batch, latent sides and text tokens (inference) or checkpointing (training)."""
    b, _, h, w = x.shape
    return f"B={b} {h}x{w} " + (f"L={ctx.shape[1]}" if ckpt is None else f"ckpt={'on' if ckpt else 'off'}")


def bench_vae_decode(pair, size, device, dtypes, modes, impls, timer):
    """Decode one latent to one image (both decode fp16 latents in fp16)."""
    ours, theirs = pair
    side = size.latent
    z32 = torch.randn(1, size.vae["latent_channels"], side, side, generator=torch.Generator().manual_seed(3))
    rows = []
    for dname in dtypes:
        z = z32.to(device, DTYPES[dname])
        for mode in modes:
            for impl in impls:
                def make(impl=impl, mode=mode):
                    vae = _placed(ours if impl == "ours" else theirs, impl, device, DTYPES[dname])
                    decode = vae.decode if impl == "ours" else (lambda z: vae.decode(z).sample)
                    decode = _maybe_compile(decode, mode)
                    return torch.no_grad()(lambda: decode(z))
                row = dict(bench="vae-decode", case=f"B=1 {side}x{side} -> {size.image}px", dtype=dname,
                           mode=mode, impl=impl)
                rows.append(_measure(row, make, timer, device))
    return rows


def bench_txt2img(unets, vaes, size, device, dtypes, modes, impls, timer):
    """Prompt -> image: CLIP text encoder, 4 CFG U-Net steps, VAE decode (U-Net compiled in 'compiled')."""
    from transformers.utils import logging as transformers_logging
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()  # one "Loading weights" bar per case otherwise
    rows = []
    with tempfile.TemporaryDirectory(prefix="ldm-bench-clip-") as clip_dir:
        bm.write_clip_folder(size, clip_dir)
        for dname in dtypes:
            dtype = DTYPES[dname]
            for mode in modes:
                for impl in impls:
                    def make(impl=impl, mode=mode):
                        unet = _placed(unets[0 if impl == "ours" else 1], impl, device, dtype)
                        vae = _placed(vaes[0 if impl == "ours" else 1], impl, device, dtype)
                        build = bm.ours_txt2img if impl == "ours" else bm.diffusers_txt2img
                        unet = _maybe_compile(unet, mode)  # only the U-Net, on both sides
                        return build(unet, vae, clip_dir, size, device, dtype, TXT2IMG_STEPS, GUIDANCE)
                    row = dict(bench="txt2img", case=f"{TXT2IMG_STEPS} steps {size.image}px B=1", dtype=dname,
                               mode=mode, impl=impl)
                    rows.append(_measure(row, make, timer, device))
    return rows


# ----------------------------------------------------------------------------- report
def compare(rows, on_gpu: bool) -> list[dict]:
    """One entry per (ours row, peer row) of the same case: speed-up, memory and the goal verdict."""
    by_key = {}
    for r in rows:
        by_key.setdefault((r["bench"], r["case"], r["dtype"], r["mode"]), {})[r["impl"]] = r
    out = []
    for (bench, case, dname, mode), impls in by_key.items():
        ours = impls.get("ours")
        for peer, p in impls.items():
            if peer == "ours" or ours is None:
                continue
            c = dict(bench=bench, case=case, dtype=dname, mode=mode, peer=peer, ours_ms=ours.get("ms"),
                     peer_ms=p.get("ms"), ours_peak_gb=ours.get("peak_gb"), peer_peak_gb=p.get("peak_gb"))
            c["speedup"] = c["peer_ms"] / c["ours_ms"] if c["ours_ms"] and c["peer_ms"] else None
            c["goal"], c["goal_met"] = _goal(c, on_gpu)
            out.append(c)
    return out


def _goal(c: dict, on_gpu: bool):
    """(goal text, True/False/None); None where no goal applies or nothing could be measured."""
    speed = SPEED_GOALS.get((c["bench"], c["mode"])) if c["peer"] == SDPA else None
    memory = c["bench"] in MEMORY_GOALS and c["peer"] == SDPA
    if speed is None and not memory:
        return "", None
    text = " and ".join(([f">= {speed}x"] if speed else []) + (["peak <= peer"] if memory else []))
    if not on_gpu or c["speedup"] is None:
        return text, None
    met = speed is None or c["speedup"] >= speed
    if memory:
        met = met and c["ours_peak_gb"] is not None and c["ours_peak_gb"] <= c["peer_peak_gb"]
    return text, met


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    """The comparison table (and any failed runs) as markdown."""
    lines = [f"# ldm.bench: {report['size']} on {report['device']}", "",
             f"`{report['command']}` - {report['date']} - torch {report['versions']['torch']}, "
             f"triton {report['versions']['triton']}, diffusers {report['versions']['diffusers']}", ""]
    if report["note"]:
        lines += [f"**{report['note']}**", ""]
    lines += ["Weight-sharing check (fp32, CPU): " + ", ".join(
        f"{k} max abs err {v['max_abs_err']:.2e}" for k, v in report["weight_check"].items()), ""]
    lines += ["| bench | case | dtype | mode | peer | ours ms | peer ms | speed-up | ours GB | peer GB | goal |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["comparisons"]:
        verdict = "" if not c["goal"] else (f"{c['goal']}: " + {True: "met", False: "not met",
                                                                 None: "n/a"}[c["goal_met"]])
        lines.append(f"| {c['bench']} | {c['case']} | {c['dtype']} | {c['mode']} | {c['peer']} | "
                     f"{_fmt(c['ours_ms'], '.2f')} | {_fmt(c['peer_ms'], '.2f')} | {_fmt(c['speedup'], '.2f')}x | "
                     f"{_fmt(c['ours_peak_gb'], '.2f')} | {_fmt(c['peer_peak_gb'], '.2f')} | {verdict} |")
    failed = [r for r in report["results"] if r.get("error")]
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- {r['bench']} {r['case']} {r['dtype']} {r['mode']} {r['impl']}: "
                                             f"{r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def _versions() -> dict:
    import diffusers
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
           "python": platform.python_version()}
    for name in ("triton", "xformers", "transformers"):
        out[name] = importlib.import_module(name).__version__ if importlib.util.find_spec(name) else None
    return out


def _checked(name: str, err: dict) -> dict:
    """Print the weight-sharing error; stop before timing anything if the pair does not match."""
    print(f"weight check {name}: max abs err {err['max_abs_err']:.3e}, relative {err['max_rel_err']:.3e}",
          flush=True)
    if err["max_rel_err"] > WEIGHT_CHECK_RTOL:
        raise SystemExit(f"weight check {name}: ours and diffusers differ by {err['max_rel_err']:.3e} "
                         f"(relative) > {WEIGHT_CHECK_RTOL}; the conversion is broken, not timing")
    return err


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(bm.SIZES), default=None,
                        help="model size (default: sd15 on CUDA, tiny on CPU)")
    parser.add_argument("--out", default=None, help="write every figure as JSON here")
    parser.add_argument("--md", default=None, help="write the markdown table here")
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also write a per-kernel torch.profiler table for each U-Net / MMDiT inference case here")
    parser.add_argument("--compile", choices=sorted(COMPILE_MODES), default="both", help="eager, compiled or both")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="nchw",
                        help="U-Net inference memory format: nchw (default), channels_last, or both")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated subset of fp16,bf16,fp32 for the inference benches "
                             "(default: fp16,bf16 on CUDA, fp32 on CPU; training always uses bf16 autocast on CUDA)")
    parser.add_argument("--reps", type=int, default=None, metavar="N",
                        help="timed calls per case, after the warm-up (3 calls on CUDA, 1 on CPU) and before the "
                             "median (default: 10 on CUDA, 3 on CPU; the CPU tests run 1)")
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps: {args.reps}; at least one call per case is timed")
    args.dtypes = [d for d in args.dtypes.split(",") if d] if args.dtypes else None
    bad = [d for d in args.dtypes or [] if d not in DTYPES]
    if bad:
        parser.error(f"--dtypes: unknown dtype(s) {bad}; choose from {', '.join(DTYPES)}")
    args.only = [b for b in args.only.split(",") if b]
    unknown = [b for b in args.only if b not in BENCHES]
    if unknown:
        parser.error(f"--only: unknown bench(es) {unknown}; choose from {', '.join(BENCHES)}")
    args.size = args.size or ("sd15" if torch.cuda.is_available() else "tiny")
    asked = any(a.startswith("--only") for a in argv)
    for bench in list(args.only):  # a size runs the benches of its models: skip the others, or refuse if asked for
        why = unsupported(bench, args.size)
        if why and asked:
            parser.error(f"--only {bench}: {why}")
        if why:
            args.only.remove(bench)
    return args


def unsupported(bench: str, size_name: str) -> str | None:
    """Why the size cannot run the bench, or None when it can."""
    def lacking(name):
        return [m for m in NEEDS[bench] if getattr(bm.SIZES[name], m) is None]
    if lacking(size_name):
        runs = ", ".join(n for n in sorted(bm.SIZES) if not lacking(n) and unsupported(bench, n) is None)
        return f"the {size_name} size has no {' / '.join(lacking(size_name))} (sizes that run {bench}: {runs})"
    if bench == "txt2img" and size_name not in bm.TXT2IMG_SIZES:
        return f"the {size_name} size has no txt2img bench yet (SD's pipeline, one CLIP)"
    return None


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size_name = args.size
    size = bm.SIZES[size_name]
    note = None if cuda else "CPU-only timings (fp32): they check the harness, they are not the GPU goals"
    if note:
        print(f"{'=' * 80}\nNOTE: {note}.\n{'=' * 80}")
    # CPU has no fast fp16/bf16 kernels for all ops: fp32 everywhere there (docs/bench.md).
    dtypes = args.dtypes or (["fp16", "bf16"] if cuda else ["fp32"])
    amp_dtype = torch.bfloat16 if cuda else torch.float32
    modes = COMPILE_MODES[args.compile]
    impls = _peers(cuda and importlib.util.find_spec("xformers") is not None)
    warmup, reps = (3, args.reps or 10) if cuda else (1, args.reps or 3)
    timer = make_timer(device, warmup, reps)
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()  # its dtype-cast advice about .to() is noise here

    report = dict(
        size=size_name, device=torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()})",
        versions=_versions(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(["python", "-m", "ldm.bench", *argv]), note=note, warmup=warmup, reps=reps,
        complete=False, weight_check={}, results=[], comparisons=[])

    def save(rows, complete=False):
        """Rewrite the JSON after every bench: an interrupted run keeps what it measured."""
        report.update(results=rows, comparisons=compare(rows, cuda), complete=complete)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)

    checks, rows = report["weight_check"], []
    denoisers = {}  # family -> (ours, diffusers), input maker, call maker: what the denoiser benches take
    if {"unet-infer", "unet-train", "txt2img"} & set(args.only):
        unets = bm.unet_pair(size)
        checks["unet"] = _checked("U-Net", bm.check_unet_pair(*unets, size))
        denoisers["unet"] = (unets, partial(bm.unet_inputs, size), bm.unet_call)
    if {"vae-decode", "txt2img"} & set(args.only):
        vaes = bm.vae_pair(size)
        checks["vae"] = _checked("VAE", bm.check_vae_pair(*vaes, size))
    for family, (label, make_pair, check, inputs, call) in TRANSFORMERS.items():
        if {f"{family}-infer", f"{family}-train"} & set(args.only):
            pair = make_pair(size)
            checks[family] = _checked(label, check(*pair, size))
            denoisers[family] = (pair, partial(inputs, size), call)
    for family, denoiser in denoisers.items():
        layouts = LAYOUTS[args.layout] if family == "unet" else ("nchw",)  # the transformers: one conv or none
        if f"{family}-infer" in args.only:
            rows += bench_denoiser_infer(f"{family}-infer", *denoiser, size.infer_batch, device, dtypes, modes,
                                         impls, timer, args.profile, layouts)
            save(rows)
        if f"{family}-train" in args.only:
            rows += bench_denoiser_train(f"{family}-train", *denoiser, size.train_batch, device, amp_dtype, modes,
                                         impls, timer)
            save(rows)
    if "vae-decode" in args.only:
        rows += bench_vae_decode(vaes, size, device, dtypes, modes, impls, timer)
        save(rows)
    if "txt2img" in args.only:
        # ours vs diffusers' own StableDiffusionPipeline; its xformers variant adds nothing here
        rows += bench_txt2img(unets, vaes, size, device, dtypes, modes, impls[:2], timer)
    save(rows, complete=True)
    table = markdown(report)
    print(table)
    if args.out:
        print(f"wrote {args.out}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
        print(f"wrote {args.md}")
    return report


if __name__ == "__main__":
    main()
