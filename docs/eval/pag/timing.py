"""Per-image sampling time of perturbed-attention guidance against plain CFG on the shipped teacher, interleaved
prompt by prompt so that a busy machine slows every setting alike (1 thread, 64 DDIM steps, batch 1, text encoding,
sampling and decoding). python docs/eval/pag/timing.py [N_PROMPTS] -> docs/eval/pag/timing.json"""
import json
import statistics
import sys
import time

import torch

from ldm.eval.metrics import heldout_prompts
from ldm.pipeline import TextToImage

SETTINGS = {  # name -> TextToImage.generate keywords
    "cfg-w2": dict(guidance=2.0),
    "pag-w2-s3-up1": dict(guidance=2.0, pag_scale=3.0, pag_layers=["up.1"]),
    "pag-w0-s3-up1": dict(guidance=0.0, pag_scale=3.0, pag_layers=["up.1"]),
    "cfg-w0": dict(guidance=0.0),
}

if __name__ == "__main__":
    torch.set_num_threads(1)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    pipe = TextToImage.from_folder(decoder_precision="fp32")
    prompts = heldout_prompts(n, 0)
    times = {name: [] for name in SETTINGS}
    nfe = {}
    for name, options in SETTINGS.items():                 # warm-up, untimed
        pipe.generate(prompts[:1], steps=2, teacher=True, **options)
    for prompt in prompts:
        for name, options in SETTINGS.items():
            start = time.perf_counter()
            _, info = pipe.generate([prompt], steps=64, teacher=True, **options)
            times[name].append(time.perf_counter() - start)
            nfe[name] = info["nfe"]
    base = statistics.median(times["cfg-w2"])
    result = {name: {"nfe": nfe[name], "median_s": statistics.median(t), "vs_cfg_w2": statistics.median(t) / base}
              for name, t in times.items()}
    result["setup"] = {"prompts": n, "steps": 64, "threads": 1, "batch": 1, "torch": torch.__version__}
    with open("docs/eval/pag/timing.json", "w") as f:
        json.dump(result, f, indent=2)
    for name, r in result.items():
        print(name, r)
