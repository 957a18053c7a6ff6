"""--subseed / --subseed-strength (the A1111 web UI's variation seed and strength) and --spacing ays / kl_optimal
through the CLIs on a tiny random model: the ends of the strength range draw the seed's and the subseed's images,
grids follow A1111's seed rule, the PNG's settings (ours and A1111's text) replay, bad flags are usage errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import img2img, txt2img

from tests.tiny_models import random_flow_model, random_model_with_student

RES = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread_module):
    return random_model_with_student(tmp_path_factory.mktemp("model"), resolution=RES, w_features=16,
                                     dtype=torch.float16)


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.int16)


@pytest.mark.parametrize("draw", [["--steps", "2"], ["--teacher", "--steps", "3", "--sampler", "dpmpp_2m"]],
                         ids=["student", "teacher"])
def test_strength_zero_draws_the_seed_and_one_the_subseed(model, tmp_path, draw):
    def image(name, *flags):
        txt2img.main(["a red circle", "--model", model, *draw, *flags, "--out", str(tmp_path / f"{name}.png")])
        return pixels(tmp_path / f"{name}.png")

    seed3, seed5 = image("s3", "--seed", "3"), image("s5", "--seed", "5")
    assert not np.array_equal(seed3, seed5)
    assert np.array_equal(image("x0", "--seed", "3", "--subseed", "5", "--subseed-strength", "0"), seed3)
    assert np.array_equal(image("x1", "--seed", "3", "--subseed", "5", "--subseed-strength", "1"), seed5)
    between = image("x3", "--seed", "3", "--subseed", "5", "--subseed-strength", "0.3")
    assert not np.array_equal(between, seed3) and not np.array_equal(between, seed5)


def test_a_grid_varies_one_seed_over_subseeds(model, tmp_path):
    """A1111's rule: with variation every image of --n K takes --seed, image i the subseed S+i; at strength 1 the
    grid is then --seed S's grid (images S, S+1), at strength 0 --seed's own grid (seeds SEED+i)."""
    def grid(name, *flags):
        txt2img.main(["a red circle", "--model", model, "--steps", "2", "--n", "2", *flags,
                      "--out", str(tmp_path / f"{name}.png")])
        return pixels(tmp_path / f"{name}.png")

    vary = ["--seed", "3", "--subseed", "5", "--subseed-strength"]
    assert np.array_equal(grid("v1", *vary, "1"), grid("s5", "--seed", "5"))
    assert np.array_equal(grid("v0", *vary, "0"), grid("s3", "--seed", "3"))


def test_png_records_the_variation_and_replays_it(model, tmp_path, capsys):
    out = tmp_path / "a.png"
    txt2img.main(["a red circle", "--model", model, "--steps", "2", "--seed", "3", "--subseed", "5",
                  "--subseed-strength", "0.3", "--n", "2", "--out", str(out)])
    assert "seed 3, variation seeds 5-6" in capsys.readouterr().out
    with Image.open(out) as im:
        text = dict(im.text)
    assert text["parameters"].endswith(f"Seed: 3, Size: {RES}x{RES}, Model: {model.rstrip('/').split('/')[-1]}, "
                                       "Variation seed: 5, Variation seed strength: 0.3")
    run = json.loads(text["ldm"])
    assert (run["subseed"], run["subseed_strength"]) == (5, 0.3)
    txt2img.main(["--replay", str(out), "--out", str(tmp_path / "b.png")])
    assert np.array_equal(pixels(tmp_path / "b.png"), pixels(out))
    txt2img.main(["--replay", str(out), "--subseed-strength", "0", "--out", str(tmp_path / "c.png")])
    txt2img.main(["a red circle", "--model", model, "--steps", "2", "--seed", "3", "--n", "2",
                  "--out", str(tmp_path / "d.png")])
    assert np.array_equal(pixels(tmp_path / "c.png"), pixels(tmp_path / "d.png"))
    with Image.open(tmp_path / "d.png") as im:                    # no variation: nothing of it written
        assert "Variation" not in im.text["parameters"] and "subseed" not in json.loads(im.text["ldm"])


def test_img2img_takes_the_variation_noise(model, tmp_path):
    Image.fromarray(np.full((RES, RES, 3), 90, np.uint8)).save(tmp_path / "in.png")

    def edit(name, *flags):
        img2img.main(["a blue square", "--image", str(tmp_path / "in.png"), "--strength", "0.5", "--steps", "2",
                      "--model", model, *flags, "--out", str(tmp_path / f"{name}.png")])
        return pixels(tmp_path / f"{name}.png")

    assert np.array_equal(edit("v", "--seed", "3", "--subseed", "5", "--subseed-strength", "1"),
                          edit("s5", "--seed", "5"))
    edit("w", "--seed", "3", "--subseed", "5", "--subseed-strength", "0.5")
    img2img.main(["--replay", str(tmp_path / "w.png"), "--out", str(tmp_path / "w2.png")])
    assert np.array_equal(pixels(tmp_path / "w2.png"), pixels(tmp_path / "w.png"))


@pytest.mark.parametrize("flags, message", [
    (["--subseed", "5", "--subseed-strength", "1.5"], "--subseed-strength must be in [0, 1], got 1.5"),
    (["--subseed", "5", "--subseed-strength", "-0.1"], "--subseed-strength must be in [0, 1], got -0.1"),
    (["--subseed-strength", "0.3"], "go together"),
    (["--subseed", "5"], "(give --subseed-strength)"),
])
def test_bad_variation_flags_are_usage_errors(model, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        txt2img.main(["a red circle", "--model", model, "--steps", "2", *flags, "--out", str(tmp_path / "x.png")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("sampler, spacing, name", [("dpmpp_2m", "ays", "DPM++ 2M Align Your Steps"),
                                                     ("euler", "kl_optimal", "Euler KL Optimal")])
def test_new_spacings_carry_a1111s_schedule_names(model, tmp_path, sampler, spacing, name):
    """A1111 reads "Sampler: <sampler> <schedule type label>" (sd_samplers.get_sampler_and_scheduler)."""
    txt2img.main(["a red circle", "--model", model, "--teacher", "--steps", "3", "--sampler", sampler,
                  "--spacing", spacing, "--out", str(tmp_path / "a.png")])
    with Image.open(tmp_path / "a.png") as im:
        assert f"Sampler: {name}, " in im.text["parameters"]
        assert json.loads(im.text["ldm"])["spacing"] == spacing
    txt2img.main(["--replay", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png")])
    assert np.array_equal(pixels(tmp_path / "b.png"), pixels(tmp_path / "a.png"))


def test_ays_on_rectified_flow_is_a_usage_error(tmp_path, capsys):
    folder = random_flow_model(tmp_path / "flow")
    run = ["a red circle", "--model", folder, "--teacher", "--steps", "3", "--out", str(tmp_path / "a.png")]
    with pytest.raises(SystemExit) as exit_:
        txt2img.main([*run, "--spacing", "ays"])
    assert exit_.value.code == 2 and "--spacing: the ays spacing holds Align Your Steps'" in capsys.readouterr().err
    txt2img.main([*run, "--spacing", "kl_optimal"])
    assert np.isfinite(pixels(tmp_path / "a.png")).all()


@pytest.mark.parametrize("cli", ["txt2img", "img2img", "inpaint"])
def test_new_flags_help_names_only_flags_the_cli_has(cli):
    """--subseed, --subseed-strength, --deepcache and --spacing help, shared by the three CLIs, refers to no flag the
    CLI lacks (img2img and inpaint have no --n)."""
    import importlib
    import re
    parser = importlib.import_module(f"ldm.{cli}").build_parser()
    flags = {s for action in parser._actions for s in action.option_strings}
    for action in parser._actions:
        if {"--subseed", "--subseed-strength", "--deepcache", "--spacing"} & set(action.option_strings):
            named = set(re.findall(r"--[a-z][a-z-]*", action.help))
            assert named <= flags, f"{cli} {action.option_strings[0]}: {sorted(named - flags)}"
