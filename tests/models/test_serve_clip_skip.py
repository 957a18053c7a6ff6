"""ldm.serve's CLIP_stop_at_last_layers (override_settings and POST /sdapi/v1/options) on a tiny imported SD model
with a CLIP text encoder: a request draws what `python -m ldm.txt2img --clip-skip N` draws, and the next request
without it what the CLI draws without it (the setting does not leak)."""
import base64
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from sd_layouts import PROMPTS, write_sd_pipeline

from ldm import txt2img
from ldm.models.from_diffusers import convert
from ldm.serve import make_server

pytest.importorskip("diffusers")


def post(url, path, body):
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_clip_skip_per_request_and_as_option(tmp_path, one_thread):
    write_sd_pipeline(tmp_path)
    model = str(tmp_path / "model")
    convert(str(tmp_path / "sd"), model)
    httpd = make_server(["--model", model, "--port", "0", "--decoder-precision", "fp32"])
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/sdapi/v1/"

    def served(**request):
        status, answer = post(url, "txt2img", {"prompt": PROMPTS[0], "steps": 3, "seed": 1, **request})
        assert status == 200, answer
        with Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))) as im:
            return np.asarray(im.convert("RGB"))

    def cli(*flags):
        out = str(tmp_path / "cli.png")
        txt2img.main([PROMPTS[0], "--model", model, "--steps", "3", "--seed", "1", "--decoder-precision", "fp32",
                      "--out", out, *flags])
        with Image.open(out) as im:
            return np.asarray(im.convert("RGB"))

    try:
        skip2, plain = cli("--clip-skip", "2"), cli()
        assert np.abs(skip2.astype(int) - plain).max() > 8                    # the setting changes the image
        np.testing.assert_array_equal(served(override_settings={"CLIP_stop_at_last_layers": 2}), skip2)
        np.testing.assert_array_equal(served(), plain)
        np.testing.assert_array_equal(served(override_settings={"CLIP_stop_at_last_layers": 1}), plain)
        assert post(url, "options", {"CLIP_stop_at_last_layers": 2})[0] == 200
        np.testing.assert_array_equal(served(), skip2)
        status, answer = post(url, "txt2img", {"prompt": "a", "override_settings": {"CLIP_stop_at_last_layers": 9}})
        assert status == 422 and answer["detail"].startswith("CLIP_stop_at_last_layers"), answer
        assert post(url, "options", {"CLIP_stop_at_last_layers": 1})[0] == 200
        np.testing.assert_array_equal(served(), plain)
    finally:
        httpd.shutdown()
        httpd.server_close()
