"""Edits of the shapes world: exact (before, instruction, after) triples for InstructPix2Pix (Brooks et al. 2023).

Brooks et al. build their triples with GPT-3 and Prompt-to-Prompt; here the world's labels make them exact: a scene
from the shapes world's sampler (`shapes.generate`, so the train / held-out split is the world's), one edit applied
to its labels, both scenes rendered. Edits (EDITS):

- recolour: one object gets a colour no object in the scene has ("make the circle blue"); its shape, size and box
  stay, so the after-image differs from the before-image only on that object's pixels (its anti-aliased edge too);
- background: the background becomes another of BACKGROUNDS ("make the background white"); pixels wholly inside
  an object stay.

An object is named by its shape when no other object shares it, else (and in half of the other cases) by colour and
shape ("make the red circle blue"), so every instruction picks one object. A triple is a pure function of (seed,
split, index): the before-scene is `generate(seed, index, split)`'s and the edit comes from its own seed stream.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
from torch.utils.data import Dataset

from ldm.data.shapes import BACKGROUNDS, COLOURS, REFERENCE, SPLITS, Scene, generate, render
from ldm.data.transforms import to_tensor

EDITS = ("recolour", "background")
EDIT_STREAM = 7            # mixed into the seed key: the edit's draws never reuse the scene's
P_FULL_NAME = 0.5          # a unique shape still named with its colour this often (both phrasings are learned)
RECOLOUR = ("make the {ref} {value}", "turn the {ref} {value}", "change the {ref} to {value}",
            "paint the {ref} {value}", "colour the {ref} {value}")
BACKGROUND = ("make the background {value}", "change the background to {value}", "turn the background {value}",
              "put it on a {value} background")


@dataclass(frozen=True)
class Edit:
    """One change to a scene's labels: `kind` (EDITS), the object it changes (recolour; None for the background)
    and the new value (a colour or background name)."""

    kind: str
    target: int | None
    value: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "target": self.target, "value": self.value}


class EditSample(NamedTuple):
    before: Scene
    after: Scene
    instruction: str
    edit: Edit


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The scene with `edit` applied to its labels; everything else (geometry included) unchanged."""
    if edit.kind == "recolour":
        if edit.target is None or not 0 <= edit.target < len(scene.objects) or edit.value not in COLOURS:
            raise ValueError(f"recolour needs an object index of the scene and a colour of {list(COLOURS)}, "
                             f"got {edit}")
        objects = list(scene.objects)
        objects[edit.target] = replace(objects[edit.target], colour=edit.value)
        return replace(scene, objects=tuple(objects))
    if edit.kind == "background":
        if edit.value not in BACKGROUNDS:
            raise ValueError(f"background needs one of {list(BACKGROUNDS)}, got {edit.value!r}")
        return replace(scene, background=edit.value)
    raise ValueError(f"unknown edit kind {edit.kind!r}; choose from {EDITS}")


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def sample_edit(rng: np.random.Generator, scene: Scene, kinds=EDITS) -> Edit:
    """A random edit of `scene` among `kinds` that changes it: a new colour no object has, or a new background."""
    kind = _pick(rng, kinds)
    if kind == "recolour":
        target = int(rng.integers(len(scene.objects)))
        taken = {o.colour for o in scene.objects}     # the after-scene's objects stay told apart by colour
        return Edit(kind, target, _pick(rng, [c for c in COLOURS if c not in taken]))
    if kind == "background":
        return Edit(kind, None, _pick(rng, [b for b in BACKGROUNDS if b != scene.background]))
    raise ValueError(f"unknown edit kind {kind!r}; choose from {EDITS}")


def instruction(rng: np.random.Generator, scene: Scene, edit: Edit) -> str:
    """The written instruction for `edit` of `scene`; it names the edited object unambiguously."""
    if edit.kind == "background":
        return _pick(rng, BACKGROUND).format(value=edit.value)
    obj = scene.objects[edit.target]
    shared = sum(o.shape == obj.shape for o in scene.objects) > 1
    ref = f"{obj.colour} {obj.shape}" if shared or rng.random() < P_FULL_NAME else obj.shape
    return _pick(rng, RECOLOUR).format(ref=ref, value=edit.value)


def generate_edit(seed: int, index: int, split: str = "train", resolution: int = REFERENCE,
                  kinds=EDITS) -> EditSample:
    """Triple `index` of the (seed, split) stream: the world's scene `index`, one edit of it, its instruction."""
    before = generate(seed, index, split, resolution).scene
    rng = np.random.default_rng([seed, SPLITS[split], index, EDIT_STREAM])
    edit = sample_edit(rng, before, kinds)
    return EditSample(before, apply_edit(before, edit), instruction(rng, before, edit), edit)


class ShapesEdits(Dataset):
    """Map-style data set of `length` edit triples rendered on the fly (data.source "shapes-edits").

    Items: pixel_values (the after-image, what the model draws) and source_pixels (the before-image, what it edits),
    float (3, R, R) in [-1, 1]; text (the instruction); before, after (scene dicts), edit (dict), index.
    """

    def __init__(self, split: str = "train", seed: int = 0, resolution: int = REFERENCE, length: int = 10_000):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.split, self.seed, self.resolution, self.length = split, seed, resolution, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesEdits of length {self.length}")
        sample = generate_edit(self.seed, int(index), self.split, self.resolution)
        return {"pixel_values": to_tensor(render(sample.after)), "source_pixels": to_tensor(render(sample.before)),
                "text": sample.instruction, "before": sample.before.to_dict(), "after": sample.after.to_dict(),
                "edit": sample.edit.to_dict(), "index": int(index)}
