"""`python -m ldm.eval report`: accuracy, FD and speed of a teacher and its students on held-out prompts.

Runs: the teacher with DDIM and classifier-free guidance at each teacher step count (NFE = 2 x steps
for w > 0), each distilled student of the model folder at its own step count (NFE = steps), and
guidance sweeps over the same weights of the teacher at 64 steps (else its largest step count) and of
one student (4 steps by default): the student takes w as an input (Meng et al. 2023, stage one), so
one network gives the whole quality-diversity trade-off at a fixed NFE, as the paper's FID/IS
curves show. Every run draws the same N held-out prompts (`metrics.heldout_prompts`) with the same
noise per batch, so rows differ only by the sampler (common random numbers). Images are quantised to
uint8, as a PNG would hold them, judged by the oracle and compared with the N real held-out scenes
those prompts describe (score.py).

Writes into the output folder: report.md, report.json, quality_vs_nfe.png, quality_vs_w.png, and
samples/<run>.png (the first 16 prompts, listed in samples/prompts.txt).
"""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ldm.eval.compare import paired
from ldm.eval.metrics import heldout_prompts
from ldm.eval.score import evaluate_images, finite, percent, real_images, to_uint8

GRID = 16             # images per sample grid
REFERENCE_STEPS = 64  # the teacher the goals compare with (else the largest step count run)
# Stage goals (docs/stage3-distill.md): students close to the 64-step teacher, far faster.
ACC_POINTS = {4: 2.0, 2: 5.0}  # student steps -> most accuracy points it may lose
FD_RATIO_4 = 1.2               # 4-step student FD at most this times the teacher's
SPEEDUP_4 = 20.0               # wall-clock speed-up of the 4-step student at least this


@dataclass(frozen=True)
class Run:
    """One way of sampling: which network, how many steps, which guidance weight."""

    model: str        # "teacher" or "student-N"
    steps: int
    guidance: float

    @property
    def name(self) -> str:
        steps = f"-{self.steps}" if self.teacher else ""  # a student's name holds its steps
        return f"{self.model}{steps}-w{self.guidance:g}"

    @property
    def teacher(self) -> bool:
        return self.model == "teacher"


# ------------------------------------------------------------------------------ sampling

def batch_seed(seed: int, batch: int) -> int:
    """The noise seed of one batch: independent per (seed, batch) and equal across runs."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_run(pipe, run: Run, prompts: list[str], seed: int, batch: int, bar,
               student_sampler: str = "ddim", teacher_sampler: str = "ddim",
               guidance_interval=None, pag=None, apg=None, teacher_eta=None) -> tuple[torch.Tensor, dict]:
    """uint8 images (N, 3, R, R) of one run and its {nfe, seconds_per_image}; wall time covers
    text encoding, sampling and decoding, not the oracle. guidance_interval: the teacher's (`cfg`'s interval);
    pag: (scale, layers), the teacher's perturbed-attention guidance (`TextToImage.sample`'s pag_scale, pag_layers)."""
    limit = {"guidance_interval": guidance_interval} if run.teacher and guidance_interval is not None else {}
    if run.teacher and pag is not None:
        limit.update(pag_scale=pag[0], pag_layers=list(pag[1]))
    if run.teacher and apg is not None:               # an APG: its momentum starts afresh in each batch's run
        limit["apg"] = apg
    if run.teacher and teacher_eta is not None:       # the teacher's sampler noise (`TextToImage.sample`'s eta)
        limit["eta"] = teacher_eta
    images, seconds, nfe = [], 0.0, None
    for b, start in enumerate(range(0, len(prompts), batch)):
        _sync(pipe.device)
        t0 = time.perf_counter()
        out, info = pipe.generate(prompts[start:start + batch], steps=run.steps, guidance=run.guidance,
                                  seed=batch_seed(seed, b), teacher=run.teacher,
                                  sampler=teacher_sampler if run.teacher else student_sampler, **limit)
        _sync(pipe.device)
        seconds += time.perf_counter() - t0
        if info["model"] != run.model:
            raise RuntimeError(f"asked for {run.model} at {run.steps} steps, the pipeline ran {info['model']}")
        images.append(to_uint8(out))
        nfe = info["nfe"]
        bar.update(1)
    return torch.cat(images), {"nfe": nfe, "seconds_per_image": seconds / len(prompts)}


def warm_up(pipe, run: Run, prompts: list[str]) -> None:
    """One untimed batch (loads a student, settles kernels) so timings measure steady sampling."""
    pipe.generate(prompts, steps=1 if run.teacher else run.steps, guidance=run.guidance, teacher=run.teacher)


def plan(teacher_steps: list[int], student_steps: list[int], available: list[int], w: float,
         ws: list[float], student_sweep: int = 0) -> tuple[list[Run], list[Run], int, list[Run]]:
    """The table's runs (teacher curve, then students), the teacher's w-sweep runs, that sweep's step
    count, and the w-sweep runs of the student-`student_sweep` (none if 0 or the folder has no such one)."""
    table = [Run("teacher", s, w) for s in sorted(teacher_steps)]
    table += [Run(f"student-{s}", s, w) for s in sorted(student_steps) if s in available]
    sweep_steps = REFERENCE_STEPS if REFERENCE_STEPS in teacher_steps else max(teacher_steps)
    students = [Run(f"student-{student_sweep}", student_sweep, float(x)) for x in ws] \
        if student_sweep in available else []
    return table, [Run("teacher", sweep_steps, float(x)) for x in ws], sweep_steps, students


# ------------------------------------------------------------------------------- goals

def accuracy_goal(student: dict, teacher: dict, points: float) -> tuple[bool, str]:
    """Met on the point estimate (the goal is one run); the detail adds the paired 95% CI (compare.py)."""
    diff = 100 * (student["accuracy"] - teacher["accuracy"])
    detail = f"{percent(student['accuracy'])} vs {percent(teacher['accuracy'])} ({diff:+.1f} points"
    if "correct" in student and "correct" in teacher:
        lo, hi = (100 * x for x in paired(teacher["correct"], student["correct"])["ci95"])
        detail += f", paired 95% CI [{lo:+.1f}, {hi:+.1f}]"
    return not math.isnan(diff) and diff >= -points, detail + ")"


def fd_goal(student: dict, teacher: dict, ratio: float) -> tuple[bool, str]:
    measured = student["fd"] / teacher["fd"] if teacher["fd"] > 0 else math.inf
    return (student["fd"] <= ratio * teacher["fd"],
            f"FD {student['fd']:.4g} vs {teacher['fd']:.4g} ({measured:.2f}x)")


def speed_goal(student: dict, teacher: dict, factor: float) -> tuple[bool, str]:
    measured = teacher["seconds_per_image"] / student["seconds_per_image"]
    return measured >= factor, (f"{1e3 * student['seconds_per_image']:.2f} vs "
                                f"{1e3 * teacher['seconds_per_image']:.2f} ms per image ({measured:.1f}x)")


def goals(rows: list[dict], reference: dict) -> list[dict]:
    """Stage goals against the reference teacher row: {goal, status (met | not met | not run), detail}."""
    ref = f"the {reference['steps']}-step teacher"
    checks = [  # (student steps, goal, check)
        (4, f"4-step student accuracy within {ACC_POINTS[4]:g} points of {ref}",
         lambda row: accuracy_goal(row, reference, ACC_POINTS[4])),
        (4, f"4-step student FD <= {FD_RATIO_4:g}x {ref}'s", lambda row: fd_goal(row, reference, FD_RATIO_4)),
        (2, f"2-step student accuracy within {ACC_POINTS[2]:g} points of {ref}",
         lambda row: accuracy_goal(row, reference, ACC_POINTS[2])),
        (4, f"4-step student wall-clock speed-up >= {SPEEDUP_4:g}x over {ref}",
         lambda row: speed_goal(row, reference, SPEEDUP_4)),
    ]
    students = {r["steps"]: r for r in rows if r["model"].startswith("student")}
    out = []
    for steps, goal, check in checks:
        if steps not in students:
            detail = f"no {steps}-step student in the model folder"
            out.append({"goal": goal, "status": "not run", "detail": detail})
            continue
        met, detail = check(students[steps])
        out.append({"goal": goal, "status": "met" if met else "not met", "detail": detail})
    return out


# ------------------------------------------------------------------------------- plots

def _axes_pair(title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    fig.suptitle(title)
    return plt, fig, axes


def plot_nfe(rows: list[dict], path: Path) -> None:
    """Accuracy and FD against NFE: the teacher as a curve, each student as a labelled point."""
    plt, fig, axes = _axes_pair(f"quality against network evaluations (w = {rows[0]['guidance']:g})")
    teacher = sorted((r for r in rows if r["model"] == "teacher"), key=lambda r: r["nfe"])
    students = [r for r in rows if r["model"] != "teacher"]
    for ax, key, label in ((axes[0], "accuracy", "prompt accuracy (%)"), (axes[1], "fd", "FD (lower is better)")):
        scale = 100 if key == "accuracy" else 1
        ax.plot([r["nfe"] for r in teacher], [scale * r[key] for r in teacher], "o-", label="teacher (DDIM + CFG)")
        for r in students:
            ax.plot(r["nfe"], scale * r[key], "s", markersize=8, label=r["model"])
        ax.set_xscale("log", base=2)
        nfes = sorted({r["nfe"] for r in rows})
        ax.set_xticks(nfes, [str(x) for x in nfes])
        ax.minorticks_off()
        ax.set_xlabel("NFE per image")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_w(rows: list[dict], path: Path, student_rows: list[dict] = ()) -> None:
    """Accuracy and FD against the guidance weight w: the teacher, and a student when swept."""
    plt, fig, axes = _axes_pair("quality against guidance w")
    curves = [(f"teacher, {rows[0]['steps']} DDIM steps", rows)]
    if student_rows:
        curves.append((f"{student_rows[0]['model']} ({student_rows[0]['nfe']} NFE)", student_rows))
    for label, curve in curves:
        curve = sorted(curve, key=lambda r: r["guidance"])
        ws = [r["guidance"] for r in curve]
        axes[0].plot(ws, [100 * r["accuracy"] for r in curve], "o-", label=label)
        axes[1].plot(ws, [r["fd"] for r in curve], "o-", label=label)
    axes[0].set_ylabel("prompt accuracy (%)")
    axes[1].set_ylabel("FD (lower is better)")
    for ax in axes:
        ax.set_xlabel("w in (1 + w) cond - w uncond")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- markdown

def _table(rows: list[dict], first: list[tuple[str, Callable[[dict], str]]]) -> list[str]:
    """A markdown table: the `first` columns (header, cell maker), then accuracy, FD and timing."""
    attrs = sorted({a for r in rows for a in r["per_attribute"]})
    head = [h for h, _ in first] + ["accuracy", "one-object", "two-object", *attrs, "FD", "ms / image", "samples"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f(r) for _, f in first] + [percent(r[k]) for k in ("accuracy", "one_object", "two_object")]
        cells += [percent(r["per_attribute"][a]["accuracy"]) if a in r["per_attribute"] else "" for a in attrs]
        cells += [f"{r['fd']:.4g}", f"{1e3 * r['seconds_per_image']:.2f}", f"[grid]({r['grid']})"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    """report.md: the runs table, the goals, the w sweep and the plots."""
    rows, sweep = report["rows"], report["sweep"]
    lines = [f"# Evaluation of `{report['name']}`", "",
             f"Model folder `{report['model']}`; {report['n']} held-out prompts (seed {report['seed']}, "
             f"alternating one- and two-object); guidance w = {report['guidance']:g} "
             f"(Imagen convention, (1 + w) cond - w uncond); {report.get('sampler', 'ddim')} for the teacher"
             + (f" at eta {report['teacher_eta']:g}" if report.get("teacher_eta") is not None else "")
             + "".join(f" with the LoRA `{path}` at scale {scale:g}" for path, scale in report.get("loras", []))
             + (" and CFG only where {:g} < sigma / alpha <= {:g}".format(*report["guidance_interval"])
                if report.get("guidance_interval") else "")
             + (" with perturbed-attention guidance s = {:g} on {}".format(report["pag"]["scale"],
                                                                           ", ".join(report["pag"]["layers"]))
                if report.get("pag") else "")
             + (" as adaptive projected guidance, R:ETA:BETA {}".format(report["apg"]) if report.get("apg") else "") +
             ", "
             f"{report['student_sampler']} for the students; "
             f"device: {report['device']}, torch {report['torch']}; "
             f"decoder in {report['decoder_precision']}.", "",
             "Accuracy: share of prompts whose every asked attribute holds, judged by the oracle "
             "(docs/eval.md); per-attribute columns: share of asks of that attribute that hold. "
             f"FD: Frechet distance in the oracle's feature space to {report['n']} real held-out images "
             "(lower is better). Wall time per image covers text encoding, sampling and decoding.", "",
             "## Teacher and students", ""]
    lines += _table(rows, [("run", lambda r: r["model"]), ("steps", lambda r: str(r["steps"])),
                           ("NFE", lambda r: str(r["nfe"]))])
    if report["missing_students"]:
        lines += ["", f"No student in the model folder for {report['missing_students']} steps."]
    lines += ["", "## Goals", ""]
    lines += [f"- **{g['status']}**: {g['goal']}: {g['detail']}" for g in report["goals"]]
    lines += ["", f"## Guidance sweep (teacher, {sweep['steps']} {report.get('sampler', 'ddim')} steps)", ""]
    sweep_columns = [("w", lambda r: f"{r['guidance']:g}"), ("NFE", lambda r: str(r["nfe"]))]
    lines += _table(sweep["rows"], sweep_columns)
    student = report.get("student_sweep")
    if student:
        lines += ["", f"## Guidance sweep ({student['model']}, {report['student_sampler']}: one network, "
                  "w as its input)", ""]
        lines += _table(student["rows"], sweep_columns)
    lines += ["", "## Plots", "", f"![quality against NFE]({report['plots']['nfe']})", "",
              f"![quality against w]({report['plots']['w']})", "",
              f"Sample grids show the first {GRID} prompts, listed in `samples/prompts.txt`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ report

def make_report(model: str | Path, out_dir: str | Path, *, n: int = 500, seed: int = 0,
                teacher_steps=(8, 16, 32, 64), student_steps=(1, 2, 4, 8), guidance: float | None = None,
                ws=(0, 1, 2, 3, 5, 8), batch: int = 50, device: str | None = None, oracle=None,
                student_sampler: str = "ddim", decoder_precision: str = "auto", student_sweep: int = 4,
                teacher_sampler: str = "ddim", loras=(), guidance_interval=None, pag=None, apg=None,
                teacher_eta: float | None = None) -> dict:
    """Evaluate the model folder, write the report files into out_dir and return report.json's dict.

    loras: (path, scale) pairs merged into the teacher, e.g. an LCM-LoRA from stages/distill_lcm.py sampled with
    teacher_sampler="lcm" at a few teacher_steps. The students are not run then: the merge would reach them too,
    and they were distilled from the teacher without it. guidance_interval: (lo, hi), the teacher's CFG only where
    lo < sigma_t / alpha_t <= hi (Kynkaanniemi et al. 2024, docs/sampling.md); teacher only, so no students then.
    pag: (scale, layer names), the teacher's perturbed-attention guidance (Ahn et al. 2024); no students then.
    apg: an APG (ldm.diffusion.guidance), the teacher's CFG as adaptive projected guidance (Sadat et al. 2024);
    no students then. teacher_eta: the teacher's sampler noise, DDIM's eta or TCD's gamma (None: the sampler's)."""
    from tqdm import tqdm

    from ldm.eval.oracle import Oracle
    from ldm.cli import format_apg
    from ldm.pipeline import TextToImage
    from ldm.training.images import save_image_grid

    if n < 2 or batch < 1 or not teacher_steps or min(teacher_steps) < 1 or not ws:
        raise ValueError(f"need n >= 2, batch >= 1, teacher steps >= 1 and some ws; got n={n}, batch={batch}, "
                         f"teacher_steps={list(teacher_steps)}, ws={list(ws)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = TextToImage.from_folder(str(model), device=device, decoder_precision=decoder_precision)
    for path, scale in loras:
        pipe.add_lora(str(path), scale)
    if pag is not None:
        from ldm.models.unet import self_attention_layers
        pipe.unet_only("perturbed-attention guidance")
        self_attention_layers(pipe.unet, pag[1])             # unknown layer names: an error before any sampling
    if loras or guidance_interval is not None or pag is not None or apg is not None:
        student_steps, student_sweep = (), 0
    oracle = oracle or Oracle.load()
    w = pipe.index.guidance if guidance is None else float(guidance)
    out_dir = Path(out_dir)
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)

    prompts = heldout_prompts(n, seed)
    real_features = oracle.features(real_images(n, seed, pipe.index.resolution))
    (out_dir / "samples" / "prompts.txt").write_text("\n".join(prompts[:GRID]) + "\n")

    table, sweep, sweep_steps, student_sweep_runs = plan(list(teacher_steps), list(student_steps),
                                                         pipe.student_steps, w, list(ws), student_sweep)
    runs = list(dict.fromkeys(table + sweep + student_sweep_runs))  # a sweep's w = guidance run is a table run
    results, warm = {}, set()
    bar = tqdm(total=len(runs) * math.ceil(n / batch), desc="report", unit="batch")
    for run in runs:
        bar.set_description(run.name)
        if run.model not in warm:
            warm_up(pipe, run, prompts[:batch])
            warm.add(run.model)
        images, timing = sample_run(pipe, run, prompts, seed, batch, bar, student_sampler, teacher_sampler,
                                    guidance_interval, pag, apg, teacher_eta)
        grid = f"samples/{run.name}.png"
        save_image_grid(images[:GRID].float() / 127.5 - 1, out_dir / grid, nrow=4)
        results[run] = {"model": run.model, "steps": run.steps, "guidance": run.guidance, **timing,
                        **evaluate_images(oracle, images, prompts, real_features), "grid": grid}
    bar.close()

    rows = [results[r] for r in table]
    student_rows = [results[r] for r in student_sweep_runs]
    reference = results[Run("teacher", sweep_steps, w)]
    report = {"name": Path(model).resolve().name, "model": str(model), "device": device_name(pipe.device),
              "torch": torch.__version__, "n": n, "seed": seed, "guidance": w, "sampler": teacher_sampler,
              "teacher_eta": teacher_eta,
              "loras": [[str(path), scale] for path, scale in loras],
              "guidance_interval": None if guidance_interval is None else [float(v) for v in guidance_interval],
              "apg": None if apg is None else format_apg(apg),
              "pag": None if pag is None else {"scale": float(pag[0]), "layers": list(pag[1])},
              "student_sampler": student_sampler, "decoder_precision": pipe.decoder_precision,
              "rows": rows, "goals": goals(rows, reference),
              "missing_students": [s for s in sorted(student_steps) if s not in pipe.student_steps],
              "sweep": {"steps": sweep_steps, "rows": [results[r] for r in sweep]},
              "student_sweep": {"model": student_sweep_runs[0].model, "steps": student_sweep,
                                "rows": student_rows} if student_sweep_runs else None,
              "plots": {"nfe": "quality_vs_nfe.png", "w": "quality_vs_w.png"}}
    plot_nfe(rows, out_dir / report["plots"]["nfe"])
    plot_w(report["sweep"]["rows"], out_dir / report["plots"]["w"], student_rows)
    report = finite(report)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out_dir / "report.md").write_text(markdown(report))
    return report
