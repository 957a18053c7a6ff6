"""--deepcache N[:BRANCH] on txt2img and img2img: parsed, refused with usage errors, written into the PNG's settings
(our JSON and the A1111-style text) and replayed; the teacher's and a student's images against the plain run's."""
import json

import numpy as np
import pytest
from PIL import Image

from ldm import img2img, txt2img
from ldm.cli import parse_deepcache
from tests.tiny_models import random_model_with_student


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread_module):
    return random_model_with_student(tmp_path_factory.mktemp("model"), resolution=32, w_features=16)


def pixels(path):
    return np.asarray(Image.open(path))


def texts(path) -> tuple[dict, str]:
    with Image.open(path) as im:
        return json.loads(im.text["ldm"]), im.text["parameters"]


def test_parse_deepcache():
    assert parse_deepcache("3") == (3, 0) and parse_deepcache("5:2") == (5, 2) and parse_deepcache("1:0") == (1, 0)
    for bad in ("0", "3:-1", "x", "3:y", "3:1:2"):
        with pytest.raises(Exception, match="N|expected"):
            parse_deepcache(bad)


@pytest.mark.parametrize("drawn_by", [["--teacher", "--steps", "4"], ["--steps", "2"]])   # teacher, student-2
def test_txt2img_deepcache_is_recorded_and_replayed(model, tmp_path, drawn_by):
    base = ["a red circle", "--model", model, *drawn_by, "--seed", "5"]
    txt2img.main([*base, "--out", str(tmp_path / "plain.png")])
    txt2img.main([*base, "--deepcache", "1:2", "--out", str(tmp_path / "one.png")])
    txt2img.main([*base, "--deepcache", "2:1", "--out", str(tmp_path / "dc.png")])
    assert np.array_equal(pixels(tmp_path / "one.png"), pixels(tmp_path / "plain.png"))       # N = 1: every call full
    assert not np.array_equal(pixels(tmp_path / "dc.png"), pixels(tmp_path / "plain.png"))
    run, parameters = texts(tmp_path / "dc.png")
    assert run["deepcache"] == "2:1" and "DeepCache interval: 2, DeepCache branch: 1" in parameters
    assert "deepcache" not in texts(tmp_path / "plain.png")[0]
    txt2img.main(["--replay", str(tmp_path / "dc.png"), "--out", str(tmp_path / "again.png")])
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "dc.png"))
    txt2img.main(["--replay", str(tmp_path / "dc.png"), "--deepcache", "1", "--out", str(tmp_path / "off.png")])
    assert np.array_equal(pixels(tmp_path / "off.png"), pixels(tmp_path / "plain.png"))      # a flag given wins


def test_img2img_deepcache_is_recorded_and_replayed(model, tmp_path):
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "in.png")
    base = ["a blue square", "--model", model, "--image", str(tmp_path / "in.png"), "--strength", "0.75",
            "--teacher", "--steps", "8"]
    img2img.main([*base, "--out", str(tmp_path / "plain.png")])
    img2img.main([*base, "--deepcache", "3", "--out", str(tmp_path / "dc.png")])
    assert not np.array_equal(pixels(tmp_path / "dc.png"), pixels(tmp_path / "plain.png"))
    assert texts(tmp_path / "dc.png")[0]["deepcache"] == "3:0"
    img2img.main(["--replay", str(tmp_path / "dc.png"), "--out", str(tmp_path / "again.png")])
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "dc.png"))


def test_bad_deepcache_values_are_usage_errors(model, tmp_path, capsys):
    for bad, message in (("0", "N must be >= 1 and BRANCH >= 0"), ("2:x", "expected N[:BRANCH]"),
                         ("2:4", "--deepcache: DeepCache branch 4: this U-Net has 4 skip branches, 0..3")):
        with pytest.raises(SystemExit) as e:
            txt2img.main(["a red circle", "--model", model, "--deepcache", bad, "--out", str(tmp_path / "x.png")])
        assert e.value.code == 2 and message in capsys.readouterr().err
