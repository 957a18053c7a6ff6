"""Run a stage script with a fault hook: the subprocess that the reliability tests kill.

    python tests/reliability/fault_runner.py [hooks] stages/train_latent.py --config ... [key=value ...]
    accelerate launch --multi_gpu --num_processes 2 tests/reliability/fault_runner.py [hooks] stages/...

Hooks (each optional):
  --pause-after-save STAGE:STEP  after checkpoint STEP of checkpoint stage STAGE is complete, flush
                                 the trackers, write --marker and sleep: the test then SIGKILLs us.
  --hang-in-save STAGE:STEP      the same, but in the middle of writing that checkpoint: weights and
                                 training state are in checkpoint-STEP.tmp/, config.yaml and meta.json not.
  --dump-weights DIR             at every checkpoint, each process writes its own model weights to
                                 DIR/rank<R>-step<S>.safetensors (only rank 0 saves checkpoints).
  --keyed-noise                  draw each sample's diffusion time and noise from a generator keyed
                                 on the sample's pixels (see `keyed_noise`).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.diffusion import losses
from ldm.diffusion.param import append_dims, q_sample
from ldm.models.autoencoder import AutoencoderKL
from ldm.training import checkpoint


def _flush_trackers(accelerator) -> None:
    """A SIGKILLed process never closes its event files: write what it logged so far."""
    for tracker in accelerator.trackers:
        writer = getattr(tracker, "writer", None)
        if writer is not None:
            writer.flush()


def _stop_here(ckpt, marker: str) -> None:
    _flush_trackers(ckpt.accelerator)
    Path(marker).write_text("ready to be killed\n")
    time.sleep(3600)


def _parse_point(value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    stage, step = value.rsplit(":", 1)
    return stage, int(step)


def install_checkpoint_hooks(pause_after: tuple[str, int] | None, hang_in: tuple[str, int] | None,
                             marker: str | None, dump_dir: str | None) -> None:
    """Wrap Checkpointer.save (and save_config, which it calls after the weights) with the hooks."""
    original_save, original_save_config = checkpoint.Checkpointer.save, checkpoint.save_config
    current = {}

    def save(self, step):
        current["ckpt"], current["step"] = self, step
        if dump_dir is not None:
            net = self.accelerator.unwrap_model(self.model)
            rank = self.accelerator.process_index
            save_file(checkpoint._saveable(net.state_dict()), f"{dump_dir}/rank{rank}-step{step}.safetensors")
        path = original_save(self, step)
        if pause_after == (self.stage, step):
            _stop_here(self, marker)
        return path

    def save_config(cfg, path):
        ckpt = current.get("ckpt")
        if ckpt is not None and hang_in == (ckpt.stage, current["step"]) and Path(path).parent.suffix == ".tmp":
            _stop_here(ckpt, marker)
        return original_save_config(cfg, path)

    checkpoint.Checkpointer.save = save
    checkpoint.save_config = save_config


def _pixel_key(x: torch.Tensor) -> int:
    return int.from_bytes(hashlib.sha256(x.detach().cpu().numpy().tobytes()).digest()[:7], "little")


@contextlib.contextmanager
def keyed_noise():
    """Each sample's t and eps come from a generator seeded by its pixels, not from the process RNG.

    A stage seeds every process with seed + rank (ldm.training.setup), so a 2-process run and a
    1-process run draw different noise for the same images; only with noise tied to the sample can
    their losses be compared. Everything else (data sharding, DDP gradient averaging, the loss
    reduction in NonFiniteGuard, clipping, AdamW, EMA) runs unchanged. Needs latents=mode.
    """
    original_encode, original_call = AutoencoderKL.encode_latents, losses.DiffusionLoss.__call__
    keys: list[int] = []

    def encode_latents(self, x, sample=True, generator=None):
        keys[:] = [_pixel_key(image) for image in x]
        return original_encode(self, x, sample=sample, generator=generator)

    def call(self, net, x0, extra_args=None, generator=None):
        assert len(keys) == len(x0), "keyed noise needs the latents of this very batch"
        gens = [torch.Generator().manual_seed(k) for k in keys]
        t = torch.cat([losses.sample_times(self.schedule, 1, time=self.time, generator=g) for g in gens])
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])   # (B, C, h, w)
        t, eps = t.to(x0.device), eps.to(x0.device, x0.dtype)
        alpha, sigma = (append_dims(c.to(x0.dtype), x0.ndim) for c in self.schedule.alpha_sigma(t))
        out = net(q_sample(x0, eps, alpha, sigma), t * self.time_scale, **(extra_args or {}))
        return self.per_sample(out, x0, eps, t).mean()

    AutoencoderKL.encode_latents, losses.DiffusionLoss.__call__ = encode_latents, call
    try:
        yield
    finally:
        AutoencoderKL.encode_latents, losses.DiffusionLoss.__call__ = original_encode, original_call


def load_module(script: str | Path, name: str):
    """Import a script as module `name`, registered first so its dataclasses resolve their hints."""
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pause-after-save", metavar="STAGE:STEP")
    parser.add_argument("--hang-in-save", metavar="STAGE:STEP")
    parser.add_argument("--marker", metavar="PATH", help="written when the process waits to be killed")
    parser.add_argument("--dump-weights", metavar="DIR")
    parser.add_argument("--keyed-noise", action="store_true")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if (args.pause_after_save or args.hang_in_save) and not args.marker:
        parser.error("--pause-after-save / --hang-in-save need --marker")
    torch.set_num_threads(1)
    install_checkpoint_hooks(_parse_point(args.pause_after_save), _parse_point(args.hang_in_save),
                             args.marker, args.dump_weights)
    stage = load_module(args.script, "stage_under_test")
    with keyed_noise() if args.keyed_noise else contextlib.nullcontext():
        stage.main(args.args)


if __name__ == "__main__":
    main()
