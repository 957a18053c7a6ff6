"""The shapes world: procedural, captioned 1-2 object images with exact labels.

Implements /work/shared/shapes-world.md. A sample is a pure function of
(seed, split, index): `generate` draws a `Scene` (labels), `render` paints it with
numpy (4x4 supersampled coverage, so edges are anti-aliased while every pixel fully
inside a shape or the background is the exact palette RGB), and `caption` writes a
true caption that asks for some attributes and leaves the rest random.

Geometry is in pixels of `scene.resolution`; a bbox is [x0, y0, x1, y1] with x1, y1
exclusive, so its side is x1 - x0. "Centre" means the bbox centre; for a triangle the
area centroid (2/3 down from the apex) is also kept inside every zone and relation
rule, so a checker may measure either.

CLI:  python -m ldm.data.shapes export --out DIR --n N --seed S [--split heldout]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.captions import P_ZONE, caption, empty_asks, parse_caption
from ldm.data.transforms import to_tensor

BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 220),
           "yellow": (235, 205, 40), "purple": (150, 70, 200), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 14, "large": 26}  # bbox side in px at the reference 64x64 canvas
ZONES = ("left", "right", "top", "bottom", "center")
RELATIONS = ("left_of", "right_of", "above", "below")
SPLITS = {"train": 0, "heldout": 1}  # mixed into the seed key: separate streams

REFERENCE = 64        # the spec's numbers are at 64x64 and scale with the resolution
MIN_GAP = 2           # px between the two objects' bboxes (spec: >= 2)
RELATION_MARGIN = 9   # px between centres along the relation's axis (spec: >= 8, +1 for AA)
ZONE_MARGIN = 1       # px a centre keeps from its zone's edges, so AA cannot push it out
SUPERSAMPLE = 4       # coverage samples per pixel side
HELDOUT_BUCKETS = 8   # 1/8 of all scenes belong to the held-out split, the rest to train
MIN_RESOLUTION = 32

# zone -> ((x_lo, x_hi), (y_lo, y_hi)) in canvas fractions; the open interval holds the centre
ZONE_BOUNDS = {
    "left": ((0, 1 / 3), (0, 1)), "right": ((2 / 3, 1), (0, 1)),
    "top": ((0, 1), (0, 1 / 3)), "bottom": ((0, 1), (2 / 3, 1)),
    "center": ((1 / 3, 2 / 3), (1 / 3, 2 / 3)),
}
# relation -> (axis, sign): sign * (centre[1] - centre[0]) >= margin along axis (0 = x, 1 = y)
RELATION_AXES = {"left_of": (0, 1), "right_of": (0, -1), "above": (1, 1), "below": (1, -1)}


@dataclass(frozen=True)
class Obj:
    """One object: attributes plus its bbox [x0, y0, x1, y1] (exclusive ends, pixels)."""

    shape: str
    colour: str
    size: str
    bbox: tuple[int, int, int, int]
    zone: str | None = None  # single-object scenes only


@dataclass(frozen=True)
class Scene:
    """The full labels of one image; `relation` is objects[0]'s relation to objects[1]."""

    background: str
    objects: tuple[Obj, ...]
    relation: str | None = None
    resolution: int = REFERENCE

    def to_dict(self) -> dict:
        d = asdict(self)
        d["objects"] = [dict(o, bbox=list(o["bbox"])) for o in d["objects"]]
        return d

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        objects = tuple(Obj(o["shape"], o["colour"], o["size"], tuple(o["bbox"]), o.get("zone"))
                        for o in d["objects"])
        return Scene(d["background"], objects, d.get("relation"), d.get("resolution", REFERENCE))


class Sample(NamedTuple):
    scene: Scene
    text: str
    asks: dict


# --------------------------------------------------------------------------- sampling

def side_px(size: str, resolution: int) -> int:
    """Bbox side of `size` at `resolution` (the spec's 14/26 px at 64, scaled)."""
    return round(SIZES[size] * resolution / REFERENCE)


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _centres(shape: str, start: float, side: float, axis: int) -> tuple[float, ...]:
    """Every centre a checker may measure along `axis`: bbox centre, triangle centroid."""
    if shape == "triangle" and axis == 1:
        return start + side / 2, start + 2 * side / 3  # apex up: centroid 2/3 down
    return (start + side / 2,)


def _place_in_zone(rng, shape: str, side: int, zone: str, resolution: int) -> tuple[int, int]:
    """Top-left corner with the centre uniform over the zone's third (other axis: anywhere)."""
    margin = ZONE_MARGIN * resolution / REFERENCE
    corner = []
    for axis, (lo, hi) in enumerate(ZONE_BOUNDS[zone]):
        lo, hi = lo * resolution + margin, hi * resolution - margin
        legal = [p for p in range(resolution - side + 1)
                 if all(lo < c < hi for c in _centres(shape, p, side, axis))]
        corner.append(legal[int(rng.integers(len(legal)))])
    return corner[0], corner[1]


def _apart(a, b, gap: float) -> bool:
    """Bboxes separated by at least `gap` px along x or along y."""
    return (b[0] - a[2] >= gap or a[0] - b[2] >= gap or
            b[1] - a[3] >= gap or a[1] - b[3] >= gap)


def _relation_holds(objs, bboxes, relation: str, margin: float) -> bool:
    axis, sign = RELATION_AXES[relation]
    side = [b[axis + 2] - b[axis] for b in bboxes]
    c0 = _centres(objs[0].shape, bboxes[0][axis], side[0], axis)
    c1 = _centres(objs[1].shape, bboxes[1][axis], side[1], axis)
    # compare like with like: bbox centre with bbox centre, centroid with centroid
    pairs = [(c0[0], c1[0]), (c0[-1], c1[-1])]
    return all(sign * (b - a) >= margin for a, b in pairs)


def _place_pair(rng, objs, relation: str, resolution: int):
    """Two non-overlapping bboxes whose centres satisfy `relation` (rejection sampling)."""
    scale = resolution / REFERENCE
    gap, margin = MIN_GAP * scale, RELATION_MARGIN * scale
    sides = [side_px(o.size, resolution) for o in objs]
    for _ in range(10_000):
        bboxes = []
        for side in sides:
            x0, y0 = (int(v) for v in rng.integers(resolution - side + 1, size=2))
            bboxes.append((x0, y0, x0 + side, y0 + side))
        if _apart(*bboxes, gap) and _relation_holds(objs, bboxes, relation, margin):
            return bboxes
    raise RuntimeError(f"could not place {objs} with relation {relation!r} at {resolution}px")


def sample_scene(rng: np.random.Generator, resolution: int = REFERENCE,
                 asks: dict | None = None) -> Scene:
    """A random scene; attributes named in `asks` (see captions.py) are fixed, the rest random."""
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution must be >= {MIN_RESOLUTION}, got {resolution}")
    asks = asks or empty_asks()
    wanted = asks["objects"] or [{}] * int(rng.integers(1, 3))
    background = asks.get("background") or _pick(rng, BACKGROUNDS)
    # two objects get different colours unless asked otherwise: a checker tells them apart by it
    taken = {w["colour"] for w in wanted if w.get("colour")}
    objs = []
    for want in wanted:
        colour = want.get("colour") or _pick(rng, [c for c in COLOURS if c not in taken])
        taken.add(colour)
        objs.append(Obj(want.get("shape") or _pick(rng, SHAPES), colour,
                        want.get("size") or _pick(rng, SIZES), (0, 0, 0, 0)))
    if len(objs) == 1:
        obj, zone = objs[0], asks.get("zone") or _pick(rng, ZONES)
        side = side_px(obj.size, resolution)
        x0, y0 = _place_in_zone(rng, obj.shape, side, zone, resolution)
        placed = Obj(obj.shape, obj.colour, obj.size, (x0, y0, x0 + side, y0 + side), zone)
        return Scene(background, (placed,), None, resolution)
    relation = asks.get("relation") or _pick(rng, RELATIONS)
    bboxes = _place_pair(rng, objs, relation, resolution)
    placed = tuple(Obj(o.shape, o.colour, o.size, tuple(b)) for o, b in zip(objs, bboxes))
    return Scene(background, placed, relation, resolution)


def scene_for_prompt(text: str, rng: np.random.Generator, resolution: int = REFERENCE) -> Scene:
    """A random scene that satisfies everything the caption `text` asks for."""
    return sample_scene(rng, resolution, parse_caption(text))


# ----------------------------------------------------------------------------- splits

def split_of(scene: Scene) -> str:
    """The split a scene belongs to: a fixed hash partition, so the splits never share an image."""
    key = json.dumps(scene.to_dict(), sort_keys=True).encode()
    bucket = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return "heldout" if bucket % HELDOUT_BUCKETS == 0 else "train"


def generate(seed: int, index: int, split: str = "train", resolution: int = REFERENCE,
             p_zone: float = P_ZONE) -> Sample:
    """Sample `index` of the (seed, split) stream: a pure function of its arguments.

    `p_zone` (how often a one-object caption names its zone) changes captions, never scenes.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    if not 0.0 <= p_zone <= 1.0:
        raise ValueError(f"p_zone must be in [0, 1], got {p_zone}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    scene = sample_scene(rng, resolution)
    while split_of(scene) != split:  # redraw from the same stream: still deterministic
        scene = sample_scene(rng, resolution)
    text, asks = caption(scene, rng, p_zone)
    return Sample(scene, text, asks)


def stream(seed: int = 0, split: str = "train", resolution: int = REFERENCE,
           start: int = 0) -> Iterator[Sample]:
    """Endless on-the-fly samples start, start + 1, ... (nothing touches disk)."""
    index = start
    while True:
        yield generate(seed, index, split, resolution)
        index += 1


# ---------------------------------------------------------------------------- render

def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Point-in-shape for bbox-relative coordinates u (columns) and v (rows) in [0, 1]."""
    if shape == "square":
        return (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":  # apex (0.5, 0) at the top, base v = 1: half-width grows as v / 2
        return (v >= 0) & (v <= 1) & (np.abs(u - 0.5) <= v / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _coverage(shape: str, x0: float, y0: float, side: float, resolution: int):
    """Fraction of each pixel the shape covers, on the pixel window around its bbox."""
    px0, py0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    px1 = min(resolution, math.ceil(x0 + side))
    py1 = min(resolution, math.ceil(y0 + side))
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    xs = (np.arange(px0, px1)[:, None] + offsets).ravel()  # (W * S,) sample x
    ys = (np.arange(py0, py1)[:, None] + offsets).ravel()  # (H * S,) sample y
    hit = _inside(shape, (xs[None, :] - x0) / side, (ys[:, None] - y0) / side)
    cover = hit.reshape(py1 - py0, SUPERSAMPLE, px1 - px0, SUPERSAMPLE).mean(axis=(1, 3))
    return cover, (slice(py0, py1), slice(px0, px1))


def render(scene: Scene, resolution: int | None = None) -> np.ndarray:
    """Paint a scene: uint8 (R, R, 3); R defaults to scene.resolution (else geometry scales)."""
    resolution = resolution or scene.resolution
    scale = resolution / scene.resolution
    image = np.empty((resolution, resolution, 3), np.float64)
    image[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        x0, y0, x1, _ = (v * scale for v in obj.bbox)
        cover, window = _coverage(obj.shape, x0, y0, x1 - x0, resolution)
        cover = cover[..., None]  # (h, w, 1)
        # (1 - c) * bg + c * colour is exactly the palette RGB where c == 1
        image[window] = (1 - cover) * image[window] + cover * np.array(COLOURS[obj.colour])
    return np.rint(image).astype(np.uint8)


# --------------------------------------------------------------------------- dataset

class ShapesWorld(Dataset):
    """Map-style data set of `length` samples rendered on the fly (nothing on disk).

    Items: pixel_values float (3, R, R) in [-1, 1], text, scene (dict), asks (dict), index.
    """

    def __init__(self, split: str = "train", seed: int = 0, resolution: int = REFERENCE,
                 length: int = 10_000, p_zone: float = P_ZONE):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if not 0.0 <= p_zone <= 1.0:
            raise ValueError(f"p_zone must be in [0, 1], got {p_zone}")
        self.split, self.seed, self.resolution, self.length = split, seed, resolution, length
        self.p_zone = p_zone

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesWorld of length {self.length}")
        scene, text, asks = generate(self.seed, int(index), self.split, self.resolution,
                                     self.p_zone)
        return {"pixel_values": to_tensor(render(scene)), "text": text,
                "scene": scene.to_dict(), "asks": asks, "index": int(index)}


# ---------------------------------------------------------------------------- export

def metadata_row(file_name: str, sample: Sample, seed: int, split: str, index: int) -> dict:
    """One metadata.jsonl line: imagefolder's file_name and text plus the full labels."""
    scene = sample.scene.to_dict()
    return {"file_name": file_name, "text": sample.text, "background": scene["background"],
            "objects": scene["objects"], "relation": scene["relation"],
            "resolution": scene["resolution"], "asks": sample.asks,
            "seed": seed, "split": split, "index": index}


def export(out: str | Path, n: int, seed: int = 0, split: str = "train",
           resolution: int = REFERENCE, progress: bool = True) -> Path:
    """Write n PNGs plus metadata.jsonl, loadable by load_dataset("imagefolder", data_dir=out)."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    with open(out / "metadata.jsonl", "w", encoding="utf-8", newline="\n") as meta:
        for index in tqdm(range(n), desc=f"shapes {split}", disable=not progress):
            sample = generate(seed, index, split, resolution)
            name = f"{index:0{width}d}.png"
            # fixed encoder settings and no text chunks: same seed -> same bytes
            Image.fromarray(render(sample.scene)).save(out / name, format="PNG",
                                                       optimize=False, compress_level=6)
            row = metadata_row(name, sample, seed, split, index)
            meta.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm.data.shapes",
                                     description="The built-in shapes world data set.")
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("export", help="write PNGs + metadata.jsonl (an imagefolder)",
                             description="Write N images and metadata.jsonl to DIR; the "
                             "folder loads with datasets.load_dataset('imagefolder', data_dir=DIR).")
    ex.add_argument("--out", required=True, help="output folder (created if missing)")
    ex.add_argument("--n", type=int, required=True, help="number of images")
    ex.add_argument("--seed", type=int, default=0, help="seed of the stream (default 0)")
    ex.add_argument("--split", choices=tuple(SPLITS), default="train",
                    help="train or heldout: disjoint seed streams and scenes (default train)")
    ex.add_argument("--resolution", type=int, default=REFERENCE, help="image side in px (default 64)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.resolution < MIN_RESOLUTION:
        parser.error(f"--resolution must be >= {MIN_RESOLUTION}, got {args.resolution}")
    out = export(args.out, args.n, args.seed, args.split, args.resolution)
    print(f"wrote {args.n} images and metadata.jsonl to {out}")


if __name__ == "__main__":
    main()
