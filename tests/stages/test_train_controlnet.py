"""stages/train_controlnet.py at tiny size: run, exact resume, the folder loads into txt2img; control images
from edges (against a numpy Sobel) and from a data column (cropped with the picture)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint as torch_checkpoint
from stage_scripts import load_stage, record_losses

from ldm.data.hints import edge_map
from ldm.data.loaders import DataConfig, build_dataset
from ldm.models.controlnet import load_controlnet
from ldm.pipeline import TextToImage, save_random_model

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "controlnet" / "tiny.yaml"


stage = load_stage("train_controlnet")
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    save_random_model(str(folder), resolution=32)
    return folder


def run(model: Path, out: Path, *overrides: str) -> Path:
    return stage.main(["--config", str(TINY), f"model={model}", f"train.output_dir={out}", *overrides])


def test_run_resume_is_exact_and_the_folder_steers_txt2img(model, tmp_path, monkeypatch):
    straight = run(model, tmp_path / "straight", "train.validate_every=3")
    run(model, tmp_path / "resumed", "train.max_steps=2")
    resumed = run(model, tmp_path / "resumed", "--resume", "latest")
    # the tiny U-Net has SD's architecture: the folder is a diffusers ControlNetModel
    assert json.loads((straight / "config.json").read_text())["_class_name"] == "ControlNetModel"
    a, b = (load_file(str(f / "diffusion_pytorch_model.safetensors")) for f in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "straight" / "samples" / "step-000003.png").is_file()
    assert json.loads((straight / "hint.json").read_text()) == {"hint": "edges", "edge_threshold": 0.1}
    import ldm.models.unet as unet_module
    calls = []
    monkeypatch.setattr(unet_module, "checkpoint", lambda *a, **k: calls.append(1) or torch_checkpoint(*a, **k))
    saved = run(model, tmp_path / "checkpointed", "train.gradient_checkpointing=true")   # recomputes, same result
    assert len(calls) > 0
    c = load_file(str(saved / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    net = load_controlnet(str(straight))
    assert any(v.abs().sum() > 0 for k, v in net.state_dict().items() if k.startswith("zero_"))  # trained off zero

    from ldm import txt2img
    scene = tmp_path / "scene.png"
    Image.fromarray(np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((16, 16), np.uint8))).convert("RGB").save(scene)
    txt2img.main(["a red circle", "--model", str(model), "--steps", "2", "--controlnet", str(straight),
                  "--control-image", str(scene), "--out", str(tmp_path / "c.png")])
    txt2img.main(["a red circle", "--model", str(model), "--steps", "2", "--out", str(tmp_path / "p.png")])
    steered, plain = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in "cp")
    assert np.abs(steered - plain).max() > 0


def _sobel_reference(image: np.ndarray, threshold: float) -> np.ndarray:
    """Sobel by shifted slices of an edge-padded array: max over channels of the magnitude / 4."""
    x = np.pad(image.astype(np.float64), ((0, 0), (1, 1), (1, 1)), mode="edge")
    s = lambda dy, dx: x[:, 1 + dy:x.shape[1] - 1 + dy, 1 + dx:x.shape[2] - 1 + dx]  # noqa: E731
    gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    return (np.sqrt(gx ** 2 + gy ** 2).max(0) / 4 > threshold).astype(np.float32)


def test_edges_equal_a_numpy_sobel_and_see_colour_edges():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 12, 17, generator=g) * 2 - 1
    for threshold in (0.1, 0.5):
        got = edge_map(images, threshold)
        assert got.shape == (2, 3, 12, 17) and torch.equal(got[:, 0], got[:, 2])
        for i in range(2):
            want = _sobel_reference(((images[i] + 1) / 2).numpy(), threshold)
            assert np.array_equal(got[i, 0].numpy(), want)
    # red on green of the same grey level: a luminance detector sees nothing, the channel max sees the step
    flat = torch.full((1, 3, 8, 8), -1.0)
    flat[0, 0, :, :4], flat[0, 1, :, 4:] = 1.0, 1.0
    assert edge_map(flat)[0, 0].sum(1).tolist() == [2.0] * 8          # the two columns either side of the step


def test_control_column_images_are_cropped_and_flipped_with_the_picture(tmp_path):
    rows = []
    for i in range(3):
        picture = Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 56, 3), dtype=np.uint8))
        picture.save(tmp_path / f"{i}.png")
        picture.resize((28, 20)).save(tmp_path / f"{i}-small.png")  # a control image at another size
        picture.save(tmp_path / f"{i}-hint.png")
        rows.append({"file_name": f"{i}.png", "text": "x", "hint": f"{i}-hint.png", "small": f"{i}-small.png"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source="imagefolder", path=str(tmp_path), resolution=32, crop="random", flip=True,
                     control_column="hint", seed=3)
    dataset = build_dataset(cfg)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for i in range(3):
            item = dataset[i]
            torch.testing.assert_close(item["control"] * 2 - 1, item["pixel_values"], atol=1e-6, rtol=0)
    small = build_dataset(DataConfig(source="imagefolder", path=str(tmp_path), resolution=16, control_column="small"))
    assert small[0]["control"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="'missing' not found"):
        build_dataset(DataConfig(source="imagefolder", path=str(tmp_path), control_column="missing"))


def test_column_hints_train(model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(4):
        picture = Image.new("RGB", (32, 32), (60 * i, 120, 200))
        picture.save(images / f"{i}.png")
        Image.fromarray((np.asarray(picture) > 100).astype(np.uint8) * 255).save(images / f"{i}-edges.png")
        rows.append({"file_name": f"{i}.png", "text": f"picture {i}", "conditioning_image": f"{i}-edges.png"})
    (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = run(model, tmp_path / "run", "hint=column", "data.source=imagefolder", f"data.path={images}",
                 "data.control_column=conditioning_image", "train.max_steps=2", "train.validate_every=2")
    assert (folder / "config.json").is_file() and (tmp_path / "run" / "samples" / "step-000002.png").is_file()


@pytest.mark.parametrize("override, key", [("hint=column", "data.control_column"), ("hint=depth", "config key 'hint'"),
                                          ("p_uncond=2", "p_uncond"), ("loss_type=huberr", "config key 'loss_type'"),
                                          ("huber_c=0", "huber_c=0.0")])
def test_bad_settings_are_named(model, tmp_path, capsys, override, key):
    with pytest.raises(SystemExit):
        run(model, tmp_path, override)
    assert key in capsys.readouterr().err


def test_a_huber_run_trains_on_the_same_draws_below_l2(model, tmp_path, monkeypatch):
    """loss_type reaches the ControlNet's loss: the same seed draws the same times and noise, and at step 0 (zero
    convolutions: the U-Net itself) pseudo-Huber, 2c (sqrt(d^2 + c^2) - c) <= d^2, comes out below l2."""
    losses = record_losses(monkeypatch, stage)
    run(model, tmp_path / "l2", "train.max_steps=1", "train.validate_every=0")
    folder = run(model, tmp_path / "huber", "train.max_steps=1", "train.validate_every=0", "loss_type=huber")
    assert len(losses) == 2 and 0 < losses[1] < losses[0] and (folder / "config.json").is_file()


def test_the_controlled_unet_starts_as_the_unet(model):
    from ldm.models.controlnet import ControlledUNet, ControlNet
    pipe = TextToImage.from_folder(str(model))
    net = ControlNet.from_unet(pipe.unet, pipe.autoencoder.config.downsample_factor)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 900.0])
    context = torch.randn(2, 16, 32, generator=g)
    hint = torch.rand(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(ControlledUNet(pipe.unet, [(net, hint, 1.0)])(x, t, context), pipe.unet(x, t, context))
    own = {k: v for k, v in pipe.unet.state_dict().items()}
    assert all(torch.equal(v, own[k[len("body."):]]) for k, v in net.state_dict().items() if k.startswith("body."))


def test_presets_load():
    from ldm.training import load_config
    for name in ("tiny", "shapes64", "sd15"):
        cfg = load_config(stage.ControlNetStageConfig, ROOT / "configs" / "controlnet" / f"{name}.yaml")
        assert cfg.data.batch_size == cfg.train.batch_size


def test_hints_cli_draws_what_a_controlnet_was_trained_on(tmp_path, capsys):
    from ldm.data import hints
    from ldm.data.transforms import open_image, to_tensor
    picture = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(picture)
    x = to_tensor(open_image(picture))[None]
    folder = tmp_path / "cn"
    folder.mkdir()
    for threshold in (0.1, 0.5):
        (folder / "hint.json").write_text(json.dumps({"hint": "edges", "edge_threshold": threshold}))
        hints.main([str(picture), str(tmp_path / "out.png"), "--controlnet", str(folder)])
        drawn = np.asarray(Image.open(tmp_path / "out.png"))[..., 0] > 127
        assert np.array_equal(drawn, edge_map(x, threshold)[0, 0].numpy() > 0.5)
    hints.main([str(picture), str(tmp_path / "shipped.png"), "--controlnet", "shapes64-edges"])   # 0.1
    assert np.array_equal(np.asarray(Image.open(tmp_path / "shipped.png"))[..., 0] > 127,
                          edge_map(x, 0.1)[0, 0].numpy() > 0.5)
    (folder / "hint.json").write_text(json.dumps({"hint": "column"}))
    for bad, message in ((str(folder), "trained on 'column'"), (str(tmp_path), "no hint.json")):
        with pytest.raises(SystemExit):
            hints.main([str(picture), str(tmp_path / "x.png"), "--controlnet", bad])
        assert message in capsys.readouterr().err
