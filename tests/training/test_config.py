"""Typed config: YAML presets, dotted key=value overrides, errors that name the key."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from ldm.training import ConfigError, TrainConfig, flatten_config, load_config, parse_args, save_config


@dataclass
class Block:
    kind: Literal["res", "attn"] = "res"
    heads: Optional[int] = None


@dataclass
class ModelCfg:
    channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    block: Block = field(default_factory=Block)
    name: str = "unet"


@dataclass
class StageCfg:
    model: ModelCfg = field(default_factory=ModelCfg)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class NeedsValue:
    size: int


def test_overrides_parse_types():
    cfg = load_config(StageCfg, None, [
        "train.lr=1e-4",                    # YAML 1.1 reads this as a string; float field accepts it
        "train.weight_decay=1",             # int -> float
        "model.channel_mult=[1,2,4]",
        "train.betas=[0.9, 0.99]",          # tuple[float, float]
        "train.resume=latest", "train.cpu=true", "train.gradient_checkpointing=false",
        "model.block.kind=attn", "model.block.heads=8", "model.name=007",
    ])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 1.0 and isinstance(cfg.train.weight_decay, float)
    assert cfg.model.channel_mult == [1, 2, 4]
    assert cfg.train.betas == (0.9, 0.99)
    assert cfg.train.resume == "latest" and cfg.train.cpu is True
    assert cfg.model.block == Block("attn", 8)
    assert cfg.model.name == "007"           # a string field keeps what was typed
    assert load_config(StageCfg, None, ["train.resume=null"]).train.resume is None


def test_yaml_preset_then_overrides(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text("model:\n  channels: 128\n  block: {kind: attn}\ntrain:\n  lr: 3.0e-4\n  max_steps: 50\n")
    cfg = load_config(StageCfg, path, ["train.max_steps=7"])
    assert (cfg.model.channels, cfg.model.block.kind, cfg.train.lr, cfg.train.max_steps) == (128, "attn", 3e-4, 7)
    assert cfg.model.channel_mult == [1, 2] and cfg.train.batch_size == TrainConfig().batch_size


@pytest.mark.parametrize("override, key, expected", [
    ("train.max_steps=abc", "train.max_steps", "int"),
    ("train.max_steps=1.5", "train.max_steps", "int"),
    ("train.lr=fast", "train.lr", "float"),
    ("train.gradient_checkpointing=1", "train.gradient_checkpointing", "bool"),
    ("train.lr_schedule=cosin", "train.lr_schedule", "['constant', 'cosine', 'linear']"),
    ("train.betas=[0.9]", "train.betas", "2 items"),
    ("model.channel_mult=[1,x]", "model.channel_mult[1]", "int"),
    ("model.block.heads=many", "model.block.heads", "int | None"),
    ("model.block=3", "model.block", "mapping"),
])
def test_wrong_type_names_key_and_type(override, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(StageCfg, None, [override])
    assert f"'{key}'" in str(e.value) and expected in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("train.lrr=1", "train.lrr"),
    ("model.block.headz=2", "model.block.headz"),
    ("optim.lr=1", "optim"),
    ("train.lr.warm=1", "train.lr.warm"),
])
def test_unknown_override_key_rejected(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(StageCfg, None, [override])


def test_value_checks_name_section():
    with pytest.raises(ConfigError, match="config section 'train': grad_accum must be >= 1, got 0"):
        load_config(StageCfg, None, ["train.grad_accum=0"])
    with pytest.raises(ConfigError, match="'train'.*ema_decay must be in"):
        load_config(StageCfg, None, ["train.ema_decay=1.5"])


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        load_config(StageCfg, None, ["train.lrr=1"])


def test_unknown_yaml_key_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  block:\n    kindd: res\n")
    with pytest.raises(ConfigError, match="'model.block.kindd'"):
        load_config(StageCfg, path)


def test_missing_required_key_and_bad_override_form():
    with pytest.raises(ConfigError, match="missing required config key 'size'"):
        load_config(NeedsValue)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(StageCfg, None, ["train.lr"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(StageCfg, "nope.yaml")


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(StageCfg, None, ["train.betas=[0.5,0.6]", "model.block.heads=4", "train.resume=latest"])
    save_config(cfg, tmp_path / "c.yaml")
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["train"]["betas"] == [0.5, 0.6]
    assert load_config(StageCfg, tmp_path / "c.yaml") == cfg


def test_flatten_for_trackers():
    flat = flatten_config(load_config(StageCfg))
    assert flat["train.lr"] == 1e-4 and flat["model.block.kind"] == "res"
    assert flat["model.channel_mult"] == "[1, 2]" and flat["train.resume"] == "null"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_cli_help_lists_every_key(capsys):
    with pytest.raises(SystemExit):
        parse_args(StageCfg, "Train a thing", None, argv=["--help"])
    out = capsys.readouterr().out
    assert "Train a thing" in out and "--resume" in out and "--config" in out
    for line in ["train.lr ", "model.block.heads ", "train.lr_schedule "]:
        assert line in out
    lr_line = next(line for line in out.splitlines() if line.strip().startswith("train.lr "))
    assert "float" in lr_line and "0.0001" in lr_line
    assert "'constant' | 'cosine' | 'linear'" in out


def test_cli_config_resume_and_overrides(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  max_steps: 9\n")
    cfg = parse_args(StageCfg, "x", str(path), argv=["--resume", "latest", "train.lr=0.5", "model.channels=8"])
    assert (cfg.train.max_steps, cfg.train.resume, cfg.train.lr, cfg.model.channels) == (9, "latest", 0.5, 8)
    with pytest.raises(SystemExit):
        parse_args(StageCfg, "x", str(path), argv=["train.nope=1"])
    assert "'train.nope'" in capsys.readouterr().err
