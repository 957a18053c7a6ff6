"""ldm.serve's ControlNet units (alwayson_scripts.controlnet, the A1111 ControlNet extension's API) on the shipped
shapes64 model and its edge ControlNet / T2I-Adapter: each image equals the CLI's draw with the same
--controlnet / --t2i-adapter flags, bad units answer 422 naming their field, the nets stay loaded between requests."""
import base64
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ldm import img2img, txt2img
from ldm.data import hints
from ldm.pipeline import DEFAULT_MODEL
from ldm.serve import Server

from tests.serve_client import call, pixels, serving

PROMPT = "a large red circle on the left"


@pytest.fixture(scope="module")
def url(one_thread_module):
    with serving(["--model", DEFAULT_MODEL]) as base:
        yield base


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> str:
    """A 64 px drawing of a circle and a square, as a user's picture."""
    path = str(tmp_path_factory.mktemp("pic") / "picture.png")
    im = Image.new("RGB", (64, 64), (240, 240, 240))
    draw = ImageDraw.Draw(im)
    draw.ellipse((6, 10, 34, 38), fill=(200, 30, 30))
    draw.rectangle((38, 30, 58, 54), fill=(30, 30, 200))
    im.save(path)
    return path


@pytest.fixture(scope="module")
def hint(picture) -> str:
    """Its Sobel edges, as the shipped nets were trained on (python -m ldm.data.hints)."""
    out = picture.replace("picture.png", "edges.png")
    hints.main([picture, out, "--controlnet", "shapes64-edges"])
    return out


def b64(path) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


def units(*args) -> dict:
    return {"controlnet": {"args": list(args)}}


def post(url, kind="txt2img", **request):
    status, answer = call(url, kind, {"prompt": PROMPT, "steps": 3, "seed": 5, **request})
    assert status == 200, answer
    return answer, json.loads(answer["info"])


def cli(tmp_path, *argv, module=txt2img):
    out = str(tmp_path / "cli.png")
    module.main([PROMPT, "--model", DEFAULT_MODEL, "--out", out, "--steps", "3", "--seed", "5", *argv])
    return pixels(out)


def test_controlnet_unit_equals_the_cli(url, tmp_path, hint):
    unit = {"enabled": True, "module": "none", "model": "shapes64-edges [0123abcd]", "image": b64(hint),
            "weight": 0.8, "guidance_start": 0.2, "guidance_end": 0.9, "control_mode": "Balanced",
            "resize_mode": "Crop and Resize", "processor_res": 512, "threshold_a": 64, "threshold_b": 64,
            "pixel_perfect": False, "low_vram": False}
    answer, info = post(url, alwayson_scripts=units(unit))
    expected = cli(tmp_path, "--controlnet", "shapes64-edges", "--control-image", hint, "--control-scale", "0.8",
                   "--control-range", "0.2:0.9")
    np.testing.assert_array_equal(pixels(answer["images"][0]), expected)
    assert 'ControlNet 0: "Model: shapes64-edges, Weight: 0.8, Guidance Start: 0.2, Guidance End: 0.9"' in \
        info["infotexts"][0]
    assert len(answer["images"]) == 1 and info["unused_fields"] == []      # no detected map appended
    plain, _ = post(url)
    assert not np.array_equal(pixels(plain["images"][0]), expected)       # the unit acted


def test_adapter_unit_equals_the_cli(url, tmp_path, hint):
    unit = {"enabled": True, "module": "none", "model": "shapes64-edges-adapter", "input_image": b64(hint),
            "weight": 1.2, "guidance_end": 0.5}                             # input_image: the old field name
    answer, info = post(url, alwayson_scripts=units(unit))
    np.testing.assert_array_equal(pixels(answer["images"][0]), cli(
        tmp_path, "--t2i-adapter", "shapes64-edges-adapter", "--adapter-image", hint, "--adapter-scale", "1.2",
        "--adapter-factor", "0.5"))
    assert 'ControlNet 0: "Model: shapes64-edges-adapter, Weight: 1.2' in info["infotexts"][0]


def test_two_units_and_img2img(url, tmp_path, picture, hint):
    both = units({"model": "shapes64-edges", "image": {"image": b64(hint), "mask": None}, "weight": 0.7},
                 {"enabled": True, "model": "shapes64-edges-adapter", "image": b64(hint), "weight": 0.6})
    answer, _ = post(url, "img2img", init_images=[b64(picture)], denoising_strength=0.6, alwayson_scripts=both)
    np.testing.assert_array_equal(pixels(answer["images"][0]), cli(
        tmp_path, "--image", picture, "--strength", "0.6", "--controlnet", "shapes64-edges", "--control-image", hint,
        "--control-scale", "0.7", "--t2i-adapter", "shapes64-edges-adapter", "--adapter-image", hint,
        "--adapter-scale", "0.6", module=img2img))


def test_img2img_unit_without_image_reads_the_init_image(url, tmp_path, picture):
    unit = {"enabled": True, "model": "shapes64-edges", "weight": 0.5}      # the extension's default input
    answer, _ = post(url, "img2img", init_images=[b64(picture)], denoising_strength=0.7, alwayson_scripts=units(unit))
    np.testing.assert_array_equal(pixels(answer["images"][0]), cli(
        tmp_path, "--image", picture, "--strength", "0.7", "--controlnet", "shapes64-edges", "--control-image",
        picture, "--control-scale", "0.5", module=img2img))


def test_disabled_and_placeholder_units_are_no_units(url, hint):
    off = units({"enabled": False, "model": "shapes64-edges", "image": b64(hint)},
                {"model": "None", "image": None})                           # what UIs send for unused slots
    answer, info = post(url, alwayson_scripts=off)
    plain, _ = post(url)
    np.testing.assert_array_equal(pixels(answer["images"][0]), pixels(plain["images"][0]))
    assert "ControlNet 0" not in info["infotexts"][0]


@pytest.mark.parametrize("unit, names", [
    ({"model": "shapes64-edge"}, ["alwayson_scripts.controlnet.args[0].model", "shapes64-edges"]),   # close match
    ({"model": "shapes64-edges", "module": "canny"}, ["alwayson_scripts.controlnet.args[0].module", "canny"]),
    ({"model": "shapes64-edges", "control_mode": 2}, ["alwayson_scripts.controlnet.args[0].control_mode"]),
    ({"model": "shapes64-edges", "resize_mode": "Just Resize"}, ["args[0].resize_mode", "Just Resize"]),
    ({"model": "shapes64-edges", "guess_mode": True}, ["args[0].guess_mode"]),
    ({"model": "shapes64-edges", "weight": 3}, ["args[0].weight"]),
    ({"model": "shapes64-edges", "guidance_start": 0.6, "guidance_end": 0.4}, ["args[0].guidance_start"]),
    ({"model": "shapes64-edges-adapter", "guidance_start": 0.3}, ["args[0].guidance_start"]),
    ({"enabled": True, "model": "None"}, ["args[0].model"]),
    ({"model": "shapes64-edges", "image": "not base64!"}, ["args[0].image"]),
    ({"model": "shapes64-edges", "image": base64.b64encode(b"not an image").decode()}, ["args[0].image"]),
    ({"model": "shapes64-edges"}, ["args[0].image", "txt2img"]),
], ids=["unknown-model", "preprocessor", "control-mode", "resize-mode", "guess-mode", "weight", "range",
        "adapter-start", "no-model", "not-base64", "not-an-image", "no-image"])
def test_bad_units_answer_422_naming_the_field(url, hint, unit, names):
    unit = {"image": b64(hint), **unit} if names[-1] != "txt2img" else unit
    status, answer = call(url, "txt2img", {"prompt": PROMPT, "steps": 3, "seed": 1, "alwayson_scripts": units(unit)})
    assert status == 422, answer
    for name in names:
        assert name in answer["detail"]


def test_other_scripts_are_refused_by_name(url):
    status, answer = call(url, "txt2img", {"prompt": PROMPT, "steps": 3,
                                           "alwayson_scripts": {"ADetailer": {"args": [True]}}})
    assert status == 422 and "alwayson_scripts.ADetailer" in answer["detail"]


def test_extension_routes(url):
    root = url.replace("/sdapi/v1/", "/")
    status, models = call(root, "controlnet/model_list")
    assert status == 200 and {"shapes64-edges", "shapes64-edges-adapter"} <= set(models["model_list"])
    assert "shapes64" not in models["model_list"]                           # the base model is no net
    assert call(root, "controlnet/module_list")[1]["module_list"] == ["none"]
    assert call(root, "controlnet/version") == (200, {"version": 2})


def test_controlnet_dir_option(tmp_path, hint):
    """--controlnet-dir replaces the default folders: the shipped nets are not found outside them."""
    app = Server(["--model", DEFAULT_MODEL, "--controlnet-dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"args\[0\]\.model"):
        app.generate({"prompt": PROMPT, "steps": 3, "alwayson_scripts": units(
            {"model": "shapes64-edges", "image": b64(hint)})}, "txt2img")


def test_nets_are_loaded_once(hint):
    """Two requests with the same unit run the same net object: the server's cache, not a second load."""
    app = Server(["--model", DEFAULT_MODEL])
    request = {"prompt": PROMPT, "steps": 3, "seed": 2, "alwayson_scripts": units(
        {"model": "shapes64-edges", "image": b64(hint)})}
    first = app.generate(request, "txt2img")
    assert len(app.nets) == 1
    (key, net), = app.nets.items()
    second = app.generate(request, "txt2img")
    assert app.nets == {key: net} and app.nets[key] is net
    assert first["images"] == second["images"]
