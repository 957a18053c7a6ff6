"""ldm.serve, the A1111-compatible HTTP API, on the shipped shapes64 model: each image equals what the CLIs
(ldm.txt2img / img2img / inpaint `main`) draw with the same settings, bad requests answer 422 and leave it up."""
import base64
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from ldm import img2img, inpaint, txt2img
from ldm.cli import CLI_SAMPLERS, SAMPLER_NAMES
from ldm.pipeline import DEFAULT_MODEL
from ldm.sdapi import parse_infotext

from tests.serve_client import call, pixels, serving
from tests.tiny_models import write_image_and_mask


@pytest.fixture(scope="module")
def url(one_thread_module):
    with serving(["--model", DEFAULT_MODEL]) as base:
        yield base


def b64(path) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


def draw(url, **request):
    status, answer = call(url, "txt2img", {"prompt": "a large red circle on the left", **request})
    assert status == 200, answer
    return answer, json.loads(answer["info"])


def cli(tmp_path, name, *argv, prompt="a large red circle on the left", module=txt2img):
    out = str(tmp_path / f"{name}.png")
    module.main([prompt, "--model", DEFAULT_MODEL, "--out", out, *argv])
    return pixels(out)


@pytest.mark.parametrize("request_, argv", [
    ({"steps": 4, "seed": 7, "cfg_scale": 3}, ["--steps", "4", "--seed", "7", "--guidance", "2"]),    # the student
    ({"steps": 3, "seed": 5, "cfg_scale": 4.5, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
      "negative_prompt": "a green triangle"},
     ["--steps", "3", "--seed", "5", "--guidance", "3.5", "--sampler", "dpmpp_2m", "--spacing", "karras",
      "--negative", "a green triangle"]),
    ({"steps": 3, "seed": 5, "sampler_name": "DPM++ 2M Karras"}, ["--steps", "3", "--seed", "5", "--sampler",
                                                                   "dpmpp_2m", "--spacing", "karras"]),
    ({"steps": 3, "seed": 9, "sampler_name": "euler_a", "eta": 0}, ["--steps", "3", "--seed", "9", "--sampler",
                                                                   "euler_a"]),
    ({"steps": 2, "seed": 4, "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5},
     ["--steps", "2", "--seed", "4", "--hires", "2:0.5"]),
    ({"steps": 4, "seed": 1, "width": 96, "height": 64, "subseed": 8, "subseed_strength": 0.3},
     ["--steps", "4", "--seed", "1", "--size", "96x64", "--subseed", "8", "--subseed-strength", "0.3"]),
], ids=["student", "dpmpp_2m-karras-negative", "old-style-name", "euler-a", "hires", "size-variation"])
def test_txt2img_equals_the_cli(url, tmp_path, request_, argv):
    answer, info = draw(url, **request_)
    assert len(answer["images"]) == 1 and info["seed"] == request_["seed"]
    np.testing.assert_array_equal(pixels(answer["images"][0]), cli(tmp_path, "cli", *argv))
    if request_.get("enable_hr"):
        assert info["denoising_strength"] == request_["denoising_strength"] and info["steps"] == request_["steps"]
    if "cfg_scale" in request_:                                      # A1111's s is our w = s - 1
        assert info["cfg_scale"] == request_["cfg_scale"] and f"CFG scale: {request_['cfg_scale']:g}," in \
            info["infotexts"][0]


def test_batch_images_are_the_single_draws_of_seed_plus_i(url, tmp_path):
    answer, info = draw(url, steps=3, seed=11, batch_size=2, n_iter=2, sampler_name="Euler a")   # ancestral: own
    assert info["all_seeds"] == [11, 12, 13, 14] and len(answer["images"]) == 4                  # noise too
    for i, image in enumerate(answer["images"]):
        np.testing.assert_array_equal(pixels(image), cli(tmp_path, f"s{i}", "--steps", "3", "--seed", str(11 + i),
                                                         "--sampler", "euler_a"))
        assert f"Seed: {11 + i}," in info["infotexts"][i]


def test_send_images_false_and_unused_fields(url):
    answer, info = draw(url, steps=1, seed=2, send_images=False, styles=[], alwayson_scripts={}, not_a1111_field=1,
                        override_settings={"CLIP_stop_at_last_layers": 1})
    assert answer["images"] == [] and len(info["infotexts"]) == 1 and info["unused_fields"] == ["not_a1111_field"]
    assert answer["parameters"]["steps"] == 1 and answer["parameters"]["sampler_name"] == "DDIM"


def test_random_seed_is_reported_and_redraws(url, tmp_path):
    answer, info = draw(url, steps=2, seed=-1)
    again, info_again = draw(url, steps=2, seed=info["seed"])
    assert info["seed"] >= 0 and info_again["all_seeds"] == [info["seed"]]
    np.testing.assert_array_equal(pixels(answer["images"][0]), pixels(again["images"][0]))


def test_png_replays_with_the_cli(url, tmp_path):
    answer, _ = draw(url, steps=3, seed=21, sampler_name="Heun", cfg_scale=2.5)
    path = tmp_path / "served.png"
    path.write_bytes(base64.b64decode(answer["images"][0]))
    txt2img.main(["--replay", str(path), "--out", str(tmp_path / "replayed.png")])
    np.testing.assert_array_equal(pixels(str(tmp_path / "replayed.png")), pixels(answer["images"][0]))


def test_img2img_equals_the_cli(url, tmp_path):
    image, _ = write_image_and_mask(str(tmp_path), side=64)
    status, answer = call(url, "img2img", {"prompt": "a blue square", "init_images": [b64(image)], "steps": 4,
                                           "seed": 2, "denoising_strength": 0.5})
    assert status == 200, answer
    expected = cli(tmp_path, "i2i", "--image", image, "--strength", "0.5", "--steps", "4", "--seed", "2",
                   prompt="a blue square", module=img2img)
    np.testing.assert_array_equal(pixels(answer["images"][0]), expected)
    # resize_mode 1 (crop and resize) is the CLI's cover-and-crop of a 96x80 picture to --size
    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(wide)
    status, answer = call(url, "img2img", {"prompt": "a blue square", "init_images": ["data:image/png;base64," +
                                                                                     b64(wide)],
                                           "resize_mode": 1, "width": 64, "height": 48, "steps": 4, "seed": 3})
    assert status == 200, answer
    expected = cli(tmp_path, "crop", "--image", str(wide), "--size", "64x48", "--steps", "4", "--seed", "3",
                   prompt="a blue square", module=img2img)
    np.testing.assert_array_equal(pixels(answer["images"][0]), expected)


def test_inpaint_equals_the_cli(url, tmp_path):
    image, mask = write_image_and_mask(str(tmp_path), side=64)
    status, answer = call(url, "img2img", {"prompt": "a red circle", "init_images": [b64(image)], "mask": b64(mask),
                                           "steps": 3, "seed": 6, "cfg_scale": 3, "sampler_name": "Euler",
                                           "mask_blur": 4, "inpainting_fill": 0})       # A1111's defaults
    assert status == 200, answer
    expected = cli(tmp_path, "inp", "--image", image, "--mask", mask, "--steps", "3", "--seed", "6", "--guidance",
                   "2", "--sampler", "euler", "--masked-content", "fill", prompt="a red circle", module=inpaint)
    np.testing.assert_array_equal(pixels(answer["images"][0]), expected)


@pytest.mark.parametrize("fill, content", [(0, "fill"), (1, "original")])
def test_inpaint_at_a_strength_equals_the_cli(url, tmp_path, fill, content):
    image, mask = write_image_and_mask(str(tmp_path), side=64)
    status, answer = call(url, "img2img", {"prompt": "a red circle", "init_images": [b64(image)], "mask": b64(mask),
                                           "steps": 8, "seed": 6, "cfg_scale": 3, "sampler_name": "DDIM",
                                           "denoising_strength": 0.75, "inpainting_fill": fill})
    assert status == 200, answer
    expected = cli(tmp_path, "inp", "--image", image, "--mask", mask, "--steps", "8", "--seed", "6", "--guidance",
                   "2", "--sampler", "ddim", "--strength", "0.75", "--masked-content", content,
                   prompt="a red circle", module=inpaint)
    np.testing.assert_array_equal(pixels(answer["images"][0]), expected)
    assert json.loads(answer["info"])["denoising_strength"] == 0.75


def tiny_png(mode="RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, (64, 64), 255).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


BAD = [("txt2img", {"prompt": "a", "sampler_name": "Euler b"}, "sampler_name"),
       ("txt2img", {"prompt": "a", "steps": 0}, "steps"),
       ("txt2img", {"prompt": "a", "steps": "4"}, "steps"),
       ("txt2img", {"prompt": "a", "subseed_strength": 2}, "subseed_strength"),
       ("txt2img", {"prompt": "a", "width": 60}, "width/height"),
       ("txt2img", {"prompt": "a", "restore_faces": True}, "restore_faces"),
       ("txt2img", {"prompt": "a", "eta": 0.5, "sampler_name": "Euler"}, "eta"),
       ("txt2img", {"prompt": "a", "override_settings": {"CLIP_stop_at_last_layers": 2}}, "CLIP_stop_at_last_layers"),
       ("txt2img", b"{not json", "body"),
       ("txt2img", b"NaN", "body"),
       ("img2img", {"prompt": "a", "init_images": ["not base64!"]}, "init_images[0]"),
       ("img2img", {"prompt": "a", "init_images": [base64.b64encode(b"not an image").decode()]}, "init_images[0]"),
       ("img2img", {"prompt": "a", "init_images": [], "denoising_strength": 0.5}, "init_images"),
       ("img2img", {"prompt": "a", "init_images": [tiny_png()], "mask": tiny_png("L"), "inpainting_fill": 3},
        "inpainting_fill"),
       ("img2img", {"prompt": "a", "init_images": [tiny_png()], "resize_mode": 2}, "resize_mode"),
       ("img2img", {"prompt": "a", "init_images": [tiny_png()], "mask": tiny_png("L"), "denoising_strength": 0.75,
         "inpainting_fill": 2}, "inpainting_fill"),
       ("img2img", {"prompt": "a", "init_images": [tiny_png()], "mask": tiny_png("L"), "denoising_strength": 0},
        "denoising_strength"),
       ("img2img", {"prompt": "a", "init_images": [tiny_png()], "mask": tiny_png("L"), "inpaint_full_res": True},
        "inpaint_full_res"),
       ("png-info", {"image": "%%%"}, "image")]


@pytest.mark.parametrize("path, body, named", BAD, ids=[f"{i}-{named}" for i, (_, _, named) in enumerate(BAD)])
def test_bad_requests_are_422_and_the_server_stays_up(url, path, body, named):
    status, answer = call(url, path, raw=body) if isinstance(body, bytes) else call(url, path, body)
    assert status == 422 and answer["error"] and answer["detail"].startswith(named), answer
    answer, _ = draw(url, steps=1, seed=0)
    assert len(answer["images"]) == 1


def test_unknown_route_is_404(url):
    assert call(url, "no-such-route")[0] == 404
    assert call(url, "txt2img-please", {"prompt": "a"})[0] == 404
    assert len(draw(url, steps=1, seed=0)[0]["images"]) == 1


def test_samplers_list_a1111_names_and_ours(url):
    status, samplers = call(url, "samplers")
    assert status == 200
    assert [s["aliases"] for s in samplers] == [[name] for name in CLI_SAMPLERS]
    assert [s["name"] for s in samplers] == [SAMPLER_NAMES.get(name, name) for name in CLI_SAMPLERS]
    labels = {s["label"] for s in call(url, "schedulers")[1]}
    assert {"Automatic", "Karras", "Exponential", "Beta", "Align Your Steps", "KL Optimal"} <= labels


def test_png_info_reads_the_cli_png(url, tmp_path):
    out = tmp_path / "cli.png"
    txt2img.main(["a red circle", "--model", DEFAULT_MODEL, "--steps", "4", "--seed", "3", "--negative", "blue",
                  "--teacher", "--out", str(out)])
    status, answer = call(url, "png-info", {"image": b64(out)})
    with Image.open(out) as im:
        assert status == 200 and answer["info"] == im.text["parameters"] and answer["items"]["ldm"] == im.text["ldm"]
    assert answer["parameters"]["Prompt"] == "a red circle" and answer["parameters"]["Negative prompt"] == "blue"
    assert answer["parameters"]["Seed"] == "3" and answer["parameters"]["Steps"] == "4"


def test_parse_infotext_quoted_values():
    text = 'a "b", c\nNegative prompt: d\nSteps: 2, Sampler: Euler a, PAG layers: "mid,down.1", Size: 64x32'
    assert parse_infotext(text) == {"Prompt": 'a "b", c', "Negative prompt": "d", "Steps": "2", "Sampler": "Euler a",
                                    "PAG layers": "mid,down.1", "Size": "64x32", "Size-1": "64", "Size-2": "32"}


def test_options_and_models(url):
    status, options = call(url, "options")
    assert status == 200 and options["sd_model_checkpoint"] == "shapes64"
    assert call(url, "options", {"CLIP_stop_at_last_layers": 1})[0] == 200        # the default: no CLIP needed
    status, answer = call(url, "options", {"sd_model_checkpoint": "other.safetensors"})
    assert status == 422 and "sd_model_checkpoint" in answer["detail"]
    assert call(url, "sd-models")[1][0]["title"] == "shapes64"
    assert call(url, "latent-upscale-modes")[1] == [{"name": "Latent"}] and call(url, "sd-vae")[1] == []


def test_progress_and_interrupt(url):
    result = {}
    job = threading.Thread(target=lambda: result.update(answer=draw(url, steps=2000, seed=0, sampler_name="Euler")))
    job.start()
    for _ in range(2000):
        progress = call(url, "progress")[1]
        if progress["progress"] > 0:
            break
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 2000
    assert call(url, "interrupt", {})[0] == 200
    job.join(timeout=60)
    answer, info = result["answer"]
    assert info["interrupted"] and answer["images"] == []
