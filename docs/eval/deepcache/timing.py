"""Wall time of the shipped teacher's sampling (generate: sampling and decoding) for 100 held-out prompts, dpmpp_2m,
32 steps, w = 2, with and without --deepcache; each setting run `REPEATS` times in turn, the median kept. A shared
CPU: compare the ratios, which the FLOP fractions of results.jsonl bound.

    OMP_NUM_THREADS=1 python docs/eval/deepcache/timing.py > docs/eval/deepcache/timing.json
"""
import json
import statistics
import time

from ldm.eval.metrics import heldout_prompts
from ldm.pipeline import TextToImage

REPEATS = 3
SETTINGS = [None, (2, 0), (3, 0), (5, 0), (3, 2), (5, 3)]
prompts = heldout_prompts(100, seed=0)
pipe = TextToImage.from_folder("ldm/assets/shapes64")
seconds = {s: [] for s in SETTINGS}
for _ in range(REPEATS):
    for setting in SETTINGS:
        pipe.set_deepcache(*(setting or (None,)))
        start = time.perf_counter()
        pipe.generate(prompts, steps=32, seed=0, teacher=True, sampler="dpmpp_2m")
        seconds[setting].append(time.perf_counter() - start)
off = statistics.median(seconds[None])
print(json.dumps([{"deepcache": "off" if s is None else "{}:{}".format(*s), "seconds": t,
                   "median_per_image": statistics.median(t) / len(prompts),
                   "speedup": off / statistics.median(t)} for s, t in seconds.items()], indent=1))
