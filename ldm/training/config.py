"""Typed configs: dataclasses filled from a YAML preset plus `key=value` command-line overrides.

A stage defines one dataclass whose fields are nested dataclasses (`model`, `data`, `train`);
`load_config` builds it from YAML and dotted overrides (`train.lr=1e-4 model.channel_mult=[1,2,4]`)
and checks every value against the annotations, naming the full dotted key on any error. A key a
stage no longer has can say where it went: the dataclass's `moved_keys: ClassVar[dict]` (name -> message);
`retired_when_off: ClassVar[dict]` (section -> the key that switched it on) lets such a section through when that
key is empty, as older runs saved it.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config key is unknown, missing or has a value of the wrong type."""


@dataclass
class PostHocEMAConfig:
    """EDM2's post-hoc EMA (Karras et al. 2024, sec. 3): power-function EMAs tracked beside training, snapshots of them
    saved to <output_dir>/posthoc-ema/, and `python -m ldm.training.posthoc_ema RUN` rebuilding any EMA length later."""

    sigma_rels: list[float] = field(default_factory=list)  # tracked widths relative to the run's length; [] = off
                                                            # (the paper: [0.05, 0.10]); each in (0, 1/sqrt(12)]
    every: int = 500                                        # steps between snapshots (and one at max_steps)
    dtype: Literal["float32", "float16"] = "float32"       # snapshot files; float16 halves them, but rounds each
                                                            # by ~5e-4 relative, scaled by the rebuild's weights

    def __post_init__(self):
        bad = [s for s in self.sigma_rels if not 0.0 < s <= 12 ** -0.5]
        if bad:
            raise ValueError(f"sigma_rels {bad} out of range: each must be in (0, {12 ** -0.5:.4f}] (power-function "
                             "exponent gamma >= 0; 0.2887 = the uniform average of every step)")
        if len({round(s, 4) for s in self.sigma_rels}) != len(self.sigma_rels):
            raise ValueError(f"sigma_rels {self.sigma_rels} must differ (in 4 decimals: the snapshot file names)")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")


@dataclass
class TrainConfig:
    """The optimisation, checkpoint and logging knobs every training stage shares."""

    output_dir: str = "runs/default"           # checkpoints, logs, samples and config.yaml go here
    seed: int = 0                               # each process seeds with seed + process index
    max_steps: int = 1000                       # optimizer updates (non-finite skips do not count)
    batch_size: int = 16                        # per process, per micro-step
    grad_accum: int = 1                         # micro-steps per optimizer update
    lr: float = 1e-4                            # peak learning rate
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"  # shape after warmup
    lr_min_ratio: float = 0.0                   # cosine/linear decay ends at lr * lr_min_ratio
    warmup_steps: int = 0                       # linear warmup from lr/warmup_steps to lr
    weight_decay: float = 0.0                   # AdamW decay, applied to matrices/kernels only
    optimizer: Literal["adamw", "adafactor"] = "adamw"  # adafactor: factored second moments, no first (memory)
    betas: tuple[float, float] = (0.9, 0.999)   # AdamW moment decays
    eps: float = 1e-8                           # AdamW denominator floor
    max_grad_norm: float = 1.0                  # global-norm clip; 0 disables
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    ema_decay: float = 0.0                      # 0 disables the EMA of weights
    ema_power: float = 0.0                      # EMA warmup: d_n = min(ema_decay, 1-(1+n)^-power); 0 = off
    posthoc_ema: PostHocEMAConfig = field(default_factory=PostHocEMAConfig)  # beside the EMA above; stage 2 only
    checkpoint_every: int = 500                 # steps between checkpoints (and one at max_steps)
    keep_last: int = 3                          # complete checkpoints kept; 0 keeps all
    log_every: int = 10                         # steps between scalar logs
    validate_every: int = 500                   # steps between validation images/metrics; 0 = never
    resume: Optional[str] = None                # None, "latest" or a checkpoint folder
    max_nonfinite: int = 5                      # non-finite updates in a row before the run stops
    cpu: Optional[bool] = None                  # None: CPU exactly when CUDA is absent
    tracker: Literal["tensorboard", "none"] = "tensorboard"
    gradient_checkpointing: bool = False        # trade compute for activation memory
    min_free_disk_gb: float = 1.0               # refuse to start below this much free space

    def __post_init__(self):
        positive = ("max_steps", "batch_size", "grad_accum", "max_nonfinite")
        non_negative = ("warmup_steps", "weight_decay", "max_grad_norm", "ema_power",
                        "checkpoint_every", "keep_last", "validate_every", "min_free_disk_gb")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ValueError(f"lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")


def one_batch_size(data: Any, train: TrainConfig) -> Any:
    """The stage's data config with its batch size settled: one number for the loader and the update.

    The loader's batch is the training batch (per process, per micro-step), so a stage takes
    train.batch_size; data.batch_size left unset (None) follows it, and one set to another value
    is refused rather than silently ignored.
    """
    if data.batch_size is None:
        return dataclasses.replace(data, batch_size=train.batch_size)
    if data.batch_size != train.batch_size:
        raise ValueError(f"data.batch_size={data.batch_size} differs from train.batch_size="
                         f"{train.batch_size}: the loader's batch is the training batch (per process, "
                         f"per micro-step); set train.batch_size alone")
    return data


# --------------------------------------------------------------------------- type checking

def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(c) for c in typing.get_args(tp))
    if _is_union(tp):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _fail(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key '{key}': expected {_type_name(tp)}, "
                       f"got {value!r} ({type(value).__name__})")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp` and return it converted (int->float, list->tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise _fail(key, tp, value)
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected one of {list(args)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _fail(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(key, tp, value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(key, tp, value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}': expected {len(args)} items "
                                  f"({_type_name(tp)}), got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(key, tp, value)
        k_tp, v_tp = args if args else (Any, Any)
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    raise ConfigError(f"config key '{key}': unsupported annotation {tp!r}")


def _fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (works with `from __future__ import annotations`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown_key(cls: type, key: str, given: str) -> ConfigError:
    """`key`'s last part is no field of `cls`: where it went if `cls.moved_keys` lists it (naming the key as
    `given`: "ti.word" for key "ti"), else a close match."""
    name, known = key.rsplit(".", 1)[-1], list(_fields(cls))
    if name in getattr(cls, "moved_keys", {}):
        return ConfigError(f"config key '{given}': {cls.moved_keys[name]}")
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {', '.join(known)}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a nested dict, validating every key and value."""
    where = prefix or "<root>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{where}': expected a mapping for {cls.__name__}, got {data!r}")
    hints = _fields(cls)
    off = getattr(cls, "retired_when_off", {})
    for name in data:
        if name not in hints:
            if name in off and isinstance(data[name], dict) and not data[name].get(off[name]):
                continue            # a retired section saved switched off (an older run's config.yaml): nothing lost
            key = f"{prefix}.{name}" if prefix else str(name)
            section = data[name] if isinstance(data[name], dict) and data[name] else {}
            raise _unknown_key(cls, key, f"{key}.{next(iter(section))}" if section else key)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], key)
        elif dataclasses.is_dataclass(hints[f.name]) and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = _build(hints[f.name], {}, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{key}' ({_type_name(hints[f.name])})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # a dataclass's own __post_init__ checks
        raise ConfigError(f"config section '{where}': {e}") from None


# --------------------------------------------------------------------------- overrides

def _field_type(cls: type, dotted: str) -> Any:
    """The annotation at a dotted key, or a ConfigError naming the first unknown part."""
    tp, parts = cls, dotted.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"config key '{here}': '{'.'.join(parts[:i])}' is a "
                              f"{_type_name(tp)}, not a section with sub-keys")
        hints = _fields(tp)
        if part not in hints:
            raise _unknown_key(tp, here, dotted)
        tp = hints[part]
    return tp


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) is Literal:
        return any(isinstance(a, str) for a in typing.get_args(tp))
    return _is_union(tp) and any(_accepts_str(a) for a in typing.get_args(tp))


def parse_override(cls: type, item: str) -> tuple[str, Any]:
    """`"train.lr=1e-4"` -> ("train.lr", 1e-4): the value read by yaml.safe_load."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    tp = _field_type(cls, key)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"config key '{key}': cannot parse value {raw!r}: {e}") from None
    # A string field keeps exactly what was typed: name=007 stays "007", not 7.
    if _accepts_str(tp) and value is not None and not isinstance(value, str):
        value = raw
    return key, value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
        child = node.get(p)
        if not isinstance(child, dict):
            child = node[p] = {}
        node = child
    node[leaf] = value


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Build `cls` from an optional YAML preset, then `key=value` overrides, validating all."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(tree).__name__}")
    for item in overrides:
        key, value = parse_override(cls, item)
        _set_dotted(tree, key, value)
    return _build(cls, tree)


# --------------------------------------------------------------------------- output

def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_to_dict(cfg: Any) -> dict:
    """A nested dict of plain YAML/JSON types (tuples become lists)."""
    if isinstance(cfg, dict):
        return _plain(cfg)
    return _plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write `cfg` as YAML that `load_config` reads back to an equal config."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def flatten_config(cfg: Any) -> dict[str, bool | int | float | str]:
    """`{"train.lr": 1e-4, ...}` with scalars only (lists and None as strings), for trackers."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            elif isinstance(v, (bool, int, float, str)):
                out[key] = v
            else:
                out[key] = json.dumps(v)
    walk(config_to_dict(cfg), "")
    return out


# --------------------------------------------------------------------------- CLI

def describe_config(cls: type) -> str:
    """One line per key: dotted name, type and default (for --help)."""
    lines: list[str] = []

    def walk(tp: type, prefix: str) -> None:
        hints = _fields(tp)
        for f in dataclasses.fields(tp):
            key = prefix + f.name
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], key + ".")
                continue
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "(required)"
            lines.append(f"  {key:<32} {_type_name(hints[f.name]):<32}  {default}")
    walk(cls, "")
    return "\n".join(lines)


def _train_key(cls: type) -> str | None:
    """The dotted name of the TrainConfig field inside `cls` (for --resume)."""
    if cls is TrainConfig:
        return ""
    for name, tp in _fields(cls).items():
        if tp is TrainConfig:
            return name + "."
    return None


def parse_args(cls: type, description: str, default_config: str | Path | None = None,
               argv: list[str] | None = None) -> Any:
    """The stage CLI: `[--config PATH] [--resume latest|PATH] [key=value ...]` -> a `cls`."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides are key=value with dotted keys, values read as YAML, e.g.\n"
               "  train.lr=1e-4 train.betas=[0.9,0.99] train.resume=latest\n\n"
               "config keys (type, default):\n" + describe_config(cls))
    parser.add_argument("--config", default=default_config, metavar="PATH",
                        help=f"YAML preset (default: {default_config})")
    train_key = _train_key(cls)
    if train_key is not None:
        parser.add_argument("--resume", default=None, metavar="latest|PATH",
                            help=f"same as {train_key}resume=...: 'latest' or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    overrides = list(args.overrides)
    if getattr(args, "resume", None) is not None:
        overrides.append(f"{train_key}resume={args.resume}")
    try:
        return load_config(cls, args.config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        parser.error(str(e))
