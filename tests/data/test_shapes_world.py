"""Captions, labels, determinism, splits, the torch data set and the export CLI."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.captions import caption, format_caption, parse_caption
from ldm.data.shapes import Scene, ShapesWorld, export, generate, render, split_of, stream

SPEC_WORDS = {  # from shapes-world.md
    "colour": {"red", "green", "blue", "yellow", "purple", "orange"},
    "shape": {"circle", "square", "triangle"}, "size": {"small", "large"},
    "background": {"white", "black", "gray"},
}


def test_parse_inverts_every_generated_caption():
    texts = set()
    for index in range(2000):
        scene, text, asks = generate(5, index)
        assert parse_caption(text) == asks
        assert format_caption(asks) == text
        texts.add(text)
    assert len(texts) > 300  # many templates and attribute mixes, not a few fixed strings


@pytest.mark.parametrize("text,expected", [
    ("", {"objects": [], "zone": None, "relation": None, "background": None}),
    ("a red circle", {"objects": [{"colour": "red", "shape": "circle", "size": None}],
                      "zone": None, "relation": None, "background": None}),
    ("a large blue triangle at the bottom on a gray background",
     {"objects": [{"colour": "blue", "shape": "triangle", "size": "large"}],
      "zone": "bottom", "relation": None, "background": "gray"}),
    ("a yellow square to the right of a green circle",
     {"objects": [{"colour": "yellow", "shape": "square", "size": None},
                  {"colour": "green", "shape": "circle", "size": None}],
      "zone": None, "relation": "right_of", "background": None}),
])
def test_parse_caption_by_hand(text, expected):
    assert parse_caption(text) == expected


@pytest.mark.parametrize("bad", ["a red", "a pink circle", "red circle", "a red circle ",
                                 "a small red circle above a blue square",
                                 "a red circle on the left on a blue background"])
def test_parse_caption_rejects_other_text_naming_it(bad):
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        parse_caption(bad)


def test_captions_only_state_true_attributes_and_leave_others_random():
    named = {"size": 0, "zone": 0, "background": 0}
    rng = np.random.default_rng(0)
    for index in range(600):
        scene = generate(9, index).scene
        text, asks = caption(scene, rng)
        words = text.split()
        assert set(words) <= (set().union(*SPEC_WORDS.values()) |
                              {"a", "on", "the", "left", "right", "at", "top", "bottom", "in",
                               "center", "to", "of", "above", "below", "background"})
        if len(scene.objects) == 1:
            obj = scene.objects[0]
            assert (obj.size in words) == (asks["objects"][0]["size"] is not None)
            other_size = {"small": "large", "large": "small"}[obj.size]
            assert other_size not in words
            for zone in ("left", "right", "top", "bottom", "center"):
                assert (zone in words) == (asks["zone"] == zone == obj.zone)
            named["size"] += "small" in words or "large" in words
            named["zone"] += asks["zone"] is not None
        assert (scene.background in words) == (asks["background"] is not None)
        assert not ({"white", "black", "gray"} - {scene.background}) & set(words)
        named["background"] += asks["background"] is not None
    # each optional attribute is sometimes named and sometimes left out
    assert all(50 < count < 550 for count in named.values()), named


def test_scene_dict_round_trip():
    for index in range(50):
        scene = generate(2, index).scene
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_generation_is_a_pure_function_of_seed_split_index():
    a = [generate(4, i) for i in range(30)]
    b = [generate(4, i) for i in reversed(range(30))][::-1]  # order of calls does not matter
    assert a == b
    assert [s.text for s in a] != [generate(5, i).text for i in range(30)]
    s = stream(4, start=10)
    assert [next(s) for _ in range(3)] == a[10:13]


def test_train_and_heldout_are_disjoint():
    def digests(split, n):
        return {hashlib.sha256(render(generate(0, i, split).scene).tobytes()).hexdigest()
                for i in range(n)}
    train, heldout = digests("train", 800), digests("heldout", 200)
    assert len(heldout) == 200 and not train & heldout
    # every held-out scene is in the held-out part of the partition, no train scene is
    assert all(split_of(generate(0, i, "heldout").scene) == "heldout" for i in range(50))
    assert all(split_of(generate(0, i, "train").scene) == "train" for i in range(50))


def test_heldout_part_is_a_fraction_of_all_scenes():
    from ldm.data.shapes import sample_scene
    rng = np.random.default_rng(1)
    share = np.mean([split_of(sample_scene(rng)) == "heldout" for _ in range(2000)])
    assert 0.09 < share < 0.16  # 1/8, so training keeps most of the world


def test_shapes_world_dataset_items():
    ds = ShapesWorld("heldout", seed=3, resolution=64, length=20)
    assert len(ds) == 20
    item = ds[7]
    scene, text, asks = generate(3, 7, "heldout")
    assert item["text"] == text and item["asks"] == asks and item["scene"] == scene.to_dict()
    pixels = item["pixel_values"]
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    expected = torch.from_numpy(render(scene)).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-6)
    assert pixels.min() >= -1 and pixels.max() <= 1
    with pytest.raises(IndexError, match="20"):
        ds[20]
    with pytest.raises(ValueError, match="'test'"):
        ShapesWorld("test")


def _export_digest(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_export_is_byte_identical_across_processes_and_loads_with_datasets(tmp_path):
    cmd = [sys.executable, "-m", "ldm.data.shapes", "export", "--out", str(tmp_path / "a"),
           "--n", "12", "--seed", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    export(tmp_path / "b", 12, seed=3, progress=False)
    a, b = _export_digest(tmp_path / "a"), _export_digest(tmp_path / "b")
    assert a == b and len(a) == 13  # 12 PNGs + metadata.jsonl
    export(tmp_path / "h", 12, seed=3, split="heldout", progress=False)
    assert _export_digest(tmp_path / "h") != a

    import datasets
    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "a"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 12
    rows = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    for row, record in zip(rows, ds):
        scene = generate(3, row["index"]).scene
        assert record["text"] == row["text"] == generate(3, row["index"]).text
        assert record["background"] == scene.background
        assert [o["bbox"] for o in record["objects"]] == [list(o.bbox) for o in scene.objects]
        assert [o["shape"] for o in record["objects"]] == [o.shape for o in scene.objects]
        np.testing.assert_array_equal(np.asarray(record["image"]), render(scene))
        assert np.asarray(Image.open(tmp_path / "a" / row["file_name"])).shape == (64, 64, 3)


def test_cli_help_and_bad_arguments(tmp_path):
    from ldm.data.shapes import main
    with pytest.raises(SystemExit) as err:
        main(["export", "--help"])
    assert err.value.code == 0
    with pytest.raises(SystemExit):
        main(["export", "--out", str(tmp_path), "--n", "0"])


def test_p_zone_changes_only_the_captions():
    # a zone curriculum (data.p_zone) must keep the images and their order: only captions move
    one_object = 0
    for index in range(300):
        base = generate(4, index)
        always, never = generate(4, index, p_zone=1.0), generate(4, index, p_zone=0.0)
        assert always.scene == base.scene == never.scene
        assert parse_caption(always.text) == always.asks
        if len(base.scene.objects) == 1:
            one_object += 1
            assert always.asks["zone"] == base.scene.objects[0].zone
            assert never.asks["zone"] is None
            assert base.text in (always.text, never.text)  # the default is one of the two
        else:
            assert always.text == base.text == never.text
    assert one_object > 100
    with pytest.raises(ValueError, match="p_zone"):
        generate(4, 0, p_zone=1.5)
