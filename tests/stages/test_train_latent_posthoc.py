"""Stage 2 with train.posthoc_ema at tiny size: snapshots, exact resume, and the reconstruction CLI's model folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from stage_scripts import load_stage, train_latent

from ldm.pipeline import TextToImage
from ldm.training import find_latest_checkpoint
from ldm.training.posthoc_ema import main as posthoc

stage = load_stage("train_latent")
pytestmark = pytest.mark.usefixtures("one_thread_module")
POSTHOC = ["train.posthoc_ema.sigma_rels=[0.05,0.1]", "train.posthoc_ema.every=1", "train.checkpoint_every=2"]


run = train_latent          # stages/train_latent.py on configs/latent/tiny.yaml (tests/stage_scripts.py)


def files(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted((run_dir / "posthoc-ema").iterdir())}


def test_snapshots_survive_resume_and_rebuild_a_model_folder(tiny_ae, tmp_path, capsys):
    run(tiny_ae, tmp_path / "straight", *POSTHOC, "train.max_steps=4")
    run(tiny_ae, tmp_path / "resumed", *POSTHOC, "train.max_steps=3")          # checkpoints 2 and 3
    checkpoint_2 = find_latest_checkpoint(tmp_path / "resumed").with_name("checkpoint-000002")
    run(tiny_ae, tmp_path / "resumed", *POSTHOC, "train.max_steps=4", "--resume", str(checkpoint_2))

    # Steps 1-2 kept, step 3's snapshot dropped and redone, step 4's new: bit-for-bit the uninterrupted run's.
    straight, resumed = files(tmp_path / "straight"), files(tmp_path / "resumed")
    assert list(straight) == [f"phema-{s:06d}-{r}.safetensors" for s in range(1, 5) for r in ("0.0500", "0.1000")]
    assert list(resumed) == list(straight)
    for name in straight:
        assert all(torch.equal(straight[name][k], resumed[name][k]) for k in straight[name]), name
    state = torch.load(find_latest_checkpoint(tmp_path / "resumed") / "training_state.pt", weights_only=True)
    assert state["power_ema"]["num_updates"] == 4 and state["power_ema"]["sigma_rels"] == [0.05, 0.1]
    ema = load_file(str(find_latest_checkpoint(tmp_path / "straight") / "ema.safetensors"))
    assert set(straight["phema-000004-0.1000.safetensors"]) == set(ema)        # the classic EMA's tensors

    # A stored profile rebuilt at its step is that snapshot; the folder's U-Net holds it (fp32 here).
    out = tmp_path / "sigma-0.10"
    posthoc([str(tmp_path / "straight"), "--sigma-rel", "0.1", "--out", str(out)])
    unet = load_file(str(out / "unet" / "model.safetensors"))
    snap = straight["phema-000004-0.1000.safetensors"]
    for k, v in unet.items():
        if f"unet.{k}" in snap:
            torch.testing.assert_close(v, snap[f"unet.{k}"], rtol=1e-6, atol=1e-7)
    record = json.loads((out / "posthoc_ema.json").read_text())
    assert record["step"] == 4 and record["relative_error"] < 1e-6

    # Any other width, at an earlier step: a folder the pipeline samples from.
    out = tmp_path / "sigma-0.07"
    posthoc([str(tmp_path / "straight"), "--sigma-rel", "0.07", "--step", "3", "--out", str(out)])
    assert json.loads((out / "posthoc_ema.json").read_text())["step"] == 3
    images, _ = TextToImage.from_folder(str(out)).generate(["a red circle"], steps=2, seed=0)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()

    weights = tmp_path / "sigma-0.07.safetensors"                # the weights alone, any stage's
    posthoc([str(tmp_path / "straight"), "--sigma-rel", "0.07", "--step", "3", "--out", str(weights)])
    alone, folder = load_file(str(weights)), load_file(str(out / "unet" / "model.safetensors"))
    assert all(torch.equal(alone[f"unet.{k}"], v) for k, v in folder.items() if f"unet.{k}" in alone)

    capsys.readouterr()
    posthoc([str(tmp_path / "straight"), "--sweep", "--sigma-rel", "0.05", "0.08"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[:3] == ["0.050", "16.972", "4"] and float(rows[1].split()[4]) < 1e-6
    with pytest.raises(SystemExit):
        posthoc([str(tmp_path / "straight"), "--sigma-rel", "0.07", "--step", "9", "--out", str(tmp_path / "x")])
    assert "no snapshot at step 9; the run wrote them at steps 1, 2, 3, 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):                     # --out over a folder it did not write
        posthoc([str(tmp_path / "straight"), "--sigma-rel", "0.07", "--out", str(tmp_path / "straight" / "model")])
    assert "was not written by ldm.training.posthoc_ema" in capsys.readouterr().err


def test_a_fresh_run_refuses_old_snapshots(tiny_ae, tmp_path):
    run(tiny_ae, tmp_path, *POSTHOC, "train.max_steps=1")
    with pytest.raises(FileExistsError, match="post-hoc EMA snapshots of an earlier run"):
        run(tiny_ae, tmp_path, *POSTHOC, "train.max_steps=1")


@pytest.mark.parametrize("overrides,message", [
    (["train.posthoc_ema.sigma_rels=[0.3]"], "config section 'train.posthoc_ema': sigma_rels [0.3] out of range"),
    (["train.posthoc_ema.sigma_rels=[0.05]", "lora.rank=4", "init_from=x"], "train.posthoc_ema with lora.rank > 0"),
])
def test_bad_settings_are_usage_errors(tiny_ae, tmp_path, capsys, overrides, message):
    with pytest.raises(SystemExit):
        run(tiny_ae, tmp_path, *overrides)
    assert message in capsys.readouterr().err
