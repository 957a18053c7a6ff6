"""Bad input to the real stages and the txt2img CLI: a clear message naming the culprit, and nothing lost."""
import json

import pytest
import torch
from safetensors.torch import load_file

import reliability_harness as h
from ldm import txt2img
from ldm.data.shapes import export
from ldm.training import CheckpointMismatchError, ConfigError, list_checkpoints, load_config


def image_folder(folder, captions: list[str]):
    """Shapes PNGs with the given captions (one each) in metadata.jsonl."""
    export(folder, len(captions), resolution=32, progress=False)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    lines = [json.dumps({**row, "text": text}) + "\n" for row, text in zip(rows, captions)]
    (folder / "metadata.jsonl").write_text("".join(lines))
    return folder


def test_corrupt_truncated_and_non_image_files_are_skipped_by_a_stage_run(tmp_path):
    data = image_folder(tmp_path / "data", ["a red circle"] * 6)
    png = (data / "00000.png").read_bytes()
    (data / "truncated.png").write_bytes(png[: len(png) // 2])
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (data / "notes.png").write_text("these are not pixels\n")
    with open(data / "metadata.jsonl", "a") as f:
        for name in ("truncated.png", "corrupt.png", "notes.png"):
            f.write(json.dumps({"file_name": name, "text": "a blue square"}) + "\n")

    with pytest.warns(UserWarning, match=r"skipped 3 of 9 images that are unreadable, truncated or not"):
        result = h.stage("ae").main(["--config", str(h.TINY["ae"]), f"train.output_dir={tmp_path / 'run'}",
                                     "data.source=imagefolder", f"data.path={data}", "train.max_steps=2",
                                     "val_images=4"])
    assert result["step"] == 2 and result["val_images"] == 4
    assert (tmp_path / "run" / "autoencoder" / "model.safetensors").is_file()


def test_empty_overlong_and_non_ascii_captions_train(tiny_ae, tmp_path):
    captions = ["", "a red circle " * 30, "un cercle rouge à gauche — ☀ 円", "a blue square", "", "ＡＢＣ ñ"]
    data = image_folder(tmp_path / "data", captions)
    with pytest.warns(UserWarning, match=r"longer than 32 tokens are truncated"):
        folder = h.stage("latent").main(["--config", str(h.TINY["latent"]), f"autoencoder={tiny_ae}",
                                         f"train.output_dir={tmp_path / 'run'}", "data.source=imagefolder",
                                         f"data.path={data}", "train.max_steps=3", "p_uncond=0"])
    weights = load_file(str(list_checkpoints(tmp_path / "run")[-1][1] / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert (folder / "model_index.json").is_file()


BAD_KEYS = {"ae": ("model.base_chanels=8", "model.base_chanels", "model.num_res_blocks=two",
                   "config key 'model.num_res_blocks': expected int"),
            "latent": ("unet.chanels=[8]", "unet.chanels", "p_uncond=lots",
                       "config key 'p_uncond': expected float"),
            "distill": ("distill.w_maximum=3", "distill.w_maximum", "distill.round_steps=[2]",
                        "config key 'distill.round_steps': expected int")}


@pytest.mark.parametrize("name", sorted(BAD_KEYS))
def test_unknown_key_and_wrong_type_are_named_for_each_stage(name, capsys):
    unknown, unknown_name, wrong, wrong_msg = BAD_KEYS[name]
    for override, message in ((unknown, f"unknown config key '{unknown_name}'"), (wrong, wrong_msg)):
        with pytest.raises(SystemExit) as exc:
            h.stage(name).main(["--config", str(h.TINY[name]), override])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


@pytest.fixture
def stage1_run(tmp_path):
    out = tmp_path / "ae-run"
    h.stage("ae").main(["--config", str(h.TINY["ae"]), f"train.output_dir={out}", "train.max_steps=1",
                        "train.validate_every=0"])
    return out


def test_stage2_refuses_to_resume_from_a_stage1_output_folder(stage1_run, tiny_ae):
    before = h.snapshot(stage1_run / "checkpoint-000001")
    run_config = (stage1_run / "config.yaml").read_text()
    with pytest.raises(CheckpointMismatchError, match=r"written by stage 'ae', this is stage 'latent'"):
        h.stage("latent").main(["--config", str(h.TINY["latent"]), f"autoencoder={tiny_ae}",
                                f"train.output_dir={stage1_run}", "--resume", "latest"])
    assert [s for s, _ in list_checkpoints(stage1_run)] == [1]
    assert h.snapshot(stage1_run / "checkpoint-000001") == before
    assert (stage1_run / "config.yaml").read_text() == run_config   # the run's config is not overwritten


def test_stage2_refuses_another_architecture_naming_the_key(tiny_ae, tmp_path):
    args = ["--config", str(h.TINY["latent"]), f"autoencoder={tiny_ae}", f"train.output_dir={tmp_path}",
            "train.max_steps=1"]
    h.stage("latent").main(args)
    before = h.snapshot(tmp_path / "checkpoint-000001")
    differs = r"model.unet.channels: checkpoint \[16, 32\] vs now \[16, 48\]"
    with pytest.raises(CheckpointMismatchError, match=differs):
        h.stage("latent").main(args + ["unet.channels=[16,48]", "train.max_steps=2", "--resume", "latest"])
    assert h.snapshot(tmp_path / "checkpoint-000001") == before
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]


@pytest.mark.parametrize("name", ["ae", "latent", "distill"])
def test_missing_checkpoint_path_is_named(name, tiny_ae, teacher, tmp_path):
    missing = tmp_path / "run" / ("stage-one" if name == "distill" else "") / "checkpoint-000123"
    inputs = {"ae": [], "latent": [f"autoencoder={tiny_ae}"], "distill": [f"teacher={teacher}"]}[name]
    with pytest.raises(FileNotFoundError, match=rf"train.resume: checkpoint folder not found: '{missing}'"):
        h.stage(name).main(["--config", str(h.TINY[name]), f"train.output_dir={tmp_path / 'run'}", *inputs,
                            "--resume", str(missing)])
    assert not list((tmp_path / "run").rglob("checkpoint-*"))


def test_prompts_file_of_blank_lines_is_refused(tmp_path, capsys):
    # Blank lines among prompts (skipped, numbering kept) are covered in tests/test_cli.py.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n   \n\n")
    with pytest.raises(SystemExit) as exc:
        txt2img.main(["--from-file", str(prompts), "--outdir", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert f"--from-file {prompts}: no prompts, every line is blank" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


CONFIG_CLASSES = {"ae": "AEStageConfig", "latent": "LatentStageConfig", "distill": "DistillStageConfig"}


@pytest.mark.parametrize("name", sorted(CONFIG_CLASSES))
def test_one_batch_size_in_every_stage(name):
    """train.batch_size is the batch everywhere; a data.batch_size that disagrees is refused, not ignored."""
    cls = getattr(h.stage(name), CONFIG_CLASSES[name])
    assert load_config(cls, h.TINY[name], ["train.batch_size=3"]).data.batch_size == 3
    assert load_config(cls, h.TINY[name], ["train.batch_size=3", "data.batch_size=3"]).data.batch_size == 3
    with pytest.raises(ConfigError, match=r"data.batch_size=5 differs from train.batch_size=3"):
        load_config(cls, h.TINY[name], ["train.batch_size=3", "data.batch_size=5"])
