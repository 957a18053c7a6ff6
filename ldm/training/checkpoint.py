"""Atomic, exactly-resumable checkpoints: `output_dir/checkpoint-000500/`.

A checkpoint is written into `checkpoint-000500.tmp/` and renamed when every file is in place,
so a folder named `checkpoint-NNNNNN` is always complete. Contents:

    meta.json               stage, step, model config, process count, EMA update count
    config.yaml             the run's whole config
    model.safetensors       model weights (+ `<name>.safetensors` for extra modules); with
                            trainable_only, only the parameters that train (a LoRA run's updates:
                            the frozen rest is rebuilt from init_from before resuming)
    ema.safetensors         fp32 EMA shadow weights
    training_state.pt       optimizer, LR scheduler, grad scaler, extra states (weights_only)
    rng_state_<rank>.pt     Python, NumPy, torch and CUDA generators of each process
    data_state_<rank>.pt    each process's data position (`data.state_dict()`)

Resuming restores the RNG last, after everything was built, so a resumed run draws the same
random numbers as an uninterrupted one. Single-process, DDP and FSDP2 (`fsdp_version: 2`) runs
are supported. Under FSDP2 the same files hold FULL state: every process takes part in gathering
the sharded weights, optimizer state and EMA shadow, rank 0 writes them, and on resume every
process reads the full files and keeps its own shard. The optimizer state is then keyed by
parameter name (torch.distributed.checkpoint's full optimizer state dict), so meta.json records
`"sharding": "fsdp2"` and a DDP run refuses such a checkpoint (and vice versa).
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor

from ldm.models.weights import write_safetensors

from .config import TrainConfig, config_to_dict, save_config
from .ema import EMA, check_same_tensors
from .power_ema import PowerEMA

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointMismatchError(ValueError):
    """The checkpoint belongs to another stage or model architecture."""


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first; temp folders ignored."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in `output_dir`, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`resume` (None | "latest" | path) -> a checkpoint folder or None (start fresh)."""
    if resume is None:
        return None
    if resume == "latest":
        return find_latest_checkpoint(output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume: checkpoint folder not found: {resume!r}")
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"train.resume: {resume!r} is not a complete checkpoint (no meta.json)")
    return path


# --------------------------------------------------------------------------- RNG

def capture_rng() -> dict[str, Any]:
    """This process's Python, NumPy, torch and CUDA generator states (weights_only-loadable)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- compatibility

def _plain_json(obj: Any) -> Any:
    return json.loads(json.dumps(config_to_dict(obj) if obj is not None else None))


def _diff(saved: Any, now: Any, prefix: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now)):
            key = f"{prefix}.{k}" if prefix else k
            if k not in saved:
                out.append(f"{key}: absent in checkpoint vs {now[k]!r} now")
            elif k not in now:
                out.append(f"{key}: {saved[k]!r} in checkpoint vs absent now")
            else:
                out += _diff(saved[k], now[k], key)
        return out
    return [] if saved == now else [f"{prefix}: checkpoint {saved!r} vs now {now!r}"]


def check_compatible(path: Path, meta: dict, stage: str, model_config: Any,
                     sharding: str | None = None) -> None:
    """Refuse a checkpoint of another stage, model config or sharding, naming every difference."""
    if meta.get("stage") != stage:
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} was written by stage {meta.get('stage')!r}, "
            f"this is stage {stage!r}")
    if meta.get("sharding") != sharding:  # the optimizer state formats differ
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} was written with sharding {meta.get('sharding')!r} "
            f"(None = single process or DDP), this run uses {sharding!r}")
    diffs = _diff(meta.get("model_config"), _plain_json(model_config), "model")
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} has a different model config: " + "; ".join(diffs))


# --------------------------------------------------------------------------- save / load

def _saveable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no shared storage (safetensors refuses tied tensors)."""
    out, seen = {}, set()
    for k, t in state.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _require(path: Path, name: str) -> Path:
    f = path / name
    if not f.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is incomplete: missing {name}")
    return f


def _load_pt(f: Path, mmap: bool = False) -> Any:
    return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on rank 0 only


def _full_tensor(t: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """Gather a DTensor (collective: every process calls it); keep a CPU copy where `keep`."""
    full = t.full_tensor() if isinstance(t, DTensor) else t
    return full.detach().cpu() if keep else None


def _shard_like(like: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This process's shard of `full`, laid out as the DTensor `like` (every process holds `full`)."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def _check_fsdp(accelerator: Accelerator, extras: dict[str, Any]) -> None:
    """Refuse FSDP set-ups this checkpoint format does not gather, naming the fix."""
    if not accelerator.is_fsdp2:
        raise NotImplementedError(
            "Checkpointer supports FSDP2 only: set `fsdp_version: 2` in the accelerate config "
            "(FSDP1's flattened parameters are not gathered)")
    bad = sorted(k for k, v in extras.items() if isinstance(v, (nn.Module, torch.optim.Optimizer)))
    if bad:
        raise NotImplementedError(
            f"Checkpointer under FSDP saves one model and its optimizer; extra modules or "
            f"optimizers {bad} are not supported (use DDP for this stage)")


class Checkpointer:
    """Saves and restores everything a stage needs to continue bit-for-bit.

    `model_config` is compared on resume (architecture changes are refused); `extras` holds
    further named objects: modules (a discriminator) go to safetensors, anything else with
    state_dict()/load_state_dict() (its optimizer) into training_state.pt. `data` is the
    data position: any object with state_dict()/load_state_dict() of plain types.
    `trainable_only`: the model file holds only parameters with requires_grad (rank-8 LoRA on SD 1.5's
    U-Net: 6.4 MB of fp32 instead of 3.44 GB); the caller rebuilds the frozen rest identically before resume.
    """

    def __init__(self, accelerator: Accelerator, cfg: TrainConfig, *, stage: str, model_config: Any,
                 model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 ema: EMA | None = None, data: Any = None, config: Any = None,
                 extras: dict[str, Any] | None = None, trainable_only: bool = False):
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise NotImplementedError(
                f"Checkpointer supports single-process, DDP and FSDP2 runs, not {accelerator.distributed_type}")
        self.fsdp = accelerator.distributed_type == DistributedType.FSDP
        if self.fsdp:
            _check_fsdp(accelerator, dict(extras or {}))
        self.sharding = "fsdp2" if self.fsdp else None
        if cfg.posthoc_ema.sigma_rels and not any(isinstance(v, PowerEMA) for v in (extras or {}).values()):
            raise ValueError(f"train.posthoc_ema.sigma_rels={cfg.posthoc_ema.sigma_rels}: stage {stage!r} does not "
                             "track post-hoc EMAs (stage 2, stages/train_latent.py, does); leave it [] here")
        self.accelerator, self.cfg, self.stage = accelerator, cfg, stage
        self.model_config, self.config = model_config, config if config is not None else cfg
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.ema, self.data, self.extras = ema, data, dict(extras or {})
        self.output_dir = Path(cfg.output_dir)
        self.trainable_only = trainable_only

    @property
    def weights(self) -> str:
        """What model.safetensors holds, as meta.json records it."""
        return "trainable" if self.trainable_only else "all"

    def _kept(self, stem: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of a module's state dict that a checkpoint holds."""
        if not (self.trainable_only and stem == "model"):
            return state
        module = self._modules()[stem]
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if k in trainable}

    def _modules(self) -> dict[str, nn.Module]:
        """File stem -> unwrapped module, for every module saved as safetensors."""
        mods = {"model": self.model}
        mods.update({k: v for k, v in self.extras.items() if isinstance(v, nn.Module)})
        return {k: self.accelerator.unwrap_model(m) for k, m in mods.items()}

    def _states(self) -> dict[str, Any]:
        objs = {"optimizer": self.optimizer, "scheduler": self.scheduler}
        objs.update({k: v for k, v in self.extras.items() if not isinstance(v, nn.Module)})
        if self.accelerator.scaler is not None:
            objs["grad_scaler"] = self.accelerator.scaler
        return objs

    def _local_states(self) -> tuple[dict, dict | None, dict]:
        """(weights by file stem, EMA shadow, training states) of a single-process or DDP run."""
        weights = {stem: self._kept(stem, module.state_dict()) for stem, module in self._modules().items()}
        ema = self.ema.state_dict() if self.ema is not None else None
        return weights, ema, {k: v.state_dict() for k, v in self._states().items()}

    def _gathered_states(self) -> tuple[dict, dict | None, dict]:
        """The same, gathered from FSDP shards; collective, the result is filled on rank 0 only."""
        main = self.accelerator.is_main_process
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # unwrap AcceleratedOptimizer
        weights = {"model": self._kept("model", get_model_state_dict(self.model, options=_FULL))}
        ema = None
        if self.ema is not None:
            ema = {n: _full_tensor(s, main) for n, s in self.ema.shadow.items()}
        states = {}
        for name, obj in self._states().items():  # same order as _local_states
            states[name] = (get_optimizer_state_dict(self.model, optimizer, options=_FULL)
                            if name == "optimizer" else obj.state_dict())
        return weights, ema, states

    # ------------------------------------------------------------------ save

    def maybe_save(self, step: int) -> Path | None:
        """Save every `checkpoint_every` steps and at `max_steps`."""
        every = self.cfg.checkpoint_every
        if (every > 0 and step % every == 0) or step == self.cfg.max_steps:
            return self.save(step)
        return None

    def save(self, step: int) -> Path:
        """Write checkpoint-<step> atomically on every process, then keep the last K."""
        acc, rank = self.accelerator, self.accelerator.process_index
        final = self.output_dir / checkpoint_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            for stale in self.output_dir.glob("checkpoint-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)  # left by a crashed save
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()

        torch.save(capture_rng(), tmp / f"rng_state_{rank}.pt")
        if self.data is not None:
            torch.save(self.data.state_dict(), tmp / f"data_state_{rank}.pt")
        gathered = self._gathered_states() if self.fsdp else None  # every process must take part
        if acc.is_main_process:
            weights, ema_state, states = gathered if self.fsdp else self._local_states()
            for stem, state in weights.items():
                write_safetensors(_saveable(state), tmp / f"{stem}.safetensors")
            if ema_state is not None:
                write_safetensors(_saveable(ema_state), tmp / "ema.safetensors")
            torch.save(states, tmp / "training_state.pt")
            save_config(self.config, tmp / "config.yaml")
            meta = {"format": FORMAT_VERSION, "stage": self.stage, "step": step,
                    "model_config": _plain_json(self.model_config),
                    "num_processes": acc.num_processes,
                    "ema_updates": self.ema.num_updates if self.ema is not None else None,
                    "weights": self.weights}
            if self.fsdp:
                meta["sharding"] = self.sharding
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        acc.wait_for_everyone()

        if acc.is_main_process:
            if final.exists():  # re-saving a step (e.g. after resuming at it)
                shutil.rmtree(final)
            tmp.rename(final)   # atomic: the folder appears complete or not at all
            self._prune()
            logger.info("saved %s", final)
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        if self.cfg.keep_last > 0:
            for _, old in list_checkpoints(self.output_dir)[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def resume(self) -> int:
        """Apply `cfg.resume` (None | "latest" | path); returns the step to continue from."""
        path = resolve_resume(self.output_dir, self.cfg.resume)
        if path is None:
            if self.cfg.resume == "latest":
                logger.info("resume=latest: no checkpoint in %s, starting from step 0", self.output_dir)
            elif list_checkpoints(self.output_dir):
                logger.warning("%s already holds checkpoints; starting from step 0 anyway "
                               "(pass --resume latest to continue)", self.output_dir)
            step = 0
        else:
            step = self.load(path)
        # Only now, with the checkpoint accepted: a refused resume must not touch the run's config.
        if self.accelerator.is_main_process:
            save_config(self.config, self.output_dir / "config.yaml")
        return step

    def load(self, path: str | Path) -> int:
        """Check, then restore every object and finally the RNG; returns the saved step."""
        path, rank = Path(path), self.accelerator.process_index
        meta = json.loads(_require(path, "meta.json").read_text())
        check_compatible(path, meta, self.stage, self.model_config, self.sharding)
        if meta.get("weights", "all") != self.weights:
            raise ValueError(f"checkpoint {str(path)!r} holds {meta.get('weights', 'all')} weights, this run saves "
                             f"{self.weights}: resume with the settings it was saved with (e.g. lora.rank)")

        # Read and check everything before touching any object: no partial loads.
        modules = self._modules()
        weights = {stem: load_file(str(_require(path, f"{stem}.safetensors"))) for stem in modules}
        for stem, module in modules.items():
            check_same_tensors(self._kept(stem, module.state_dict()), weights[stem], f"{path.name}/{stem}")
        ema_state = None
        if self.ema is not None:
            ema_state = load_file(str(_require(path, "ema.safetensors")))
            check_same_tensors(self.ema.shadow, ema_state, f"{path.name}/ema")
        # Under FSDP every process reads the full optimizer state: mmap shares the file's pages.
        states = _load_pt(_require(path, "training_state.pt"), mmap=self.fsdp)
        missing = sorted(set(self._states()) - set(states))
        if missing:
            raise ValueError(f"checkpoint {str(path)!r} has no saved state for {missing}")
        rng = _load_pt(self._per_rank(path, "rng_state", rank, meta))
        data_state = None
        if self.data is not None:
            data_state = _load_pt(self._per_rank(path, "data_state", rank, meta))

        # Under FSDP every process read the full files above and keeps its own shard.
        for stem, module in modules.items():
            if self.fsdp:
                set_model_state_dict(module, weights[stem], options=StateDictOptions(
                    full_state_dict=True, strict=not self.trainable_only))
            else:
                module.load_state_dict(weights[stem], strict=not self.trainable_only)
        if self.ema is not None:
            if self.fsdp:
                ema_state = {n: _shard_like(self.ema.shadow[n], t) for n, t in ema_state.items()}
            self.ema.load_state_dict(ema_state, meta["ema_updates"])
        for name, obj in self._states().items():
            if self.fsdp and name == "optimizer":
                set_optimizer_state_dict(self.model, getattr(obj, "optimizer", obj), states[name],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                obj.load_state_dict(states[name])
        if self.data is not None:
            self.data.load_state_dict(data_state)
        restore_rng(rng)  # last: building and loading above may have drawn random numbers
        logger.info("resumed from %s at step %d", path, meta["step"])
        return int(meta["step"])

    @staticmethod
    def _per_rank(path: Path, stem: str, rank: int, meta: dict) -> Path:
        f = path / f"{stem}_{rank}.pt"
        if f.is_file():
            return f
        logger.warning("%s was written by %s process(es); process %d uses rank 0's %s "
                       "(the run will not repeat the original exactly)",
                       path, meta.get("num_processes"), rank, stem)
        return _require(path, f"{stem}_0.pt")
