"""EDM2's post-hoc EMA reconstruction (Karras et al. 2024, sec. 3.2 and appendix C.2): any EMA length, after training.

    python -m ldm.training.posthoc_ema RUN_DIR --sigma-rel 0.08 [--step N] --out MODEL_DIR
    python -m ldm.training.posthoc_ema RUN_DIR --gamma 10 --out weights.safetensors   # the weights alone
    python -m ldm.training.posthoc_ema RUN_DIR --sweep [--sigma-rel 0.03 0.05 ...] [--step N]

A run with train.posthoc_ema on leaves snapshots of its power-function EMAs (ldm/training/power_ema.py) in
RUN_DIR/posthoc-ema/. Snapshot i averaged the weights with the profile p_i (exponent gamma_i, ending at update t_i);
the target profile p* (gamma, ending at t) is matched in L2 by weights x of the snapshots,
    min_x || sum_i x_i p_i - p* ||^2   =>   A x = b,   A_ij = <p_i, p_j>,  b_i = <p_i, p*>,
where two power profiles' inner product is closed form (Eq. 151, Algorithm 3):
    <p_a, p_b> = (g_a + 1)(g_b + 1) / ((g_a + g_b + 1) max(t_a, t_b)) * (t_a / t_b)^(g_b if t_a < t_b else -g_a).
x is normalised to sum to 1 (each profile integrates to 1: constant weights stay constant), and the result is
sum_i x_i theta_i. The discrete EMA weighs step s exactly by p's integral over (s-1, s], so the rebuilt weights differ
from a directly tracked EMA only by the profile error: |rebuilt - direct| <= ||sum x_i p_i - p*|| ||theta||_L2
(Cauchy-Schwarz), which --sweep lists relative to ||p*||. Only snapshots at or before the ending step are used.

The model folder is RUN_DIR/model/ (what the stage wrote: autoencoder, index, frozen parts) with every tracked tensor
replaced, "unet.<key>" in unet/model.safetensors and "text_encoder.<key>" in text_encoder/, in that file's dtype.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ldm.models.weights import edited_copy, write_safetensors, write_safetensors_atomic

from .power_ema import SNAPSHOT_DIR, SNAPSHOT_FORMAT, SNAPSHOT_PATTERN, gamma_of_sigma_rel, sigma_rel_of_gamma

RECORD = "posthoc_ema.json"                                # written into each rebuilt model folder
SWEEP = [0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20, 0.25]


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int                                              # the training step it was written at
    updates: int                                           # t: the EMA updates it averages
    sigma_rel: float
    gamma: float


def list_snapshots(run: str | Path) -> list[Snapshot]:
    """RUN/posthoc-ema/'s snapshots, by step then sigma_rel; a missing folder or a foreign file is named."""
    folder = Path(run) / SNAPSHOT_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: was {run} trained with train.posthoc_ema.sigma_rels set?")
    found = []
    for path in sorted(folder.glob("phema-*.safetensors")):
        if not SNAPSHOT_PATTERN.match(path.name):
            continue
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{path} is not a post-hoc EMA snapshot (metadata format {meta.get('format')!r})")
        found.append(Snapshot(path, int(meta["step"]), int(meta["updates"]), float(meta["sigma_rel"]),
                              float(meta["gamma"])))
    if not found:
        raise FileNotFoundError(f"{folder} holds no snapshots (phema-<step>-<sigma_rel>.safetensors)")
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


# ----------------------------------------------------------------------------- least squares (appendix C.2)

def profile_inner(t_a, g_a, t_b, g_b) -> np.ndarray:
    """<p_a, p_b> of power profiles (exponent g, ending at t) in closed form (Eq. 151); numpy-broadcast."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    ratio_exp = np.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * (t_a / t_b) ** ratio_exp / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def solve_weights(ts, gammas, t: float, gamma: float) -> tuple[np.ndarray, float]:
    """Snapshot weights x (summing to 1) whose profile best matches (t, gamma) in L2, and its relative L2 error."""
    ts, gammas = np.asarray(ts, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    A = profile_inner(ts[:, None], gammas[:, None], ts[None, :], gammas[None, :])   # (n, n) Gram matrix
    b = profile_inner(ts, gammas, t, gamma)                                          # (n,)
    x = np.linalg.lstsq(A, b, rcond=None)[0]       # A is positive definite unless two snapshots coincide
    x = x / x.sum()
    target = profile_inner(t, gamma, t, gamma)     # ||p*||^2 = (gamma + 1)^2 / ((2 gamma + 1) t)
    err2 = x @ A @ x - 2 * x @ b + target          # ||sum x_i p_i - p*||^2
    return x, float(np.sqrt(max(err2, 0.0) / target))


def plan(snapshots: list[Snapshot], sigma_rel: float | None = None, gamma: float | None = None,
         step: int | None = None) -> tuple[list[Snapshot], np.ndarray, float, Snapshot]:
    """(snapshots used, their weights, relative profile error, the snapshot fixing t) for the target at `step`
    (default: the last snapshot's). The ending update count t is that of the snapshots written at `step`."""
    if (sigma_rel is None) == (gamma is None):
        raise ValueError("give exactly one of sigma_rel and gamma")
    gamma = gamma_of_sigma_rel(sigma_rel) if gamma is None else float(gamma)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    step = snapshots[-1].step if step is None else step
    at = [s for s in snapshots if s.step == step]
    if not at:
        steps = sorted({s.step for s in snapshots})
        shown = ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"
        raise ValueError(f"no snapshot at step {step}; the run wrote them at steps {shown}")
    used = [s for s in snapshots if s.step <= step]
    x, err = solve_weights([s.updates for s in used], [s.gamma for s in used], at[0].updates, gamma)
    return used, x, err, at[0]


@torch.no_grad()
def combine(snapshots: list[Snapshot], weights: np.ndarray) -> dict[str, torch.Tensor]:
    """sum_i weights_i * snapshot_i, accumulated in float64, returned in float32."""
    total: dict[str, torch.Tensor] = {}
    for snap, w in zip(snapshots, weights):
        with safe_open(str(snap.path), "pt") as f:
            keys = set(f.keys())
            if total and keys != set(total):
                raise ValueError(f"{snap.path} holds other tensors than the earlier snapshots "
                                 f"({sorted(keys ^ set(total))[:5]}): not one run's snapshots")
            for k in keys:
                t = f.get_tensor(k).double() * float(w)
                total[k] = total[k].add_(t) if k in total else t
    return {k: v.float() for k, v in total.items()}


# ----------------------------------------------------------------------------- writing

def write_model_folder(state: dict[str, torch.Tensor], template: Path, out: Path, record: dict) -> None:
    """`template` (a model folder of the run) copied to `out` with the tensors of `state` replaced; atomic."""
    if not (template / "model_index.json").is_file():
        raise FileNotFoundError(f"{template} is not a model folder (no model_index.json): the stage writes RUN/model "
                                "at validate_every and at the end; pass --template MODEL_DIR")
    if out.exists() and not (out / RECORD).is_file():
        raise FileExistsError(f"--out {out} exists and was not written by ldm.training.posthoc_ema: pick a new folder")
    by_part: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        part, _, name = key.partition(".")
        by_part.setdefault(part, {})[name] = t
    with edited_copy(template, out) as tmp:
        (tmp / RECORD).unlink(missing_ok=True)
        for part, tensors in by_part.items():
            path = tmp / part / "model.safetensors"
            if not path.is_file():
                raise ValueError(f"the snapshots hold '{part}.*' tensors, the template {template} has no "
                                 f"{part}/model.safetensors")
            with safe_open(str(path), "pt") as f:
                meta, own = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
            wrong = sorted(k for k in tensors if k not in own or own[k].shape != tensors[k].shape)
            if wrong:
                raise ValueError(f"{template}/{part}/model.safetensors does not fit the snapshots at {wrong[:5]}: "
                                 "is it this run's model folder?")
            own.update({k: v.to(own[k].dtype).contiguous() for k, v in tensors.items()})
            write_safetensors(own, path, meta)
        (tmp / RECORD).write_text(json.dumps(record, indent=2))


def sweep_rows(snapshots: list[Snapshot], sigma_rels: list[float], step: int | None) -> list[dict]:
    """Relative profile error and largest |weight| of each target (the weights scale snapshot rounding errors)."""
    rows = []
    for s in sigma_rels:
        used, x, err, end = plan(snapshots, sigma_rel=s, step=step)
        rows.append({"sigma_rel": s, "gamma": gamma_of_sigma_rel(s), "step": end.step, "snapshots": len(used),
                     "relative_error": err, "max_abs_weight": float(np.abs(x).max())})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm.training.posthoc_ema", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Karras et al. 2024 (EDM2), sec. 3 and appendix C: the paper's snapshots "
                                            "track sigma_rel 0.05 and 0.10 (gamma 16.97 and 6.94)")
    parser.add_argument("run", type=Path, help="a run's output_dir (holds posthoc-ema/ and model/)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--sigma-rel", type=float, nargs="+", help="the EMA's width relative to its length "
                        "(one value; several with --sweep)")
    target.add_argument("--gamma", type=float, help="or the power function's exponent")
    parser.add_argument("--step", type=int, default=None, help="ending step, one with snapshots (default: the last)")
    parser.add_argument("--out", type=Path, help="a model folder to write, or FILE.safetensors for the weights alone")
    parser.add_argument("--template", type=Path, default=None, help="the model folder to fill (default: RUN/model)")
    parser.add_argument("--sweep", action="store_true", help="list the reconstruction error of several sigma_rels")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        snapshots = list_snapshots(args.run)
        if args.sweep:
            if args.gamma is not None or args.out is not None:
                parser.error("--sweep lists errors for --sigma-rel values; it takes no --gamma or --out")
            print(f"{'sigma_rel':>9} {'gamma':>8} {'step':>7} {'snaps':>5} {'rel. L2 error':>13} {'max |weight|':>12}")
            for r in sweep_rows(snapshots, args.sigma_rel or SWEEP, args.step):
                print(f"{r['sigma_rel']:9.3f} {r['gamma']:8.3f} {r['step']:7d} {r['snapshots']:5d} "
                      f"{r['relative_error']:13.2e} {r['max_abs_weight']:12.3f}")
            return
        if args.out is None or (args.sigma_rel is None and args.gamma is None):
            parser.error("give --sigma-rel S or --gamma G, and --out (or --sweep)")
        if args.sigma_rel is not None and len(args.sigma_rel) != 1:
            parser.error("one --sigma-rel value without --sweep")
        sigma_rel = args.sigma_rel[0] if args.sigma_rel else None
        used, x, err, end = plan(snapshots, sigma_rel=sigma_rel, gamma=args.gamma, step=args.step)
        gamma = args.gamma if args.gamma is not None else gamma_of_sigma_rel(sigma_rel)
        record = {"sigma_rel": sigma_rel_of_gamma(gamma), "gamma": gamma, "step": end.step, "updates": end.updates,
                  "relative_error": err, "sources": [{"file": s.path.name, "weight": float(w)} for s, w in zip(used, x)]}
        state = combine(used, x)
        if args.out.suffix == ".safetensors":
            write_safetensors_atomic(state, args.out, {k: str(v) for k, v in record.items() if k != "sources"})
        else:
            write_model_folder(state, args.template or args.run / "model", args.out, record)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        parser.error(str(e))
    print(f"sigma_rel {record['sigma_rel']:.4f} (gamma {gamma:.3f}) at step {end.step} from {len(used)} snapshots, "
          f"relative profile error {err:.2e}: {args.out}")


if __name__ == "__main__":
    main()
