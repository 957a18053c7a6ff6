"""`setup(cfg)`: the Accelerator, seeds and a checked output folder, before any training starts."""
from __future__ import annotations

import logging
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from .config import TrainConfig, flatten_config

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_output_dir(path: str | Path, min_free_gb: float = 1.0) -> Path:
    """Create `path`, prove it is writable and has `min_free_gb` free, or raise naming the path."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"output_dir {str(path)!r} is not writable: {e.strerror or e}") from None
    free_gb = shutil.disk_usage(path).free / 2**30
    if free_gb < min_free_gb:
        raise OSError(f"output_dir {str(path)!r} has {free_gb:.2f} GiB free, below "
                      f"train.min_free_disk_gb={min_free_gb}; free space or point output_dir elsewhere")
    return path


def use_cpu(cfg: TrainConfig) -> bool:
    """cfg.cpu, or CPU exactly when CUDA is absent (Accelerator(cpu=True) gives a real gloo group)."""
    return (not torch.cuda.is_available()) if cfg.cpu is None else cfg.cpu


def setup(cfg: TrainConfig, full_config: Any = None, project: str = "train") -> Accelerator:
    """Check the output folder, build the Accelerator, start trackers and seed every process.

    `full_config` (the stage's whole config, default `cfg`) is logged as flattened
    hyperparameters; the Checkpointer writes output_dir/config.yaml once the run has started
    (a refused resume leaves the folder as it was). Seeds are seed + process index, so dropout
    and noise differ across processes; DDP broadcasts rank 0's initial weights at `prepare`.
    """
    output_dir = check_output_dir(cfg.output_dir, cfg.min_free_disk_gb)
    accelerator = Accelerator(
        cpu=use_cpu(cfg),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=None if cfg.tracker == "none" else cfg.tracker,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    full_config = cfg if full_config is None else full_config
    if cfg.tracker != "none":
        accelerator.init_trackers(project, config=flatten_config(full_config))
    seed_everything(cfg.seed + accelerator.process_index)
    logger.info("%s, %d process(es), mixed precision %s, output in %s",
                accelerator.distributed_type, accelerator.num_processes,
                cfg.mixed_precision, os.fspath(output_dir))
    return accelerator
