"""Faults in real stage runs: non-finite losses, an unwritable or full output folder."""
import pytest

import reliability_harness as h
from ldm.training import NonFiniteLossError, list_checkpoints


def stage_args(name, out, tiny_ae, teacher, *extra):
    """The tiny preset of stage `name` writing to `out`, with its input folder."""
    inputs = {"ae": [], "latent": [f"autoencoder={tiny_ae}"], "distill": [f"teacher={teacher}"]}[name]
    return ["--config", str(h.TINY[name]), f"train.output_dir={out}", *inputs, *extra]


def test_stage2_nan_latents_skip_then_stop_leaving_the_last_good_checkpoint(tiny_ae, nan_ae, tmp_path):
    args = stage_args("latent", tmp_path, tiny_ae, None, "train.max_steps=2", "train.checkpoint_every=1")
    h.stage("latent").main(args)
    good = h.snapshot(tmp_path / "checkpoint-000002")

    # The same architecture with a NaN weight (model config matches, so the resume is accepted):
    # every update from step 3 on has a NaN loss and is skipped, the third in a row stops the run.
    with pytest.raises(NonFiniteLossError, match=r"not finite for 3 updates in a row \(train.max_nonfinite=3\)"):
        h.stage("latent").main(stage_args("latent", tmp_path, nan_ae, None, "train.max_steps=6",
                                          "train.max_nonfinite=3", "--resume", "latest"))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]      # skipped updates are not steps
    assert h.snapshot(tmp_path / "checkpoint-000002") == good
    assert not list(tmp_path.glob("*.tmp"))

    # The good checkpoint resumes with good data.
    h.stage("latent").main(args[:-2] + ["train.max_steps=3", "--resume", "latest"])
    assert [s for s, _ in list_checkpoints(tmp_path)][-1] == 3


def test_stage1_huge_learning_rate_stops_with_a_clear_message(tmp_path):
    # lr=1e30: the first update is finite and applied (checkpoint 1), its weights overflow every later loss.
    with pytest.raises(NonFiniteLossError, match=r"2 updates in a row.*lower train.lr"):
        h.stage("ae").main(stage_args("ae", tmp_path, None, None, "train.lr=1e30", "train.warmup_steps=0",
                                      "train.max_nonfinite=2", "train.checkpoint_every=1", "train.max_steps=5"))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert not (tmp_path / "autoencoder").exists()


@pytest.mark.parametrize("name", ["ae", "latent", "distill"])
def test_unwritable_output_folder_fails_before_training(name, tiny_ae, teacher, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")                                    # a folder cannot be made inside a file (even as root)
    with pytest.raises(PermissionError, match=r"output_dir '.*a-file/run' is not writable"):
        h.stage(name).main(stage_args(name, blocker / "run", tiny_ae, teacher))


@pytest.mark.parametrize("name", ["ae", "latent", "distill"])
def test_full_disk_fails_before_training(name, tiny_ae, teacher, tmp_path):
    with pytest.raises(OSError, match=r"GiB free, below train.min_free_disk_gb=1000000000.0"):
        h.stage(name).main(stage_args(name, tmp_path / "run", tiny_ae, teacher, "train.min_free_disk_gb=1e9"))
    assert {p.name for p in (tmp_path / "run").iterdir()} == set()   # no config, logs or checkpoints
