"""Stage 1 (stages/train_ae.py) at tiny size: run, exact resume, final autoencoder, bad keys; PSNR helper."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from stage_scripts import load_stage

from ldm.data.loaders import build_dataset
from ldm.models.autoencoder import AutoencoderKL
from ldm.training import find_latest_checkpoint, load_config
from ldm.training.ae_eval import heldout_psnr, latent_scaling_factor, psnr

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "ae" / "tiny.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")  # an f=2 autoencoder at 32 px: intra-op threads only contend


stage = load_stage("train_ae")


def run(out: Path, *args: str) -> dict:
    return stage.main(["--config", str(TINY), f"train.output_dir={out}", *args])


def test_run_resume_exact_and_final_autoencoder(tmp_path):
    # tiny.yaml: the discriminator switches on after step 2, so the resumed step runs the GAN path.
    straight = run(tmp_path / "straight", "train.max_steps=3")
    first = run(tmp_path / "resumed", "train.max_steps=2")
    assert first["step"] == 2
    assert find_latest_checkpoint(tmp_path / "resumed").name == "checkpoint-000002"
    resumed = run(tmp_path / "resumed", "train.max_steps=3", "--resume", "latest")
    assert resumed["step"] == 3

    last = find_latest_checkpoint(tmp_path / "resumed")
    assert json.loads((last / "meta.json").read_text())["step"] == 3
    ref = find_latest_checkpoint(tmp_path / "straight")
    for name in ("model.safetensors", "ema.safetensors", "discriminator.safetensors"):
        a, b = load_file(str(ref / name)), load_file(str(last / name))
        assert a.keys() == b.keys()
        for k in a:  # bit-for-bit: 2 + 1 steps == 3 steps
            assert torch.equal(a[k], b[k]), (name, k)
    assert (tmp_path / "resumed" / "samples" / "step-000002.png").is_file()

    # The final folder loads, and its scaling factor gives unit-variance latents on training data.
    ae = AutoencoderKL.from_pretrained(tmp_path / "resumed" / "autoencoder")
    cfg = load_config(stage.AEStageConfig, TINY)
    data = build_dataset(dataclasses.replace(cfg.data, crop="center"))
    x = torch.stack([data[i]["pixel_values"] for i in range(cfg.scale_batches * cfg.train.batch_size)])
    with torch.no_grad():
        z = ae.encode_latents(x, generator=torch.Generator().manual_seed(123))
    assert ae.config.scaling_factor == resumed["scaling_factor"] != 1.0
    assert abs(z.std().item() - 1.0) < 0.05  # ~4k elements: sampling error ~1%

    # The reported PSNR matches a from-scratch computation on the held-out split.
    val = build_dataset(dataclasses.replace(cfg.data, split="heldout", length=cfg.val_images))
    y = torch.stack([val[i]["pixel_values"] for i in range(cfg.val_images)])
    with torch.no_grad():
        rec = ae.decode(ae.encode(y).mean).clamp(-1, 1)
    mse = ((rec - y) ** 2).mean(dim=(1, 2, 3))
    expected = (10 * torch.log10(4 / mse)).mean().item()
    assert resumed["psnr"] == pytest.approx(expected, rel=1e-5)
    assert json.loads((tmp_path / "resumed" / "final_metrics.json").read_text())["psnr"] == resumed["psnr"]
    assert resumed["psnr"] == straight["psnr"]


def test_bad_config_key_names_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "loss.kl_wieght=1e-6")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "loss.kl_wieght" in err and "kl_weight" in err  # names it and suggests the right one


def test_help_lists_stage_keys(capsys):
    with pytest.raises(SystemExit) as exc:
        stage.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "loss.disc_start" in out and "scale_batches" in out and "--resume" in out


# ----------------------------------------------------------------------------- ldm.training.ae_eval

def test_psnr_closed_form():
    x = torch.zeros(3, 3, 8, 8)
    errors = torch.tensor([0.1, 0.5, 2.0])                       # constant error per image
    y = x + errors.view(3, 1, 1, 1)
    expected = [10 * math.log10(4 / e ** 2) for e in errors.tolist()]  # 26.02, 12.04, 0 dB
    torch.testing.assert_close(psnr(y, x), torch.tensor(expected), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(y, x[:2])


class _Identity(torch.nn.Module):
    """An 'autoencoder' whose posterior mean is the image (plus an optional offset) and std is s."""

    def __init__(self, offset: float = 0.0, s: float = 0.0):
        super().__init__()
        self.offset, self.s = offset, s
        self.p = torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return type("Posterior", (), {"mean": x + self.offset, "std": torch.full_like(x, self.s),
                                      "mode": lambda _: x + self.offset})()

    def decode(self, z):
        return z


def test_heldout_psnr_clamps_and_averages():
    x = torch.rand(4, 3, 8, 8) * 1.6 - 0.8                      # in [-0.8, 0.8]
    ae = _Identity(offset=0.1)
    expected = (10 * torch.log10(4 / torch.full((4,), 0.01))).mean().item()
    assert heldout_psnr(ae, x, batch_size=3) == pytest.approx(expected, rel=1e-5)
    big = torch.ones(2, 3, 4, 4)                                # recon 1.5 is clamped to 1.0
    assert heldout_psnr(_Identity(offset=0.5), big) == math.inf


def test_latent_scaling_factor_is_inverse_std():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 8, 8, generator=g) * 3.0 + 1.0      # mean std 3, posterior std 4
    factor = latent_scaling_factor(_Identity(s=4.0), x.split(16), torch.Generator().manual_seed(1))
    assert factor == pytest.approx(1 / 5.0, rel=0.03)          # sqrt(3^2 + 4^2) = 5
