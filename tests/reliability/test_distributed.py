"""Stage 2 as 2 CPU processes (gloo, `accelerate launch --multi_gpu`) against 1 process with the same global batch."""
import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

import reliability_harness as h

STEPS = 4


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_ae, tmp_path):
    common = ["--config", str(h.TINY["latent"]), f"autoencoder={tiny_ae}", f"train.max_steps={STEPS}",
              f"train.checkpoint_every={STEPS}", "train.tracker=tensorboard", "train.log_every=1",
              "p_uncond=0", "latents=mode"]            # no draw from the per-process RNG changes the loss
    (tmp_path / "w").mkdir()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(h.free_port()), str(h.RUNNER), "--keyed-noise",
           "--dump-weights", str(tmp_path / "w"), str(h.STAGES["latent"]),
           *common, "train.batch_size=2", f"train.output_dir={tmp_path / 'ddp'}"]
    log = tmp_path / "launch.log"  # a file, not a pipe: nobody reads a pipe while the run below goes on
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=h.env(), stdout=out, stderr=subprocess.STDOUT)
    try:  # the one-process run meanwhile: the launcher's start-up and shut-down leave a core idle
        with h.runner().keyed_noise():
            h.stage("latent").main([*common, "train.batch_size=4", f"train.output_dir={tmp_path / 'one'}"])
        proc.wait(timeout=300)
    finally:
        proc.kill()  # no-op once it exited
    assert proc.returncode == 0, log.read_text()[-6000:]

    # A real 2-process group, and both ranks hold the same weights after the last update.
    ckpt = tmp_path / "ddp" / f"checkpoint-{STEPS:06d}"
    assert json.loads((ckpt / "meta.json").read_text())["num_processes"] == 2
    assert {"rng_state_1.pt", "data_state_1.pt"} <= {f.name for f in ckpt.iterdir()}
    rank0 = load_file(str(tmp_path / "w" / f"rank0-step{STEPS}.safetensors"))
    h.assert_same_safetensors(tmp_path / "w" / f"rank0-step{STEPS}.safetensors",
                              tmp_path / "w" / f"rank1-step{STEPS}.safetensors")

    # One process, batch 4 = 2 processes x batch 2: the same images per update, the same noise per image.
    ddp = h.scalars(tmp_path / "ddp" / "logs")["train/loss"]
    one = h.scalars(tmp_path / "one" / "logs")["train/loss"]
    assert sorted(ddp) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        assert abs(ddp[step] - one[step]) <= 1e-5, (step, ddp[step], one[step])
    # AdamW divides by sqrt(v): where a gradient is ~0, float rounding of the all-reduce moves the
    # update by up to ~lr (1e-3) x its relative error, so weights agree to 1e-4, losses to 1e-5.
    single = load_file(str(tmp_path / "one" / f"checkpoint-{STEPS:06d}" / "model.safetensors"))
    assert single.keys() == rank0.keys()
    for k in single:
        torch.testing.assert_close(rank0[k], single[k], rtol=1e-4, atol=1e-4, msg=k)
