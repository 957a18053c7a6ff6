"""Session-29 check: classifier-free guidance in a limited interval (Kynkaanniemi et al. 2024; --guidance-interval)
on the shipped teacher, against plain CFG, through the CLIs a user runs.

    OMP_NUM_THREADS=1 python docs/provenance/guidance_interval_eval.py run W [N]     # one guidance weight
    OMP_NUM_THREADS=1 python docs/provenance/guidance_interval_eval.py timing [K]    # sampling time, interleaved
    python docs/provenance/guidance_interval_eval.py compare [N]                     # after the runs

`run W` prints the teacher's 64-step DDIM grid as EDM sigma = sigma_t / alpha_t and which steps each interval
holds, writes N (default 200) held-out prompts (`heldout_prompts(N, seed=0)`), and for each interval in INTERVALS
runs, timed,

    python -m ldm.txt2img --from-file PROMPTS --outdir WORK/RUN --teacher --steps 64 --guidance W \
        [--guidance-interval LO:HI] --decoder-precision fp32
    python -m ldm.eval score --images WORK/RUN --prompts PROMPTS --out WORK/RUN.json

and wraps each score as a one-row report.json (OUT/reports/RUN/) that `python -m ldm.eval compare` reads.
`compare` runs `python -m ldm.eval compare A B --out ...` for the pairs in `pairs()` and writes OUT/report.md,
OUT/results.json and OUT/grid.png (the first 8 prompts of each run). WORK (the images) is /tmp/guidance-interval;
OUT is docs/eval/guidance-interval. Every prompt is drawn from seed 0 (txt2img --from-file's --seed), the same
noise in every run, so runs pair prompt by prompt.
`timing` draws the first K (default 10) prompts in one process with each interval in turn, prompt by prompt, so
that the machine's other load falls on every interval alike; sampling only (pipe.sample, no decoding), w = 2.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "eval" / "guidance-interval"
WORK = Path("/tmp/guidance-interval")
STEPS = 64
INTERVALS = {"plain": None,                # CFG at every step
             "i0.28-5.42": "0.28:5.42",    # the paper's SD-XL interval (their Fig. 7-8), also a latent model
             "i0.28-inf": "0.28:"}         # only the low-noise end cut: isolates the high-noise cut of the above
PY = sys.executable


def run_name(interval: str, w: float) -> str:
    return f"{interval}-w{w:g}"


def sh(cmd: list[str]) -> tuple[str, float]:
    """Run a command from the repo root; (stdout, wall seconds). Fails loudly."""
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout, wall


def print_grid():
    """The 64-step grid's noise levels and the steps each interval guides."""
    from ldm.diffusion.guidance import edm_sigma, in_interval
    from ldm.cli import parse_guidance_interval
    from ldm.pipeline import DEFAULT_MODEL, TextToImage
    pipe = TextToImage.from_folder(DEFAULT_MODEL)
    sigma = edm_sigma(pipe.schedule)(pipe.schedule.timesteps(STEPS)[:-1])
    print(f"teacher, {STEPS} trailing DDIM steps: sigma / alpha from {float(sigma[0]):.5g} down to "
          f"{float(sigma[-1]):.4g}; first 10: {', '.join(f'{float(s):.3g}' for s in sigma[:10])}")
    for name, text in INTERVALS.items():
        if text is not None:
            inside = in_interval(sigma, parse_guidance_interval(text))
            steps = inside.nonzero().flatten().tolist()
            print(f"  {name}: guides {len(steps)} of {STEPS} steps (indices {steps[0]}..{steps[-1]}, sigma "
                  f"{float(sigma[steps[0]]):.3g} to {float(sigma[steps[-1]]):.3g}): NFE {STEPS + len(steps)} a prompt")


def run(w: float, n: int):
    from ldm.eval.metrics import heldout_prompts
    WORK.mkdir(parents=True, exist_ok=True)
    prompts = WORK / f"prompts-{n}.txt"
    prompts.write_text("\n".join(heldout_prompts(n, seed=0)) + "\n")
    print_grid()
    for interval, text in INTERVALS.items():
        name = run_name(interval, w)
        outdir = WORK / name
        gen = [PY, "-m", "ldm.txt2img", "--from-file", str(prompts), "--outdir", str(outdir), "--teacher",
               "--steps", str(STEPS), "--guidance", f"{w:g}", "--decoder-precision", "fp32"]
        gen += [] if text is None else ["--guidance-interval", text]
        printed, wall = sh(gen)
        lines = re.findall(r"NFE (\d+), ([\d.]+) s", printed)           # one line per prompt: its NFE and time
        assert len(lines) == n, f"{len(lines)} images for {n} prompts"
        score = [PY, "-m", "ldm.eval", "score", "--images", str(outdir), "--prompts", str(prompts),
                 "--out", str(WORK / f"{name}.json")]
        table, _ = sh(score)
        print(table)
        result = json.loads((WORK / f"{name}.json").read_text())
        row = {"model": "teacher", "steps": STEPS, "guidance": w, "interval": text or "", "n": n,
               "accuracy": result["accuracy"], "one_object": result["one_object"],
               "two_object": result["two_object"], "per_attribute": result["per_attribute"], "fd": result["fd"],
               "fd_n": result["fd_n"], "nfe": int(lines[0][0]), "per_image_s": [float(s) for _, s in lines],
               "txt2img_wall_s": wall, "command": " ".join(gen[1:]).replace(str(ROOT) + "/", ""),
               "score_command": " ".join(score[1:]), "correct": result["correct"]}
        folder = OUT / "reports" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps({"n": n, "seed": 0, "rows": [row]}, indent=1))
        print(f"{name}: accuracy {100 * row['accuracy']:.1f}%, FD {row['fd']:.2f}, NFE {row['nfe']}, "
              f"{np.median(row['per_image_s']):.2f} s an image (median), txt2img {wall:.0f} s", flush=True)


def timing(k: int):
    from ldm.cli import parse_guidance_interval
    from ldm.eval.metrics import heldout_prompts
    from ldm.pipeline import DEFAULT_MODEL, TextToImage
    pipe = TextToImage.from_folder(DEFAULT_MODEL)
    seconds = {name: [] for name in INTERVALS}
    nfe = {}
    pipe.sample(["a red circle"], steps=4, teacher=True)                         # warm-up
    for prompt in heldout_prompts(k, seed=0):
        for name, text in INTERVALS.items():
            start = time.perf_counter()
            _, info = pipe.sample([prompt], steps=STEPS, teacher=True, guidance=2.0, seed=0,
                                  guidance_interval=None if text is None else parse_guidance_interval(text))
            seconds[name].append(time.perf_counter() - start)
            nfe[name] = info["nfe"]
    result = {name: {"nfe": nfe[name], "median_s": float(np.median(v)), "s": v} for name, v in seconds.items()}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "timing.json").write_text(json.dumps({"k": k, "threads": torch.get_num_threads(), **result}, indent=1))
    for name, r in result.items():
        print(f"{name}: NFE {r['nfe']}, median {r['median_s']:.3f} s a prompt "
              f"({r['median_s'] / result['plain']['median_s']:.3f}x plain; NFE ratio "
              f"{r['nfe'] / result['plain']['nfe']:.3f})")


def pairs(ws: list[float]) -> list[tuple[str, str]]:
    """Per w: each interval against plain CFG, and the two intervals against each other; across w: each interval
    at the high w against plain CFG at the default w (the paper's point: a limited interval bears a higher w)."""
    out = []
    for w in ws:
        out += [(run_name("plain", w), run_name(i, w)) for i in INTERVALS if i != "plain"]
        out.append((run_name("i0.28-inf", w), run_name("i0.28-5.42", w)))
    lo, hi = min(ws), max(ws)
    out += [(run_name("plain", lo), run_name(i, hi)) for i in INTERVALS] if hi > lo else []
    return out


def order(rows: dict) -> list[str]:
    """Run names by w, then as INTERVALS lists them."""
    return sorted(rows, key=lambda r: (rows[r]["guidance"], list(INTERVALS).index(r.rsplit("-w", 1)[0])))


def runs_table(rows: dict, n: int) -> list[str]:
    out = [f"| run | w | interval | NFE / image | accuracy | one-object | two-object | FD (N = {n}) | "
           "s / image (median) | txt2img wall |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in order(rows):
        r = rows[name]
        out.append(f"| {name} | {r['guidance']:g} | {r['interval'] or 'everywhere'} | {r['nfe']} | "
                   f"{100 * r['accuracy']:.1f}% | {100 * r['one_object']:.1f}% | {100 * r['two_object']:.1f}% | "
                   f"{r['fd']:.2f} | {np.median(r['per_image_s']):.2f} | {r['txt2img_wall_s']:.0f} s |")
    return out


def paired_table(results: list[dict]) -> list[str]:
    out = ["| A | B | A | B | B - A (points) | 95% CI | right in A only / B only | p (McNemar) |",
           "|---|---|---|---|---|---|---|---|"]
    for c in results:
        lo, hi = (100 * x for x in c["ci95"])
        out.append(f"| {c['a']} | {c['b']} | {100 * c['acc_a']:.1f}% | {100 * c['acc_b']:.1f}% | "
                   f"{100 * c['diff']:+.1f} | [{lo:+.1f}, {hi:+.1f}] | {c['a_only']} / {c['b_only']} | {c['p']:.3g} |")
    return out


def compare(n: int):
    names = sorted(p.name for p in (OUT / "reports").iterdir() if (p / "report.json").exists())
    rows = {name: json.loads((OUT / "reports" / name / "report.json").read_text())["rows"][0] for name in names}
    results = []
    for a, b in pairs(sorted({row["guidance"] for row in rows.values()})):
        if a in rows and b in rows:
            specs = [f"{(OUT / 'reports' / x).relative_to(ROOT)}:teacher-{STEPS}-w{rows[x]['guidance']:g}"
                     for x in (a, b)]
            printed, _ = sh([PY, "-m", "ldm.eval", "compare", *specs, "--out", str(WORK / "c.json")])
            print(printed)
            results += [{"a": a, "b": b, **{k: v for k, v in c.items() if k not in ("run_a", "run_b")}}
                        for c in json.loads((WORK / "c.json").read_text())]
    summary = {name: {**{k: v for k, v in r.items() if k != "per_image_s"},
                      "median_s_per_image": float(np.median(r["per_image_s"]))} for name, r in rows.items()}
    (OUT / "results.json").write_text(json.dumps({"runs": summary, "paired": results}, indent=1))
    timed = []
    if (OUT / "timing.json").exists():
        t = json.loads((OUT / "timing.json").read_text())
        timed = ["", f"Sampling time, interleaved (`timing`: {t['k']} prompts, {t['threads']} thread, w = 2):", "",
                 "| interval | NFE | median s / prompt | vs plain |", "|---|---|---|---|"]
        timed += [f"| {INTERVALS[name] or 'everywhere'} | {t[name]['nfe']} | {t[name]['median_s']:.3f} | "
                  f"{t[name]['median_s'] / t['plain']['median_s']:.3f}x |" for name in INTERVALS]
    text = "\n".join(["# CFG in a limited interval on the shipped teacher", "",
                      "Written by docs/provenance/guidance_interval_eval.py (its docstring has the commands).", "",
                      *runs_table(rows, n), "", "Paired (`python -m ldm.eval compare`):", "", *paired_table(results),
                      *timed, "", f"grid.png: one row per run ({', '.join(order(rows))}), the first 8 prompts.", ""])
    (OUT / "report.md").write_text(text)
    tiles = [[np.asarray(Image.open(WORK / name / f"{i:04d}.png").convert("RGB")) for i in range(min(8, n))]
             for name in order(rows)]
    Image.fromarray(np.concatenate([np.concatenate(row, axis=1) for row in tiles], axis=0)).save(OUT / "grid.png")
    print(text)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if sys.argv[1] == "run":
        run(float(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 200)
    elif sys.argv[1] == "timing":
        timing(int(sys.argv[2]) if len(sys.argv) > 2 else 10)
    else:
        compare(int(sys.argv[2]) if len(sys.argv) > 2 else 200)
