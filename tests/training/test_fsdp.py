"""The Checkpointer under FSDP2: test_loop.py's toy stage as 2 CPU processes (gloo), sharded for real.

Accelerate 1.15 ignores an FSDP plugin when it builds a CPU process group (the run becomes DDP), so
the launched script builds the Accelerator as every stage does (`ldm.training.setup`) and then
switches its shared state to FSDP2. From there `accelerator.prepare` applies torch's real
`fully_shard` over gloo: parameters, gradients and AdamW moments are DTensor shards.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/training/test_fsdp.py OUT PHASE
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.training import CheckpointMismatchError

_LOOP = Path(__file__).with_name("test_loop.py")


def load_toy():
    """test_loop.py as a module (the toy stage, its config and helpers), without importing `tests`."""
    spec = importlib.util.spec_from_file_location("fsdp_toy_stage", _LOOP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


toy = load_toy()
OVERRIDES = ["train.validate_every=2"]  # EMA swapped in and out of the sharded model; forward is collective


# ----------------------------------------------------------------------------- the launched script

def fsdp2_setup(cfg, full_config=None, project="train"):
    """`ldm.training.setup`, then FSDP2 instead of the DDP that Accelerate picks on CPU."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from ldm.training import setup

    accelerator = setup(cfg, full_config, project)
    # Linear(8, 32) (288 params) gets its own shards, as a U-Net block would; the root takes the rest.
    # cpu_ram_efficient_loading broadcasts rank 0's initial weights, as fsdp_full_shard.yaml does.
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="size_based_wrap",
                                            min_num_params=200, cpu_ram_efficient_loading=True)
    # Both shared states: every AcceleratorState() re-reads PartialState's distributed_type.
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return accelerator


def run_phase(out: Path, phase: str) -> None:
    """straight: 6 steps, checkpoints at 3 and 6; resumed: --resume latest from a copy of the straight run's step-3
    checkpoint to 6. One per launch: `end_training` destroys the process group, so each process saves its own
    shards."""
    folder = out / phase
    extra = ["train.resume=latest"] if phase == "resumed" else []
    result = toy.train(toy.toy_config(folder, *OVERRIDES, *extra))
    rank = result["rank"]
    for part in ("weights", "ema"):
        save_file({k: v.to_local().contiguous() for k, v in result[part].items()},
                  str(out / f"{phase}-{part}-rank{rank}.safetensors"))
    placements = {k: str(v.placements) for k, v in result["weights"].items()}
    (out / f"{phase}-rank{rank}.json").write_text(json.dumps({"losses": result["losses"],
                                                              "placements": placements}))


def refusals(out: Path) -> None:
    """FSDP1 and extra modules are refused when the Checkpointer is built; errors go to a file."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch import nn

    from ldm.training import Checkpointer

    cfg = toy.toy_config(out / "refusals")
    accelerator = fsdp2_setup(cfg.train, cfg)
    model = nn.Linear(2, 2)
    kwargs = dict(stage="toy", model_config={}, model=model, optimizer=None, scheduler=None)
    errors = {}
    try:
        Checkpointer(accelerator, cfg.train, extras={"disc": nn.Linear(2, 2)}, **kwargs)
    except NotImplementedError as e:
        errors["extras"] = str(e)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=1, cpu_ram_efficient_loading=False)
    try:
        Checkpointer(accelerator, cfg.train, **kwargs)
    except NotImplementedError as e:
        errors["fsdp1"] = str(e)
    if accelerator.is_main_process:
        (out / "refusals.json").write_text(json.dumps(errors))


def main(argv: list[str]) -> None:
    toy.setup = fsdp2_setup  # train() looks `setup` up in its module at call time
    out, phase = Path(argv[0]), argv[1]
    if phase == "straight":
        refusals(out)
    run_phase(out, phase)


# ----------------------------------------------------------------------------- the test

def launch(out: Path, phase: str) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(toy.free_port()), __file__, str(out), phase]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    print(f"{phase}: {time.time() - t0:.1f} s")


def read(out: Path, phase: str) -> tuple[dict, dict]:
    """(losses by step, {"weights", "ema"}: full tensors) of a launched phase."""
    info = [json.loads((out / f"{phase}-rank{r}.json").read_text()) for r in (0, 1)]
    assert info[0]["losses"] == info[1]["losses"]  # every process reports the same loss
    assert set(info[0]["placements"].values()) == {"(Shard(dim=0),)"}
    full = {}
    for part in ("weights", "ema"):
        shards = [load_file(str(out / f"{phase}-{part}-rank{r}.safetensors")) for r in (0, 1)]
        # Really sharded: each process holds a strict part of at least one weight.
        assert any(0 < len(shards[0][k]) < len(shards[0][k]) + len(shards[1][k]) for k in shards[0]), part
        full[part] = {k: torch.cat([shards[0][k], shards[1][k]]) for k in shards[0]}  # Shard(0) over 2
    return {int(k): v for k, v in info[0]["losses"].items()}, full


def test_fsdp2_exact_resume_on_two_cpu_processes(tmp_path):
    launch(tmp_path, "straight")
    # The straight run's step-3 checkpoint is what a run killed after step 3 leaves (test_loop.py's
    # test_exact_resume_is_bitwise kills one for real): one launch fewer.
    shutil.copytree(tmp_path / "straight" / "checkpoint-000003", tmp_path / "resumed" / "checkpoint-000003")
    launch(tmp_path, "resumed")  # fresh processes resume from the files
    straight, final = read(tmp_path, "straight")
    resumed, after = read(tmp_path, "resumed")

    # 6 steps straight == 3 steps, resume, 3 steps: losses and weights bit-for-bit (fp32 CPU).
    assert sorted(straight) == [1, 2, 3, 4, 5, 6] and sorted(resumed) == [4, 5, 6]
    assert resumed == {step: straight[step] for step in resumed}
    toy.assert_same_tensors(after["weights"], final["weights"])
    toy.assert_same_tensors(after["ema"], final["ema"])

    # The checkpoint holds the full model and EMA: exactly the processes' shards put together.
    ckpt = tmp_path / "resumed" / "checkpoint-000006"
    toy.assert_same_tensors(load_file(str(ckpt / "model.safetensors")), after["weights"])
    toy.assert_same_tensors(load_file(str(ckpt / "ema.safetensors")), after["ema"])
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (meta["num_processes"], meta["sharding"], meta["ema_updates"]) == (2, "fsdp2", 6)
    optim = torch.load(ckpt / "training_state.pt", weights_only=True)["optimizer"]
    assert set(optim["state"]) == set(after["weights"])  # full AdamW state, keyed by name
    for name, state in optim["state"].items():
        assert state["exp_avg"].shape == after["weights"][name].shape, name
        assert int(state["step"]) == 6, name
    assert (tmp_path / "resumed" / "samples" / "step-000006.png").is_file()

    errors = json.loads((tmp_path / "refusals.json").read_text())
    assert "fsdp_version: 2" in errors["fsdp1"]
    assert "['disc']" in errors["extras"]

    # A single-process (or DDP) run refuses the FSDP checkpoint: its optimizer state is keyed by name.
    with pytest.raises(CheckpointMismatchError, match=r"sharding 'fsdp2'.*this run uses None"):
        toy.train(toy.toy_config(tmp_path / "resumed", *OVERRIDES, "train.resume=latest",
                                 "train.max_steps=8"))


if __name__ == "__main__":
    main(sys.argv[1:])
