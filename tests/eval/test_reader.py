"""The deterministic reader on ground-truth maps (no network): exact on held-out scenes."""
import numpy as np
import pytest
import scipy.ndimage
import torch

from ldm.data.captions import parse_caption
from ldm.data.shapes import BACKGROUNDS, COLOURS, Obj, generate, render
from ldm.eval.metrics import full_asks, probes
from ldm.eval.reader import (Detected, Reading, judge, label_components, object_mask,
                             read_maps, scene_maps)

N_SCENES = 200


@pytest.fixture(scope="module")
def heldout():
    """(scenes, generated captions, readings of their ground-truth maps)."""
    samples = [generate(0, i, "heldout") for i in range(N_SCENES)]
    scenes = [s.scene for s in samples]
    images = np.stack([render(s) for s in scenes])
    maps = [scene_maps(s) for s in scenes]
    readings = read_maps(images, np.stack([m[0] for m in maps]), np.stack([m[1] for m in maps]))
    return scenes, [s.text for s in samples], readings


def test_true_captions_hold_on_ground_truth_maps(heldout):
    scenes, texts, readings = heldout
    for scene, text, reading in zip(scenes, texts, readings):
        for asks in (parse_caption(text), full_asks(scene)):
            judged = judge(reading, asks)
            assert judged and all(judged.values()), (text, judged, reading)


def test_altered_captions_fail_exactly_their_attribute(heldout):
    scenes, _, readings = heldout
    rng = np.random.default_rng(0)
    seen = set()
    for scene, reading in zip(scenes, readings):
        for text, key, expected in probes(scene, rng):
            judged = judge(reading, parse_caption(text))
            assert judged[key] == expected, (text, key, reading)
            if not expected:  # only the altered attribute changes
                others = {k: v for k, v in judged.items() if k != key}
                assert all(others.values()), (text, key, judged)
                seen.add(key.split("_")[0])
    assert seen == {"colour", "shape", "size", "zone", "relation", "background"}


def test_readings_match_scene_labels(heldout):
    scenes, _, readings = heldout
    for scene, reading in zip(scenes, readings):
        assert reading.background == scene.background
        want = sorted((o.colour, o.shape, o.size) for o in scene.objects)
        assert sorted((o.colour, o.shape, o.size) for o in reading.objects) == want


def test_masks_agree_with_the_renderer():
    # pixels rendered in the exact palette colour lie in our mask, pure background outside it
    for index in range(60):
        scene = generate(1, index).scene
        image = render(scene)
        for obj in scene.objects:
            mask = object_mask(obj, scene.resolution)
            exact = (image == COLOURS[obj.colour]).all(-1)
            assert mask[exact].all() and exact.sum() > 0.8 * mask.sum()
        background = (image == BACKGROUNDS[scene.background]).all(-1)
        colour, _ = scene_maps(scene)
        assert (colour[background] == 0).all()


def test_masks_scale_with_resolution():
    scene = generate(2, 0, resolution=128).scene
    colour64, _ = scene_maps(scene)
    downsampled = render(scene, 64)
    assert ((colour64 > 0) == (downsampled != BACKGROUNDS[scene.background]).any(-1)).mean() > 0.97


@pytest.mark.parametrize("density", [0.3, 0.55, 0.7])
def test_label_components_matches_scipy(density):
    g = torch.Generator().manual_seed(int(density * 100))
    fg = torch.rand(8, 40, 56, generator=g) < density
    ours = label_components(fg).numpy()
    for mask, lab in zip(fg.numpy(), ours):
        ref, n = scipy.ndimage.label(mask)  # default structure: 4-connectivity
        assert ((lab >= 0) == (ref > 0)).all()
        pairs = set(zip(lab[ref > 0].tolist(), ref[ref > 0].tolist()))
        assert len(pairs) == n == len(np.unique(lab[lab >= 0]))  # the same partition


def _obj(colour, shape, side, x, y):
    return Detected(colour, shape, side, (x, y), pixels=100)


def test_missing_and_extra_objects():
    two = parse_caption("a red circle to the left of a blue square")
    only_red = Reading("white", (_obj("red", "circle", 14, 10, 30),))
    judged = judge(only_red, two)
    assert judged["colour_0"] and judged["shape_0"]
    assert not (judged["colour_1"] or judged["shape_1"] or judged["relation"] or judged["count"])
    extra = Reading("white", (_obj("green", "triangle", 26, 50, 50),
                              _obj("red", "circle", 14, 10, 30)))
    judged = judge(extra, parse_caption("a small red circle on the left"))
    assert judged == {"count": False, "colour_0": True, "shape_0": True, "size_0": True,
                      "zone": True}


def test_relation_margin_and_swapped_order():
    caption = parse_caption("a red circle above a blue square")
    near = Reading("gray", (_obj("red", "circle", 14, 20, 30), _obj("blue", "square", 14, 40, 32)))
    far = Reading("gray", (_obj("red", "circle", 14, 20, 20), _obj("blue", "square", 14, 40, 40)))
    assert not judge(near, caption)["relation"]  # 2 px apart: not clearly above
    assert judge(far, caption)["relation"]
    assert not judge(far, parse_caption("a blue square above a red circle"))["relation"]


def test_empty_caption_asks_nothing():
    assert judge(Reading("white", ()), parse_caption("")) == {}


def test_unknown_shape_is_named():
    with pytest.raises(ValueError, match="hexagon"):
        object_mask(Obj("hexagon", "red", "small", (0, 0, 14, 14)), 64)
