"""ldm.serve in a thread for the tests, and a client: `serving(argv)` yields the API's base URL, `call` talks JSON."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

from ldm.serve import make_server


@contextlib.contextmanager
def serving(argv: list[str]):
    """`python -m ldm.serve ARGV --port 0` served from a daemon thread; yields http://127.0.0.1:PORT/sdapi/v1/."""
    httpd = make_server([*argv, "--port", "0"])
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/sdapi/v1/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def call(url: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, object]:
    """(status, JSON answer) of GET `path`, or POST of `body` as JSON (or the bytes `raw`)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def pixels(png) -> np.ndarray:
    """A PNG file path or base64 string -> its uint8 pixels."""
    source = png if not isinstance(png, str) or png.endswith(".png") else io.BytesIO(base64.b64decode(png))
    with Image.open(source) as im:
        return np.asarray(im.convert("RGB"))
