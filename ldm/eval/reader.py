"""The oracle's deterministic half: per-pixel class maps -> objects -> caption judgements.

The network (oracle.py) only paints two maps at 64x64: a colour class per pixel
(0 = background, 1..6 = COLOUR_NAMES) and a shape class per object pixel
(SHAPE_NAMES). Everything else is read here by rules that are exact on the
ground-truth maps, which `scene_maps` renders from a Scene:

- objects are 4-connected components of non-background pixels (specks dropped);
- colour and shape by majority vote inside the component;
- size from the component's bbox side (small 14 px, large 26 px: cut at 20);
- the centre is the component's pixel centroid, which the generator keeps inside
  zones and relation margins for every shape (ldm/data/shapes.py docstring);
- the background is the palette background nearest the mean background pixel.

Judgement keys: "colour_i", "shape_i", "size_i" (object i of the caption), "zone",
"relation", "background", and "count" (the image shows as many objects as asked).
All geometry is in pixels of the 64x64 reference canvas.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data.captions import COLOUR_NAMES, SHAPE_NAMES
from ldm.data.shapes import BACKGROUNDS, RELATION_AXES, ZONE_BOUNDS

SIDE = 64                 # the oracle reads every image at 64x64
MIN_PIXELS = 20           # smaller components are specks (a small triangle has ~98 px)
SIZE_CUT = 20.0           # bbox side between small (14) and large (26)
ZONE_TOLERANCE = 1.0      # px a centroid may sit outside its zone (generator keeps 1 px inside)
RELATION_MARGIN = 4.0     # px: half the spec's 8 px centre gap, the rest absorbs measuring error
MAX_OBJECTS = 6           # matching tries every assignment, so keep the candidates few


@dataclass(frozen=True)
class Detected:
    """One object read from the maps."""

    colour: str
    shape: str
    side: float                   # bbox side, px
    centre: tuple[float, float]   # pixel centroid (x, y), px
    pixels: int

    @property
    def size(self) -> str:
        return "small" if self.side < SIZE_CUT else "large"


@dataclass(frozen=True)
class Reading:
    """What the reader sees in one image."""

    background: str
    objects: tuple[Detected, ...]


# ------------------------------------------------------------------ ground-truth maps

def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Point-in-shape for bbox-relative coordinates u (right) and v (down) in [0, 1]."""
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "square":
        return (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "triangle":  # apex up at (0.5, 0), base on v = 1
        return (v >= 0) & (v <= 1) & (np.abs(u - 0.5) <= v / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPE_NAMES}")


def object_mask(obj, scene_resolution: int, side: int = SIDE, samples: int = 4) -> np.ndarray:
    """Bool (side, side): pixels at least half covered by `obj` (bbox scaled to `side`)."""
    scale = side / scene_resolution
    x0, y0, x1, _ = (v * scale for v in obj.bbox)
    offsets = (np.arange(samples) + 0.5) / samples
    grid = (np.arange(side)[:, None] + offsets).ravel()  # (side * samples,) sample coords
    hit = _inside(obj.shape, (grid[None, :] - x0) / (x1 - x0), (grid[:, None] - y0) / (x1 - x0))
    return hit.reshape(side, samples, side, samples).mean(axis=(1, 3)) >= 0.5


def scene_maps(scene, side: int = SIDE) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth maps (side, side) int64: colour class (0 = bg) and shape class (-1 = bg)."""
    colour = np.zeros((side, side), np.int64)
    shape = np.full((side, side), -1, np.int64)
    for obj in scene.objects:
        mask = object_mask(obj, scene.resolution, side)
        colour[mask] = 1 + COLOUR_NAMES.index(obj.colour)
        shape[mask] = SHAPE_NAMES.index(obj.shape)
    return colour, shape


# --------------------------------------------------------------------- reading maps

def label_components(foreground: torch.Tensor) -> torch.Tensor:
    """4-connected component labels (B, H, W) int64 of a bool (B, H, W); -1 off the foreground.

    Each label is the flat index of the component's first pixel. Labels spread by taking
    the least label among the 4 neighbours, and jump along label -> label-of-label
    (pointer jumping), so long components settle in far fewer passes than their length.
    """
    b, h, w = foreground.shape
    none = h * w  # larger than any pixel index
    fg = foreground.reshape(b, -1)
    labels = torch.where(fg, torch.arange(none).expand(b, none), none)  # (B, HW)
    while True:
        grid = F.pad(labels.view(b, h, w), (1, 1, 1, 1), value=none)
        least = torch.minimum(torch.minimum(grid[:, 1:-1, :-2], grid[:, 1:-1, 2:]),
                              torch.minimum(grid[:, :-2, 1:-1], grid[:, 2:, 1:-1]))
        new = torch.minimum(labels, least.reshape(b, -1))
        # a label is a pixel of the same component, so its own label is a valid shortcut
        new = torch.minimum(new, new.clamp(max=none - 1).gather(1, new.clamp(max=none - 1)))
        new = torch.where(fg, new, none)
        if torch.equal(new, labels):
            return torch.where(fg, labels, -1).view(b, h, w)
        labels = new


def read_background(image: np.ndarray, colour_map: np.ndarray) -> str:
    """Nearest palette background to the mean RGB of background pixels (whole image if none)."""
    pixels = image[colour_map == 0] if (colour_map == 0).any() else image.reshape(-1, 3)
    mean = pixels.astype(np.float64).mean(axis=0)
    names = list(BACKGROUNDS)
    dist = [np.sum((mean - np.array(BACKGROUNDS[n])) ** 2) for n in names]
    return names[int(np.argmin(dist))]


def read_objects(colour_map: np.ndarray, shape_map: np.ndarray,
                 labels: np.ndarray) -> tuple[Detected, ...]:
    """Objects (largest first) from one image's maps and its component labels."""
    objects = []
    for label in np.unique(labels[labels >= 0]):
        ys, xs = np.nonzero(labels == label)
        if len(ys) < MIN_PIXELS:
            continue
        colour = np.bincount(colour_map[ys, xs] - 1, minlength=len(COLOUR_NAMES)).argmax()
        shape = np.bincount(shape_map[ys, xs].clip(0), minlength=len(SHAPE_NAMES)).argmax()
        side = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1.0
        centre = (xs.mean() + 0.5, ys.mean() + 0.5)  # pixel centres sit at +0.5
        objects.append(Detected(COLOUR_NAMES[colour], SHAPE_NAMES[shape], float(side),
                                (float(centre[0]), float(centre[1])), len(ys)))
    return tuple(sorted(objects, key=lambda o: -o.pixels))


def read_maps(images: np.ndarray, colour_maps: np.ndarray, shape_maps: np.ndarray) -> list[Reading]:
    """Readings of a batch: images uint8 (B, 64, 64, 3), maps int (B, 64, 64)."""
    labels = label_components(torch.from_numpy(colour_maps > 0)).numpy()
    return [Reading(read_background(img, cmap), read_objects(cmap, smap, lab))
            for img, cmap, smap, lab in zip(images, colour_maps, shape_maps, labels)]


# ------------------------------------------------------------------------- judging

def zone_holds(centre: tuple[float, float], zone: str, tolerance: float = ZONE_TOLERANCE) -> bool:
    """The centre lies in the zone's third(s) of the canvas, give or take `tolerance` px."""
    return all(lo * SIDE - tolerance < c < hi * SIDE + tolerance
               for c, (lo, hi) in zip(centre, ZONE_BOUNDS[zone]))


def relation_gap(first: tuple[float, float], second: tuple[float, float], relation: str) -> float:
    """Signed centre gap along the relation's axis: >= margin means `first relation second`."""
    axis, sign = RELATION_AXES[relation]
    return sign * (second[axis] - first[axis])


def _match(asked: list[dict], found: tuple[Detected, ...]) -> list[Detected | None]:
    """One-to-one assignment of asked to detected objects maximising (colour, shape) agreement."""
    found = found[:MAX_OBJECTS]
    slots = list(found) + [None] * len(asked)  # None: the asked object is missing

    def score(pair):
        want, got = pair
        if got is None:
            return 0
        return 2 * (got.colour == want["colour"]) + (got.shape == want["shape"])  # colour first

    best, best_score = None, -1
    for chosen in permutations(slots, len(asked)):  # ties keep the earliest (largest objects)
        total = sum(map(score, zip(asked, chosen)))
        if total > best_score:
            best, best_score = list(chosen), total
    return best


def judge(reading: Reading, asks: dict) -> dict[str, bool]:
    """For each attribute the caption's `asks` (captions.parse_caption) names: does it hold?"""
    asked = asks["objects"]
    if not asked:
        return {}
    matched = _match(asked, reading.objects)
    out = {"count": len(reading.objects) == len(asked)}
    for i, (want, got) in enumerate(zip(asked, matched)):
        out[f"colour_{i}"] = got is not None and got.colour == want["colour"]
        out[f"shape_{i}"] = got is not None and got.shape == want["shape"]
        if want.get("size"):
            out[f"size_{i}"] = got is not None and got.size == want["size"]
    if asks.get("zone"):
        out["zone"] = matched[0] is not None and zone_holds(matched[0].centre, asks["zone"])
    if asks.get("relation"):
        first, second = matched[0], matched[1]
        out["relation"] = (first is not None and second is not None and
                           relation_gap(first.centre, second.centre, asks["relation"])
                           >= RELATION_MARGIN)
    if asks.get("background"):
        out["background"] = reading.background == asks["background"]
    return out


def attribute(key: str) -> str:
    """The attribute family of a judgement key: "colour_1" -> "colour"."""
    return key.split("_")[0]
