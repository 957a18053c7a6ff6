"""Stages 2 and 3 under FSDP2 as 2 CPU processes: validation and export from sharded weights, then resume.

The launched script is this file: it imports a stage script, swaps its `setup` for
tests/training/test_fsdp.py's `fsdp2_setup` (Accelerate 1.15 turns an FSDP plugin on a CPU group
into DDP, so the shared state is switched to FSDP2 after the Accelerator is built) with one shard
unit per block, and runs it. The stage-3 test is slow (two more launches); run it with `-m slow`.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/reliability/test_fsdp_stages.py \
        OUT STAGE [--stop-after ROUND:STEP] [key=value ...]
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def load(path: Path, name: str):
    """A script as module `name`, registered first so its dataclasses resolve their hints."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- the launched script

BLOCKS = {"latent": ["_EncoderLayer"]}  # stage 2 also trains (and shards) the scratch text encoder

def sharded_setup(out: Path):
    """test_fsdp.py's `fsdp2_setup` with one shard unit per block; records each process's parameter layout."""
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin
    fsdp2_setup = load(ROOT / "tests" / "training" / "test_fsdp.py", "fsdp_stages_trick").fsdp2_setup

    def setup(cfg, full_config=None, project="train"):
        accelerator = fsdp2_setup(cfg, full_config, project)
        # Size-based wrapping would pick the U-Net's ModuleLists, which fully_shard refuses (no forward).
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=True,
            transformer_cls_names_to_wrap=["ResBlock", "SpatialTransformer"] + BLOCKS.get(project, []))
        # A CPU process group gives device cpu:0, which safetensors' load_file(device="cpu:0") refuses
        # (UNet/GuidedStudent.from_pretrained pass str(device)): not an FSDP matter, so step around it.
        PartialState().device = accelerator.state.device = torch.device("cpu")
        prepare = accelerator.prepare

        def recording_prepare(*objects):
            prepared = prepare(*objects)
            if isinstance(objects[0], torch.nn.Module):  # (model, optimizer); the data loader comes alone
                placements = sorted({str(getattr(p, "placements", "plain")) for p in prepared[0].parameters()})
                (out / f"placements-{project}-rank{accelerator.process_index}.json").write_text(json.dumps(placements))
            return prepared

        accelerator.prepare = recording_prepare
        return accelerator
    return setup


def run_stage(out: Path, name: str, args: list[str]) -> None:
    """One stage run: `[--stop-after ROUND:STEP] key=value ...` (the stop is stage 3's test hook)."""
    stop_after = None
    if args[:1] == ["--stop-after"]:
        round_name, step = args[1].rsplit(":", 1)
        stop_after, args = (round_name, int(step)), args[2:]
    stage = load(ROOT / "stages" / f"{name}.py", f"fsdp_stage_{name}")
    stage.setup = sharded_setup(out)  # the stage looks `setup` up in its module at call time
    if name == "distill":
        stage.run(stage.parse_args(stage.DistillStageConfig, "", stage.DEFAULT_CONFIG, args), stop_after)
    else:
        stage.main(args)


def main(argv: list[str]) -> None:
    """OUT STAGE [--stop-after ROUND:STEP] key=value ...: one stage run per launch, because
    `end_training` destroys the process group (a second group in the same processes hangs)."""
    out, name, args = Path(argv[0]), argv[1], argv[2:]
    stop_after = None
    if args[:1] == ["--stop-after"]:  # stage 3's test hook: the run stops there, as if killed
        round_name, step = args[1].rsplit(":", 1)
        stop_after, args = (round_name, int(step)), args[2:]
    stage = load(ROOT / "stages" / f"{name}.py", f"fsdp_stage_{name}")
    stage.setup = sharded_setup(out)  # the stage looks `setup` up in its module at call time
    if name == "distill":
        stage.run(stage.parse_args(stage.DistillStageConfig, "", stage.DEFAULT_CONFIG, args), stop_after)
    else:
        stage.main(args)


# ----------------------------------------------------------------------------- the tests

def launch(out: Path, name: str, *args: str) -> str:
    """Run stage `name` as 2 FSDP2 processes over gloo; returns its output."""
    import reliability_harness as h
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(h.free_port()), __file__, str(out), name, *args]
    proc = subprocess.Popen(cmd, env=h.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # a hung collective: kill the workers too, not just the launcher
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError("timed out (a collective only some processes entered?):\n" + stderr[-6000:]) from None
    assert proc.returncode == 0, stdout[-2000:] + stderr[-6000:]
    return stdout + stderr


def assert_sharded(out: Path, project: str) -> None:
    """Every parameter of the prepared model was a DTensor split over the 2 processes."""
    for rank in (0, 1):
        assert json.loads((out / f"placements-{project}-rank{rank}.json").read_text()) == ["(Shard(dim=0),)"]


def assert_holds_checkpoint_weights(saved: dict, ckpt: Path, prefix: str = "") -> None:
    """`saved` (a module's file) equals the checkpoint's EMA weights (buffers: its model weights).

    The Checkpointer gathers with DTensor.full_tensor(), the stage with get_model_state_dict:
    two independent routes to the same full tensors.
    """
    ema, model = load_file(str(ckpt / "ema.safetensors")), load_file(str(ckpt / "model.safetensors"))
    assert {prefix + k for k in saved} <= set(model) and any(prefix + k in ema for k in saved)
    for k, v in saved.items():
        assert torch.equal(v, ema.get(prefix + k, model[prefix + k])), k


def test_stage2_validates_exports_and_resumes_under_fsdp2(tiny_ae, tmp_path):
    import reliability_harness as h
    run = tmp_path / "run"
    args = ["--config", str(h.TINY["latent"]), f"autoencoder={tiny_ae}", f"train.output_dir={run}",
            "train.validate_every=2", "train.checkpoint_every=2", "train.ema_decay=0.9"]
    launch(tmp_path, "train_latent", *args, "train.max_steps=3")
    assert_sharded(tmp_path, "latent")
    assert (run / "samples" / "step-000002.png").is_file()  # rank 0 sampled from the gathered copy
    meta = json.loads((run / "checkpoint-000003" / "meta.json").read_text())
    assert (meta["sharding"], meta["num_processes"]) == ("fsdp2", 2)
    for part, prefix in (("unet", "unet."), ("text_encoder", "text_encoder.")):
        saved = load_file(str(run / "model" / part / "model.safetensors"))
        assert_holds_checkpoint_weights(saved, run / "checkpoint-000003", prefix)

    log = launch(tmp_path, "train_latent", *args, "train.max_steps=4", "train.resume=latest")
    assert "checkpoint-000003 at step 3" in log  # continued, not restarted
    assert (run / "samples" / "step-000004.png").is_file()
    assert_holds_checkpoint_weights(load_file(str(run / "model" / "unet" / "model.safetensors")),
                                    run / "checkpoint-000004", "unet.")
    import ldm.pipeline
    images, _ = ldm.pipeline.TextToImage.from_folder(str(run / "model")).generate(["a red circle"], steps=2)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.slow  # three launches
def test_stage2_lora_trains_exports_and_resumes_under_fsdp2(tiny_ae, tmp_path):
    """lora.rank > 0 under FSDP2: frozen shards beside trainable ones; the checkpoint holds the updates only."""
    import reliability_harness as h
    base, run = tmp_path / "base", tmp_path / "run"
    common = ["--config", str(h.TINY["latent"]), f"autoencoder={tiny_ae}", "train.ema_decay=0.9"]
    launch(tmp_path, "train_latent", *common, f"train.output_dir={base}", "train.max_steps=1")
    args = [*common, f"train.output_dir={run}", f"init_from={base / 'model'}", "lora.rank=2", "train.lr=1e-2",
            "train.checkpoint_every=2", "train.validate_every=2"]
    launch(tmp_path, "train_latent", *args, "train.max_steps=2")
    log = launch(tmp_path, "train_latent", *args, "train.max_steps=3", "train.resume=latest")
    assert "checkpoint-000002 at step 2" in log
    saved = load_file(str(run / "checkpoint-000003" / "model.safetensors"))
    assert saved and all(k.endswith(("lora_A", "lora_B")) for k in saved)
    import ldm.pipeline
    source = ldm.pipeline.TextToImage.from_folder(str(base / "model"))
    source.add_lora(str(run / "lora.safetensors"))
    images = [p.generate(["a red circle"], steps=2)[0] for p in (source, ldm.pipeline.TextToImage.from_folder(str(run / "model")))]
    torch.testing.assert_close(images[0], images[1], atol=1e-5, rtol=0)
    assert not torch.equal(load_file(str(base / "model" / "unet" / "model.safetensors"))["down.1.attn.0.blocks.0.attn1.to_q.weight"],
                           load_file(str(run / "model" / "unet" / "model.safetensors"))["down.1.attn.0.blocks.0.attn1.to_q.weight"])


@pytest.mark.slow  # ~55 s on 2 cores: two more launches would take CI past this file's 60 s
def test_stage3_exports_students_and_resumes_mid_round_under_fsdp2(teacher, tmp_path):
    import reliability_harness as h
    run, model = tmp_path / "run", tmp_path / "model"
    args = ["--config", str(h.TINY["distill"]), f"teacher={teacher}", f"train.output_dir={run}",
            f"model_out={model}", "distill.n_start=2", "train.ema_decay=0.9", "train.checkpoint_every=1"]
    launch(tmp_path, "distill", "--stop-after", "round-1:1", *args)  # stage one, then 1 of round-1's 2 updates
    assert_sharded(tmp_path, "distill")
    log = launch(tmp_path, "distill", *args, "train.resume=latest")
    assert "round-1/checkpoint-000001 at step 1" in log

    for rnd, steps in (("stage-one", 2), ("round-1", 1)):
        ckpt = run / rnd / "checkpoint-000002"
        assert json.loads((ckpt / "meta.json").read_text())["sharding"] == "fsdp2"
        assert (run / rnd / "samples" / "step-000002.png").is_file()  # validated on every process
        for folder in (run / rnd / "student", model / f"student-{steps}"):
            assert_holds_checkpoint_weights(load_file(str(folder / "model.safetensors")), ckpt)
    import ldm.pipeline
    images, info = ldm.pipeline.TextToImage.from_folder(str(model)).generate(["a red circle"], steps=1, guidance=2.0)
    assert info["steps"] == 1 and torch.isfinite(images).all()


if __name__ == "__main__":
    main(sys.argv[1:])
