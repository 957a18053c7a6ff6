"""ldm.txt2img with k-diffusion's samplers (lms, dpm_2, dpm_2_ancestral, dpmpp_2s_ancestral, dpmpp_sde) and deis on
a tiny random model: the net calls counted, the A1111 names in the PNG, a stochastic one drawn again by --replay."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import txt2img
from ldm.cli import CLI_SAMPLERS, SAMPLER_NAMES

from tests.tiny_models import random_model_with_student

NEW = {"lms": "LMS", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a", "dpmpp_2s_ancestral": "DPM++ 2S a",
       "dpmpp_sde": "DPM++ SDE", "deis": "deis"}          # the A1111 web UI has no DEIS: our name


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread_module):
    return random_model_with_student(tmp_path_factory.mktemp("model"), resolution=32, w_features=16,
                                     dtype=torch.float16)


def test_teacher_draws_with_each_and_counts_its_net_calls(model, tmp_path, capsys):
    assert set(NEW) <= set(CLI_SAMPLERS) and all(SAMPLER_NAMES.get(k, k) == v for k, v in NEW.items())
    for sampler, name in NEW.items():
        out = tmp_path / f"{sampler}.png"
        txt2img.main(["a red circle", "--model", model, "--steps", "3", "--teacher", "--sampler", sampler,
                      "--guidance", "1", "--out", str(out)])
        # CFG: 2 calls a net call; the single-step samplers: 2 a step but the last (an Euler step to sigma = 0)
        nfe = 3 * 2 if sampler in ("lms", "deis") else (2 * 3 - 1) * 2
        assert f"teacher, 3 steps, {sampler}, w=1, NFE {nfe}," in capsys.readouterr().out
        with Image.open(out) as im:
            assert f"Steps: 3, Sampler: {name}, CFG scale: 2," in im.text["parameters"]
            assert np.asarray(im).std() > 0


def test_replay_draws_a_stochastic_one_again(model, tmp_path):
    txt2img.main(["a blue square", "--model", model, "--steps", "2", "--teacher", "--sampler", "dpmpp_sde",
                  "--spacing", "karras", "--seed", "3", "--out", str(tmp_path / "a.png")])
    with Image.open(tmp_path / "a.png") as im:
        assert json.loads(im.text["ldm"])["sampler"] == "dpmpp_sde"
        assert "Sampler: DPM++ SDE Karras," in im.text["parameters"]
    txt2img.main(["--replay", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png")])
    txt2img.main(["--replay", str(tmp_path / "a.png"), "--seed", "4", "--out", str(tmp_path / "c.png")])
    a, b, c = (np.asarray(Image.open(tmp_path / f"{k}.png")) for k in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
