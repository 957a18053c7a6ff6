"""All-or-nothing weight loading shared by every model: a wrong checkpoint names what differs."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

_SHOWN = 20  # keys listed per kind before "... N more"


def _cut(keys: list[str]) -> list[str]:
    return keys[:_SHOWN] + ([f"... {len(keys) - _SHOWN} more"] if len(keys) > _SHOWN else [])


def load_state_dict_strict(model: nn.Module, state: dict, source: str) -> None:
    """Load `state` into `model` only if every key and shape matches; otherwise raise, loading nothing."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"state dict from {source} does not fit {type(model).__name__}: "
                         f"missing keys: {_cut(missing)}; unexpected keys: {_cut(unexpected)}; "
                         f"shape mismatches: {_cut(shapes)}")
    model.load_state_dict(state, strict=True)


def read_weights(path: str) -> dict:
    """A safetensors file's tensors (on CPU); a missing file is named."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing weights file {path}")
    return load_file(path)


def load_weights(module: nn.Module, path: str, source: str | None = None) -> None:
    """Inverse of save_weights: a safetensors file into `module`, all or nothing (load_state_dict_strict).

    fp16 files load into fp32 modules as they are: load_state_dict copies, and the copy casts.
    """
    load_state_dict_strict(module, read_weights(path), source or path)


def write_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, then the file mode an ordinary open() would give (0o666 & ~umask).

    safetensors >= 0.8 writes through a private temp file and leaves every file 0600 (its issue
    #782): model folders and LoRA files would be unreadable to the other users of a shared machine.
    """
    save_file(tensors, str(path), metadata=metadata)
    if os.name == "posix":
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """`write_safetensors` to a file beside `path`, then renamed onto it: a killed run leaves no half file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write_safetensors(tensors, tmp, metadata=metadata)
    tmp.replace(path)


@contextmanager
def edited_copy(source, out) -> Iterator[Path]:
    """A copy of the folder `source` at `out`.tmp to change inside the block, then put in place of `out` (an earlier
    or half-written `out` removed); an error inside removes the copy and leaves `out` as it was."""
    tmp = Path(f"{out}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def save_state(state: dict[str, torch.Tensor], path, dtype: torch.dtype | None = None) -> None:
    """A state dict as safetensors; floating tensors cast to `dtype` when given (fp16 storage)."""
    write_safetensors({k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
                       for k, v in state.items()}, path)


def save_weights(module: nn.Module, path: str, dtype: torch.dtype | None = None) -> None:
    """module.state_dict() as safetensors (`save_state`).

    Loading casts back: load_state_dict copies into the module's own (fp32) parameters.
    """
    save_state(module.state_dict(), path, dtype)


CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def strict_from_dict(cls, d: dict):
    """The dataclass `cls` from a config.json dict; a key it does not know is refused by name."""
    import dataclasses
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}")
    return cls(**d)


class Pretrained:
    """save_pretrained / from_pretrained for a network built from one dataclass config `self.cfg` of type
    `config_class` (with a `from_dict` that refuses unknown keys): config.json plus model.safetensors."""

    config_class: type

    def save_pretrained(self, directory: str, dtype: torch.dtype | None = None) -> None:
        """Write config.json and model.safetensors into `directory` (weights cast to `dtype` if given)."""
        import dataclasses
        import json
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(dataclasses.asdict(self.cfg), f, indent=2)
        save_weights(self, os.path.join(directory, WEIGHTS_NAME), dtype)

    @classmethod
    def from_pretrained(cls, directory: str, device="cpu"):
        """Inverse of save_pretrained; every weight must be present, none extra."""
        import json
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not os.path.isfile(os.path.join(directory, name)):
                raise FileNotFoundError(f"{cls.__name__}.from_pretrained: missing {os.path.join(directory, name)}")
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            model = cls(cls.config_class.from_dict(json.load(f)))
        load_weights(model, os.path.join(directory, WEIGHTS_NAME), directory)
        return model.to(device)


def split_renamed(state: dict, own: dict, rest_to_ours, rest_prefix: str) -> dict:
    """`state` under our names: a key starting with one of `own`'s prefixes gets that prefix's value instead;
    the others go through `rest_to_ours` (a whole-dict renaming) under `rest_prefix`. A transformer ControlNet's
    own layers and its copy of the base net's blocks, say."""
    ours, rest = {}, {}
    for key, value in state.items():
        old = next((old for old in own if key.startswith(old)), None)
        if old is None:
            rest[key] = value
        else:
            ours[own[old] + key[len(old):]] = value
    ours.update({rest_prefix + key: value for key, value in rest_to_ours(rest).items()})
    return ours
