"""stages/train_controlnet.py with kind=t2i_adapter at tiny size: the folder is diffusers' T2IAdapter (from_pretrained
gives the same features) and steers txt2img through --t2i-adapter; exact resume; the frozen U-Net is untouched;
adapters that do not fit the U-Net are refused; cubic training times follow their distribution (Mou et al. 3.4)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from stage_scripts import load_stage

from ldm.diffusion.losses import sample_times
from ldm.diffusion.schedules import CosineLogSNR, DiscreteSchedule, linear_betas
from ldm.models.t2i_adapter import load_t2i_adapter
from ldm.pipeline import TextToImage, save_random_model

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "controlnet" / "tiny.yaml"
# the tiny U-Net (widths 32, 64; f = 4 latents) adds features at 32@1/8, 64@1/8 and 64@1/8 (its middle block):
# the XL plan (no halving before the third level) at an unshuffle of 8 fits its first two places
FITS = ("kind=t2i_adapter", "adapter.type=full_adapter_xl", "adapter.channels=[32,64]", "adapter.downscale_factor=8",
        "time=cubic")

stage = load_stage("train_controlnet")
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    save_random_model(str(folder), resolution=32)
    return folder


def run(model: Path, out: Path, *overrides: str) -> Path:
    return stage.main(["--config", str(TINY), f"model={model}", f"train.output_dir={out}", *FITS, *overrides])


def test_the_folder_is_diffusers_t2i_adapter_resumes_exactly_and_steers_txt2img(model, tmp_path):
    from diffusers import T2IAdapter as DiffusersT2IAdapter
    straight = run(model, tmp_path / "straight", "train.validate_every=3")
    run(model, tmp_path / "resumed", "train.max_steps=2")
    resumed = run(model, tmp_path / "resumed", "--resume", "latest")
    assert straight.name == "adapter" and (tmp_path / "straight" / "samples" / "step-000003.png").is_file()
    a, b = (load_file(str(f / "diffusion_pytorch_model.safetensors")) for f in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((straight / "hint.json").read_text()) == {"hint": "edges", "edge_threshold": 0.1}

    reference = DiffusersT2IAdapter.from_pretrained(str(straight)).eval()
    ours = load_t2i_adapter(str(straight))
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, mine = reference(image), ours(image)
    assert [f.shape for f in theirs] == [f.shape for f in mine] == [(2, 32, 4, 4), (2, 64, 4, 4)]
    assert all(torch.equal(x, y) for x, y in zip(theirs, mine))
    assert max(f.abs().max() for f in mine) > 0

    from ldm import txt2img
    scene = tmp_path / "scene.png"
    Image.fromarray(np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((16, 16), np.uint8))).convert("RGB").save(scene)
    txt2img.main(["a red circle", "--model", str(model), "--steps", "2", "--t2i-adapter", str(straight),
                  "--adapter-image", str(scene), "--out", str(tmp_path / "a.png")])
    txt2img.main(["a red circle", "--model", str(model), "--steps", "2", "--out", str(tmp_path / "p.png")])
    steered, plain = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in "ap")
    assert np.abs(steered - plain).max() > 0


def test_training_leaves_the_frozen_unet_as_loaded(model, tmp_path, monkeypatch):
    loaded = []
    original = TextToImage.from_folder.__func__

    def keep(cls, *args, **kwargs):                       # the stage's own pipeline, kept to look at afterwards
        loaded.append(original(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(TextToImage, "from_folder", classmethod(keep))
    run(model, tmp_path / "run", "train.lr=1e-2")
    fresh = original(TextToImage, str(model))
    for name in ("unet", "text_encoder", "autoencoder"):
        trained, own = getattr(loaded[0], name).state_dict(), getattr(fresh, name).state_dict()
        assert trained.keys() == own.keys() and all(torch.equal(trained[k], own[k]) for k in own), name


def test_an_adapter_that_does_not_fit_the_unet_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="does not fit this U-Net"):      # halves at its second level: 64@1/16
        run(model, tmp_path, "adapter.type=full_adapter")


@pytest.mark.parametrize("override, key", [("adapter.type=huge_adapter", "adapter.type"),
                                          ("kind=lora", "config key 'kind'"), ("time=cosine", "config key 'time'")])
def test_bad_settings_are_named(model, tmp_path, capsys, override, key):
    with pytest.raises(SystemExit):
        run(model, tmp_path, override)
    assert key in capsys.readouterr().err


def test_the_shapes64_preset_fits_the_shipped_unet():
    from ldm.training import load_config
    cfg = load_config(stage.ControlNetStageConfig, ROOT / "configs" / "controlnet" / "shapes64-adapter.yaml")
    pipe = TextToImage.from_folder(cfg.model)
    net = stage.build_net(cfg, pipe, pipe.autoencoder.config.downsample_factor)   # check_base inside
    features = net(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in features] == [(48, 8, 8), (96, 8, 8), (96, 4, 4), (96, 4, 4)]


def test_cubic_times_follow_one_minus_v_cubed():
    """u = 1 - v^3, v ~ U[0, 1]: P(u <= x) = 1 - (1 - x)^(1/3); within 4 binomial standard errors at 9 points."""
    g, n = torch.Generator().manual_seed(0), 200_000
    xs = np.linspace(0.1, 0.9, 9)
    cdf = 1 - (1 - xs) ** (1 / 3)
    cont = CosineLogSNR()
    u = ((sample_times(cont, n, time="cubic", generator=g) - cont.t_min) / (cont.t_max - cont.t_min)).numpy()
    discrete = DiscreteSchedule(linear_betas(1000))
    t = sample_times(discrete, n, time="cubic", generator=g)
    assert t.min() >= 0 and t.max() <= 999 and torch.equal(t, t.floor())
    for share in (u, t.numpy() / 1000):
        empirical = (share[:, None] <= xs).mean(0)
        assert np.all(np.abs(empirical - cdf) < 4 * np.sqrt(cdf * (1 - cdf) / n)), (empirical, cdf)
    assert math.isclose(float((u > 0.5).mean()), 0.5 ** (1 / 3), abs_tol=0.005)   # 79% in the noisier half
    with pytest.raises(ValueError, match="time_shift"):
        sample_times(cont, 4, time="cubic", shift=2.0)
