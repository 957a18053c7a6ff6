"""ldm.txt2img with --sampler restart on a tiny random model: it draws, counts its net calls (restarts included),
writes and replays its --restart, and a bad --restart is a usage error."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import txt2img
from ldm.cli import CLI_SAMPLERS, SAMPLER_NAMES

from tests.tiny_models import random_model_with_student


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread_module):
    return random_model_with_student(tmp_path_factory.mktemp("model"), resolution=32, w_features=16,
                                     dtype=torch.float16)


def test_draws_and_counts_restarts(model, tmp_path, capsys):
    assert "restart" in CLI_SAMPLERS and SAMPLER_NAMES["restart"] == "Restart"
    base = ["a red circle", "--model", model, "--steps", "3", "--teacher", "--sampler", "restart", "--guidance", "1"]
    txt2img.main(base + ["--out", str(tmp_path / "a.png")])
    # below 20 steps the default restarts nothing: Heun's 2 calls a step but the last, 2 a call with CFG
    assert f"teacher, 3 steps, restart (karras), w=1, NFE {(2 * 3 - 1) * 2}," in capsys.readouterr().out
    txt2img.main(base + ["--restart", "0.5:10:2:2", "--out", str(tmp_path / "b.png")])
    assert f"NFE {(2 * 3 - 1 + 2 * 2 * 2) * 2}," in capsys.readouterr().out          # + 2KN
    with Image.open(tmp_path / "b.png") as im:
        assert "Sampler: Restart Karras," in im.text["parameters"]             # karras: its default grid, as heun's
        assert json.loads(im.text["ldm"])["restart"] == "0.5:10.0:2:2"
        assert np.asarray(im).std() > 0
    txt2img.main(["--replay", str(tmp_path / "b.png"), "--out", str(tmp_path / "c.png")])
    txt2img.main(["--replay", str(tmp_path / "b.png"), "--restart", "0.5:10:1:2", "--out", str(tmp_path / "d.png")])
    a, b, c, d = (np.asarray(Image.open(tmp_path / f"{k}.png")) for k in "abcd")
    assert np.array_equal(b, c) and not np.array_equal(b, d) and not np.array_equal(a, b)


@pytest.mark.parametrize("flags, message", [
    (["--sampler", "restart", "--restart", "0.1:2:2"], "S_MIN:S_MAX:K:N"),
    (["--sampler", "restart", "--restart", "2:0.1:2:10"], "S_MIN:S_MAX:K:N"),
    (["--sampler", "restart", "--restart", "0.1:2:x:10"], "S_MIN:S_MAX:K:N"),
    (["--sampler", "heun", "--restart", "0.1:2:2:10"], "--sampler heun takes none"),
])
def test_bad_restart_is_a_usage_error(model, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        txt2img.main(["a red circle", "--model", model, "--steps", "3", "--teacher", *flags,
                      "--out", str(tmp_path / "x.png")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
