"""MultiDiffusion panoramas (--window) and outpainting fills on the shipped shapes64 model, scored in the oracle's
feature space.

    OMP_NUM_THREADS=1 .venv/bin/python docs/eval/panorama/panorama_eval.py run [N [MODEL ...]]   # panoramas (N = 32)
    OMP_NUM_THREADS=1 .venv/bin/python docs/eval/panorama/panorama_eval.py strip           # strip.png
    OMP_NUM_THREADS=1 .venv/bin/python docs/eval/panorama/panorama_eval.py outpaint [N]   # outpainting fills
    OMP_NUM_THREADS=1 .venv/bin/python docs/eval/panorama/panorama_eval.py tiles [N]      # native tiles side by side
    OMP_NUM_THREADS=1 .venv/bin/python docs/eval/panorama/panorama_eval.py timing [K]     # interleaved timing
    .venv/bin/python docs/eval/panorama/panorama_eval.py report                           # report.md from the JSONs

`run`: N held-out prompts (`heldout_prompts(N, seed=0)`), each drawn as a 256x64 panorama (and 64x256, tall) by the
teacher (16 DDIM steps, w = 2) and by student-4 (w = 2): plain (the U-Net sees the whole latent) and with MultiDiffusion
windows of 64 px at strides 32 and 16 px, prompt i from seed i. Every 64x64 crop at a 16-px step (13 per panorama) is
compared by Frechet distance in the oracle's features (ldm.eval.metrics.frechet_distance on Oracle.features) with as
many native 64x64 samples of the same prompts by the same model (13 seeds a prompt); a second native set from other
seeds gives the floor (native against native). Writes results.json (MODEL: teacher or student-4, default both;
other models' rows are kept) and report.md here; `strip` draws strip.png.
`outpaint`: N native student-4 samples outpainted 64 px to the right (ldm.inpaint.outpaint_canvas + pipe.inpaint,
--window 64:16, student-4) with the pad filled by edge pixels or noise; FD of the new 64x64 half and of the crop
across the seam against native samples. Writes outpaint.json and outpaint.png (the first 6 prompts: edge fill, then noise fill).
`tiles`: 4 native student-4 samples of each prompt side by side as a 256x64 panorama, scored like `run`'s (what the
crop protocol gives where every 64-px tile is native). Writes tiles.json.
`timing`: the first K (default 4) prompts, each setting in turn prompt by prompt (the machine's other load falls on
all alike), sampling and decoding one panorama; median seconds. Writes timing.json.
"""
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ldm.eval.metrics import frechet_distance, heldout_prompts
from ldm.eval.oracle import Oracle
from ldm.inpaint import outpaint_canvas
from ldm.pipeline import TextToImage
from ldm.training.images import make_grid

OUT = Path(__file__).resolve().parent
NATIVE = 64
BATCH = 8             # panoramas at a time
NATIVE_BATCH = 32     # native 64x64 samples at a time
CROP_STEP = 16
MODELS = {"teacher": dict(steps=16, teacher=True, guidance=2.0),      # 16 DDIM steps + CFG: 2 net calls a step
          "student-4": dict(steps=4, guidance=2.0)}                  # one call a step
WINDOWS = {"plain": None, "md-s32": (NATIVE, 32), "md-s16": (NATIVE, 16)}
SIZES = {"wide": (256, NATIVE), "tall": (NATIVE, 256)}


def draw(pipe, prompts, seeds, size, batch=BATCH, **options):
    """Images (N, 3, H, W) in [-1, 1], `batch` prompts at a time, prompt i from seeds[i]; and the info of the last."""
    images, info = [], None
    for i in range(0, len(prompts), batch):
        z, info = pipe.sample(prompts[i:i + batch], seed=seeds[i:i + batch], size=size, **options)
        images.append(pipe.decode(z))
    return torch.cat(images), info


def crops(images: torch.Tensor) -> torch.Tensor:
    """Every NATIVE x NATIVE crop at CROP_STEP along the long side: (N * k, 3, 64, 64)."""
    height, width = images.shape[-2:]
    if width >= height:
        return torch.cat([images[..., :, x:x + NATIVE] for x in range(0, width - NATIVE + 1, CROP_STEP)])
    return torch.cat([images[..., y:y + NATIVE, :] for y in range(0, height - NATIVE + 1, CROP_STEP)])


def native(pipe, prompts, per_prompt, first_seed, options):
    """per_prompt native samples of each prompt, seeds first_seed + i * per_prompt + k."""
    many = [p for p in prompts for _ in range(per_prompt)]
    seeds = [first_seed + i for i in range(len(many))]
    return draw(pipe, many, seeds, None, batch=NATIVE_BATCH, **options)[0]


def run(n: int, models: list[str]) -> None:
    """`models`' rows of results.json (the other models' rows there are kept)."""
    pipe = TextToImage.from_folder(decoder_precision="fp32")
    oracle = Oracle.load()
    prompts = heldout_prompts(n, seed=0)
    per = (256 - NATIVE) // CROP_STEP + 1                              # crops per panorama: 13
    results = {"prompts": n, "crops_per_panorama": per, "runs": {}}
    if (OUT / "results.json").is_file():
        results["runs"] = {k: v for k, v in json.loads((OUT / "results.json").read_text())["runs"].items()
                           if k.split("/")[0] not in models}
    for model in models:
        options = MODELS[model]
        start = time.perf_counter()
        reference = oracle.features(native(pipe, prompts, per, 1000, options))
        floor_images = native(pipe, prompts, per, 100000, options)
        results["runs"][f"{model}/native"] = {"fd": frechet_distance(oracle.features(floor_images), reference),
                                              "n": len(floor_images), "wall_s": time.perf_counter() - start}
        print(model, "native floor", results["runs"][f"{model}/native"], flush=True)
        for shape, size in SIZES.items():
            for name, window in WINDOWS.items():
                start = time.perf_counter()
                images, info = draw(pipe, prompts, list(range(n)), size, window=window, **options)
                wall = time.perf_counter() - start
                pieces = crops(images)
                row = {"fd": frechet_distance(oracle.features(pieces), reference), "n": len(pieces),
                       "windows": info.get("windows", 0), "nfe": info["nfe"], "wall_s": wall,
                       "s_per_panorama": wall / n}
                results["runs"][f"{model}/{shape}/{name}"] = row
                print(model, shape, name, row, flush=True)
                (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report()


def strip() -> None:
    """strip.png: for each of the first 4 prompts, the 6 wide runs (teacher plain, md-s32, md-s16, student ...), the
    panoramas `run` draws for them (same seeds)."""
    from PIL import Image
    pipe = TextToImage.from_folder(decoder_precision="fp32")
    prompts = heldout_prompts(4, seed=0)
    rows = [draw(pipe, prompts, list(range(4)), SIZES["wide"], window=window, **options)[0]
            for options in MODELS.values() for window in WINDOWS.values()]
    grid = make_grid(torch.stack(rows, dim=1).flatten(0, 1), nrow=1, padding=2)   # (4 * 6) rows, prompt-major
    Image.fromarray(grid).save(OUT / "strip.png")


def write_report() -> None:
    """report.md from results.json and, where they exist, tiles.json, outpaint.json and timing.json."""
    results = json.loads((OUT / "results.json").read_text())
    lines = ["# MultiDiffusion panoramas on shapes64", "",
             "Written by docs/eval/panorama/panorama_eval.py (its docstring has the commands).", "",
             f"{results['prompts']} held-out prompts; FD in the oracle's features of the 64x64 crops at every "
             f"{CROP_STEP} px ({results['crops_per_panorama']} a panorama) against as many native 64x64 samples "
             "of the same prompts by the same model. `native` is a second native set (other seeds): the floor.", "",
             "Run on a 2-core CPU machine shared with other jobs (load average 10-18), 2026-12-07, one thread "
             "(OMP_NUM_THREADS=1): the s / panorama column is wall time in batches of 8 under that load; the "
             "`timing` table below is the fairer comparison." + (f" Teacher rows: {results['teacher_rows']}."
                                                                 if "teacher_rows" in results else ""), "",
             "| model | size | run | windows | NFE / panorama | FD | crops | s / panorama (batches of 8) |",
             "|---|---|---|---|---|---|---|---|"]
    for key, row in results["runs"].items():
        parts = key.split("/")
        if parts[-1] == "native":
            lines.append(f"| {parts[0]} | 64x64 | native | - | - | {row['fd']:.3f} | {row['n']} | - |")
            continue
        model, shape, name = parts
        size = "256x64" if shape == "wide" else "64x256"
        lines.append(f"| {model} | {size} | {name} | {row['windows'] or '-'} | {row['nfe']} | {row['fd']:.3f} | "
                     f"{row['n']} | {row['s_per_panorama']:.2f} |")
    if (OUT / "tiles.json").is_file():
        tiles = json.loads((OUT / "tiles.json").read_text())
        lines += ["", f"Crop protocol baseline (`tiles`): 4 native {tiles['model']} samples of each prompt side by side, "
                  f"FD {tiles['fd']:.3f} over {tiles['n']} crops (every tile native, seams between them)."]
    if (OUT / "timing.json").is_file():
        timing = json.loads((OUT / "timing.json").read_text())
        lines += ["", f"Time per 256x64 panorama, one at a time, sampling + decoding, {timing['threads']} thread, "
                  f"median of {timing['prompts']} prompts interleaved (`timing`); CPU seconds are the process's "
                  "(the machine was shared, so wall time includes waiting):", "",
                  "| setting | median CPU s | median wall s |", "|---|---|---|"]
        lines += [f"| {key} | {timing['median_cpu_s'][key]:.3f} | {value:.3f} |"
                  for key, value in timing["median_s"].items()]
    if (OUT / "outpaint.json").is_file():
        out = json.loads((OUT / "outpaint.json").read_text())
        lines += ["", f"Outpainting (`outpaint`): {out['prompts']} native {out['model']} samples padded "
                  f"{out['pad']} (left, top, right, bottom) and painted with --window {out['window'][0]}:"
                  f"{out['window'][1]}; FD against 4 native samples a prompt (native sources themselves: "
                  f"{out['runs']['native']['fd']:.3f}).", "",
                  "| fill | FD of the new 64x64 half | FD of the crop across the seam | known half kept exactly |",
                  "|---|---|---|---|"]
        lines += [f"| {fill} | {row['fd_new_half']:.3f} | {row['fd_across_seam']:.3f} | "
                  f"{row['known_half_kept_exactly']} |" for fill, row in out["runs"].items() if fill != "native"]
        lines += ["", "outpaint.png: the first 6 prompts outpainted, edge fill (top row) and noise fill (bottom)."]
    lines += ["", "strip.png: for each of these prompts, six 256x64 rows: teacher plain, md-s32, md-s16, then "
              "student-4 plain, md-s32, md-s16.", ""]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(heldout_prompts(4, seed=0))]
    (OUT / "report.md").write_text("\n".join(lines) + "\n")


def outpaint(n: int) -> None:
    pipe = TextToImage.from_folder(decoder_precision="fp32")
    oracle = Oracle.load()
    prompts = heldout_prompts(n, seed=0)
    options = MODELS["student-4"]
    sources = native(pipe, prompts, 1, 2000, options)                  # the images to outpaint
    reference = oracle.features(native(pipe, prompts, 4, 3000, options))
    results = {"prompts": n, "pad": [0, 0, NATIVE, 0], "window": [NATIVE, 16], "model": "student-4", "runs": {}}
    shown = []
    for fill in ("edge", "noise"):
        start = time.perf_counter()
        out = []
        for i in range(0, n, BATCH):
            canvas, mask = outpaint_canvas(sources[i:i + BATCH], None, (0, 0, NATIVE, 0), fill,
                                           torch.Generator().manual_seed(i))
            images, _ = pipe.inpaint(canvas, mask, prompts[i:i + BATCH], seed=list(range(i, i + len(canvas))),
                                     window=(NATIVE, 16), **options)
            out.append(images)
        out = torch.cat(out)
        shown.append(out[:6])
        kept = bool(torch.equal(out[..., :NATIVE], sources))
        results["runs"][fill] = {"fd_new_half": frechet_distance(oracle.features(out[..., NATIVE:]), reference),
                                 "fd_across_seam": frechet_distance(oracle.features(out[..., 32:32 + NATIVE]),
                                                                    reference),
                                 "known_half_kept_exactly": kept, "wall_s": time.perf_counter() - start}
        print(fill, results["runs"][fill], flush=True)
    results["runs"]["native"] = {"fd": frechet_distance(oracle.features(sources), reference)}
    (OUT / "outpaint.json").write_text(json.dumps(results, indent=2) + "\n")
    from PIL import Image           # outpaint.png: the first 6 prompts, edge fill above noise fill
    Image.fromarray(make_grid(torch.cat(shown), nrow=6, padding=2)).save(OUT / "outpaint.png")


def tiles(n: int) -> None:
    """The crop protocol's own cost: panoramas made of 4 native student-4 samples of the prompt side by side (every
    tile native, seams between them), scored as `run` scores panoramas."""
    pipe = TextToImage.from_folder(decoder_precision="fp32")
    oracle = Oracle.load()
    prompts = heldout_prompts(n, seed=0)
    options = MODELS["student-4"]
    per = (256 - NATIVE) // CROP_STEP + 1
    reference = oracle.features(native(pipe, prompts, per, 1000, options))     # `run`'s reference, same seeds
    side = native(pipe, prompts, 4, 200000, options).view(n, 4, 3, NATIVE, NATIVE)
    panoramas = torch.cat(side.unbind(1), dim=-1)                               # (n, 3, 64, 256)
    result = {"model": "student-4", "prompts": n, "fd": frechet_distance(oracle.features(crops(panoramas)), reference),
              "n": n * per}
    print(result)
    (OUT / "tiles.json").write_text(json.dumps(result, indent=2) + "\n")


def timing(k: int) -> None:
    pipe = TextToImage.from_folder(decoder_precision="fp32")
    prompts = heldout_prompts(k, seed=0)
    settings = [(model, name) for model in MODELS for name in WINDOWS]
    times = {f"{m}/{w}": [] for m, w in settings}
    cpu = {f"{m}/{w}": [] for m, w in settings}
    for i, prompt in enumerate(prompts):
        for model, name in settings:
            start, start_cpu = time.perf_counter(), time.process_time()
            z, _ = pipe.sample([prompt], seed=i, size=SIZES["wide"], window=WINDOWS[name], **MODELS[model])
            pipe.decode(z)
            times[f"{model}/{name}"].append(time.perf_counter() - start)
            cpu[f"{model}/{name}"].append(time.process_time() - start_cpu)   # one thread: the work, not the wait
    result = {"prompts": k, "size": "256x64", "threads": torch.get_num_threads(),
              "median_s": {key: statistics.median(v) for key, v in times.items()},
              "median_cpu_s": {key: statistics.median(v) for key, v in cpu.items()}, "all_s": times, "all_cpu_s": cpu}
    print(json.dumps({"wall": result["median_s"], "cpu": result["median_cpu_s"]}, indent=2))
    (OUT / "timing.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)      # decode() keeps no graph: every image drawn here is kept until scored
    command, count = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None
    {"run": lambda: run(count or 32, sys.argv[3:] or list(MODELS)), "strip": strip, "outpaint": lambda: outpaint(count or 32),
     "tiles": lambda: tiles(count or 32), "timing": lambda: timing(count or 4), "report": write_report}[command]()
