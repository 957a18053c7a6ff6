"""Per-image latency of `python -m ldm.serve` (one HTTP txt2img request, base64 PNG back) against the same draw
in-process (TextToImage.generate + the PNG) and against a fresh `python -m ldm.txt2img` process per image (model
load included), on the shipped shapes64 model: 64 px, 4 steps, its 4-step student (DDIM), seeds 0.., one thread.

    OMP_NUM_THREADS=1 .venv/bin/python docs/eval/serve/bench_serve.py > docs/eval/serve/results.jsonl
"""
import base64
import io
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import torch

from ldm.cli import grid_image
from ldm.pipeline import DEFAULT_MODEL, TextToImage
from ldm.serve import make_server

PROMPT, STEPS, N = "a large red circle on the left", 4, 20


def timed(fn, n):
    times = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return times


def row(name, times):
    print(json.dumps({"case": name, "n": len(times), "median_ms": round(1000 * statistics.median(times), 1),
                      "min_ms": round(1000 * min(times), 1), "max_ms": round(1000 * max(times), 1)}), flush=True)


def main():
    torch.set_num_threads(1)
    pipe = TextToImage.from_folder(DEFAULT_MODEL)

    def direct(seed):
        images, _ = pipe.generate([PROMPT], steps=STEPS, seed=[seed])
        grid_image(images).save(io.BytesIO(), format="PNG")

    httpd = make_server(["--model", DEFAULT_MODEL, "--port", "0"])
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/sdapi/v1/txt2img"

    def served(seed, batch=1):
        body = json.dumps({"prompt": PROMPT, "steps": STEPS, "seed": seed, "batch_size": batch}).encode()
        with urllib.request.urlopen(urllib.request.Request(url, data=body)) as answer:
            images = json.loads(answer.read())["images"]
        assert len(images) == batch and base64.b64decode(images[0])[:4] == b"\x89PNG"

    def cli(seed):
        subprocess.run([sys.executable, "-m", "ldm.txt2img", PROMPT, "--steps", str(STEPS), "--seed", str(seed),
                        "--out", "/tmp/bench_serve_cli.png"], check=True, capture_output=True)

    direct(0), served(0)                                     # warm-up
    row("in-process generate + PNG, 1 image", timed(direct, N))
    row("ldm.serve txt2img request, 1 image", timed(served, N))
    row("ldm.serve txt2img request, batch_size 4", timed(lambda s: served(s, 4), N // 4))
    row("python -m ldm.txt2img process, 1 image", timed(cli, 3))
    httpd.shutdown()


if __name__ == "__main__":
    main()
