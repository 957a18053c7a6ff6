"""The shapes world judged from its pixels against the numbers of shapes-world.md.

The checker below knows only the spec (palette, sizes, zones, margins, grammar words);
it finds objects as connected non-background regions and measures them, so a render or
sampling bug shows up as a measured disagreement, not as our code agreeing with itself.
"""
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from ldm.data.captions import parse_caption
from ldm.data.shapes import generate, render, sample_scene, scene_for_prompt

# Copied from /work/shared/shapes-world.md, not imported: the reference must be independent.
SPEC_BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SPEC_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 220),
                "yellow": (235, 205, 40), "purple": (150, 70, 200), "orange": (240, 130, 30)}
SPEC_SIDE = {"small": 14, "large": 26}
SPEC_FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}  # area / bbox area
N_SAMPLES = 300


def measure(img: np.ndarray) -> tuple[str, list[dict]]:
    """Background name and the objects found in an RGB uint8 image, from pixels alone."""
    colours, counts = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
    bg_rgb = tuple(int(c) for c in colours[counts.argmax()])
    bg_names = [n for n, rgb in SPEC_BACKGROUNDS.items() if rgb == bg_rgb]
    assert bg_names, f"dominant colour {bg_rgb} is not a spec background"
    bg = np.array(bg_rgb, float)
    labels, n = ndimage.label(np.any(img != bg_rgb, axis=-1), structure=np.ones((3, 3)))
    objects = []
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        pix = img[ys, xs].astype(float)  # (m, 3)
        names = [c for c, rgb in SPEC_COLOURS.items() if (pix == rgb).all(-1).any()]
        assert len(names) == 1, f"region {k} shows exact palette colours {names}"
        col = np.array(SPEC_COLOURS[names[0]], float)
        d = col - bg
        cover = np.clip((pix - bg) @ d / (d @ d), 0, 1)  # anti-aliased blend weight
        blend = bg + cover[:, None] * d
        assert np.abs(pix - blend).max() <= 1.5, "a pixel is no blend of background and colour"
        area = cover.sum()
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        objects.append({
            "colour": names[0], "bbox": (x0, y0, x1, y1), "area": area,
            "exact": int((pix == col).all(-1).sum()),
            "centre": ((x0 + x1) / 2, (y0 + y1) / 2),
            "centroid": ((xs + 0.5) @ cover / area, (ys + 0.5) @ cover / area),
            "pixels": np.stack([xs, ys], 1),
        })
    return bg_names[0], objects


def classify(obj: dict) -> str:
    x0, y0, x1, y1 = obj["bbox"]
    fill = obj["area"] / ((x1 - x0) * (y1 - y0))
    return "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"


def check_sample(scene, text: str, resolution: int = 64) -> None:
    """Every spec rule, measured from the rendered pixels, plus the caption's truth."""
    scale = resolution / 64
    img = render(scene)
    assert img.shape == (resolution, resolution, 3) and img.dtype == np.uint8
    bg, found = measure(img)
    assert bg == scene.background
    assert len(found) == len(scene.objects) in (1, 2)
    by_colour = {o["colour"]: o for o in found}
    assert set(by_colour) == {o.colour for o in scene.objects}
    for label in scene.objects:
        obj = by_colour[label.colour]
        x0, y0, x1, y1 = obj["bbox"]
        side = SPEC_SIDE[label.size] * scale
        assert abs((x1 - x0) - side) <= 1 and abs((y1 - y0) - side) <= 1, (label, obj["bbox"])
        assert np.abs(np.subtract(obj["bbox"], label.bbox)).max() <= 1  # label bbox is true
        assert classify(obj) == label.shape
        ideal = SPEC_FILL[label.shape] * (label.bbox[2] - label.bbox[0]) ** 2
        assert abs(obj["area"] - ideal) <= 0.06 * ideal  # whole shape on the canvas
        assert obj["exact"] >= 0.4 * ideal  # interiors are the exact palette RGB
        if label.shape == "triangle":  # apex up: the mass sits low in the bbox
            assert (obj["centroid"][1] - y0) / (y1 - y0) > 0.6
    if len(found) == 2:
        a, b = found
        gap = cdist(a["pixels"], b["pixels"], "chebyshev").min() - 1  # empty px between
        assert gap >= 2 * scale
        first, second = (by_colour[o.colour] for o in scene.objects)
        axis, sign = {"left_of": (0, 1), "right_of": (0, -1),
                      "above": (1, 1), "below": (1, -1)}[scene.relation]
        for key in ("centre", "centroid"):
            assert sign * (second[key][axis] - first[key][axis]) >= 8 * scale, (key, scene)
    else:
        thirds = {"left": ((0, 1 / 3), (0, 1)), "right": ((2 / 3, 1), (0, 1)),
                  "top": ((0, 1), (0, 1 / 3)), "bottom": ((0, 1), (2 / 3, 1)),
                  "center": ((1 / 3, 2 / 3), (1 / 3, 2 / 3))}[scene.objects[0].zone]
        for key in ("centre", "centroid"):
            for axis, (lo, hi) in enumerate(thirds):
                assert lo * resolution < found[0][key][axis] < hi * resolution, (key, scene)
    check_caption_is_true(text, bg, found, scene)


def check_caption_is_true(text: str, bg: str, found: list[dict], scene) -> None:
    """What the caption asks for, compared with the measured image."""
    words = text.split()
    assert text == text.lower() and text.startswith("a ")
    if "background" in words:
        assert words[-4:] == ["on", "a", bg, "background"]
    asks = parse_caption(text)
    asked = [o["colour"] for o in asks["objects"]]
    assert asked == [o.colour for o in scene.objects]
    for want in asks["objects"]:
        obj = next(o for o in found if o["colour"] == want["colour"])
        assert classify(obj) == want["shape"]
        if want["size"]:
            side = obj["bbox"][2] - obj["bbox"][0]
            assert abs(side - SPEC_SIDE[want["size"]] * scene.resolution / 64) <= 1
    if asks["relation"]:
        assert len(found) == 2 and asks["relation"] == scene.relation
    if asks["zone"]:
        assert asks["zone"] == scene.objects[0].zone  # zone measured in check_sample


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_generated_samples_follow_the_spec(split):
    counts = {"objects": set(), "zones": set(), "relations": set(), "shapes": set()}
    for index in range(N_SAMPLES):
        scene, text, _ = generate(7, index, split)
        check_sample(scene, text)
        counts["objects"].add(len(scene.objects))
        counts["zones"].add(scene.objects[0].zone)
        counts["relations"].add(scene.relation)
        counts["shapes"].update(o.shape for o in scene.objects)
    # the checks above ran over every kind of scene
    assert counts["objects"] == {1, 2}
    assert counts["zones"] >= {"left", "right", "top", "bottom", "center"}
    assert counts["relations"] >= {"left_of", "right_of", "above", "below"}
    assert counts["shapes"] == {"circle", "square", "triangle"}


@pytest.mark.parametrize("resolution", [32, 128])
def test_sizes_and_rules_scale_with_resolution(resolution):
    for index in range(40):
        scene, text, _ = generate(1, index, "train", resolution)
        check_sample(scene, text, resolution)


def test_render_at_another_resolution_scales_geometry():
    scene = generate(3, 0).scene
    big = render(scene, 128)
    _, found = measure(big)
    for label in scene.objects:
        obj = next(o for o in found if o["colour"] == label.colour)
        assert np.abs(np.subtract(obj["bbox"], np.multiply(label.bbox, 2))).max() <= 1


@pytest.mark.parametrize("zone,axis,lo,hi", [
    ("left", 0, 0, 64 / 3), ("right", 0, 128 / 3, 64), ("top", 1, 0, 64 / 3),
    ("bottom", 1, 128 / 3, 64), ("center", 0, 64 / 3, 128 / 3), ("center", 1, 64 / 3, 128 / 3),
])
def test_zone_centres_spread_over_their_third(zone, axis, lo, hi):
    rng = np.random.default_rng(0)
    asks = {"objects": [{"colour": "red", "shape": "square", "size": "small"}],
            "zone": zone, "relation": None, "background": None}
    centres = []
    for _ in range(200):
        (x0, y0, x1, y1), = [o.bbox for o in sample_scene(rng, 64, asks).objects]
        centres.append(((x0 + x1) / 2, (y0 + y1) / 2)[axis])
    legal_lo, legal_hi = max(lo, 7), min(hi, 57)  # a small object's centre stays 7 px in
    assert legal_lo <= min(centres) <= legal_lo + 3 and legal_hi - 3 <= max(centres) <= legal_hi
    other = [((o[0] + o[2]) / 2, (o[1] + o[3]) / 2)[1 - axis] for o in
             (sample_scene(rng, 64, asks).objects[0].bbox for _ in range(200))]
    if zone != "center":  # "the other axis anywhere legal"
        assert min(other) < 12 and max(other) > 52


PROMPTS = [
    "a red circle",
    "a small blue square on the left",
    "a large yellow triangle at the top on a black background",
    "a green square at the bottom",
    "a small orange circle in the center on a gray background",
    "a purple triangle on the right",
    "a red square to the left of a blue circle",
    "a yellow circle above a green triangle on a white background",
    "a blue triangle below a red square",
    "a orange square to the right of a purple circle on a black background",
    "a red circle above a red square",  # same colour twice: still placed, told apart by shape
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_scene_for_prompt_satisfies_the_prompt(prompt):
    rng = np.random.default_rng(11)
    asks = parse_caption(prompt)
    for _ in range(10):
        scene = scene_for_prompt(prompt, rng)
        assert [(o.colour, o.shape) for o in scene.objects] == \
            [(o["colour"], o["shape"]) for o in asks["objects"]]
        for want, obj in zip(asks["objects"], scene.objects):
            assert want["size"] in (None, obj.size)
        assert asks["zone"] in (None, scene.objects[0].zone)
        assert asks["relation"] in (None, scene.relation)
        assert asks["background"] in (None, scene.background)
        if len({o.colour for o in scene.objects}) == len(scene.objects):
            check_sample(scene, prompt)  # the pixel checker tells objects apart by colour
