"""ldm.serve's CLIP_stop_at_last_layers (override_settings and POST /sdapi/v1/options) on a tiny imported SD model
with a CLIP text encoder: a request draws what `python -m ldm.txt2img --clip-skip N` draws, and the next request
without it what the CLI draws without it (the setting does not leak)."""
import numpy as np
import pytest

from sd_layouts import PROMPTS, write_sd_pipeline

from ldm import txt2img
from ldm.models.from_diffusers import convert

from tests.serve_client import call, pixels, serving

pytest.importorskip("diffusers")


def test_clip_skip_per_request_and_as_option(tmp_path, one_thread):
    write_sd_pipeline(tmp_path)
    model = str(tmp_path / "model")
    convert(str(tmp_path / "sd"), model)

    def served(**request):
        status, answer = call(url, "txt2img", {"prompt": PROMPTS[0], "steps": 3, "seed": 1, **request})
        assert status == 200, answer
        return pixels(answer["images"][0])

    def cli(*flags):
        out = str(tmp_path / "cli.png")
        txt2img.main([PROMPTS[0], "--model", model, "--steps", "3", "--seed", "1", "--decoder-precision", "fp32",
                      "--out", out, *flags])
        return pixels(out)

    with serving(["--model", model, "--decoder-precision", "fp32"]) as url:
        skip2, plain = cli("--clip-skip", "2"), cli()
        assert np.abs(skip2.astype(int) - plain).max() > 8                    # the setting changes the image
        np.testing.assert_array_equal(served(override_settings={"CLIP_stop_at_last_layers": 2}), skip2)
        np.testing.assert_array_equal(served(), plain)
        np.testing.assert_array_equal(served(override_settings={"CLIP_stop_at_last_layers": 1}), plain)
        assert call(url, "options", {"CLIP_stop_at_last_layers": 2})[0] == 200
        np.testing.assert_array_equal(served(), skip2)
        status, answer = call(url, "txt2img", {"prompt": "a", "override_settings": {"CLIP_stop_at_last_layers": 9}})
        assert status == 422 and answer["detail"].startswith("CLIP_stop_at_last_layers"), answer
        assert call(url, "options", {"CLIP_stop_at_last_layers": 1})[0] == 200
        np.testing.assert_array_equal(served(), plain)
