"""DeepCache (--deepcache N[:BRANCH]) on the shipped shapes64 teacher, against the full U-Net at the same steps.

    OMP_NUM_THREADS=1 python docs/eval/deepcache/run_eval.py [N_PROMPTS] > docs/eval/deepcache/results.jsonl

The teacher at w = 2 (the model's), N_PROMPTS (default 200) held-out prompts, seeds 0, 100, ... per batch of 100
(as docs/eval/samplers-kdiff/equal_nfe.py); each run judged by the oracle (prompt accuracy) and FD in its features
against N_PROMPTS held-out real images, paired with the full U-Net at the same sampler and steps (ldm.eval.compare;
the plain runs at fewer steps: with the full one at that sampler's DeepCache steps),
plus the mean absolute pixel difference (0-255) to those images and the fraction of images within 4 of them
(a changed background colour moves a whole image by ~100). "skipped" is the fraction of the U-Net's FLOPs
(torch's counter: convolutions and matmuls) a run leaves out, counted on its real inputs: load-independent.
"seconds_per_image" is generate's wall time (sampling and decoding) over the images: noisy on a shared CPU.
Plain runs at fewer steps ("equal cost") show what the same FLOPs buy without DeepCache.
"""
import json
import sys
import time

import torch

from ldm.eval.compare import paired
from ldm.eval.metrics import heldout_prompts
from ldm.eval.oracle import Oracle
from ldm.eval.score import evaluate_images, real_images, to_uint8
from ldm.models.deepcache import skipped_fraction
from ldm.pipeline import TextToImage

n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
# (sampler, steps, deepcache (N, branch) or None)
RUNS = [("dpmpp_2m", 32, None), ("dpmpp_2m", 32, (2, 0)), ("dpmpp_2m", 32, (3, 0)), ("dpmpp_2m", 32, (5, 0)),
        ("dpmpp_2m", 32, (3, 2)), ("dpmpp_2m", 32, (5, 2)), ("dpmpp_2m", 32, (5, 3)),
        ("dpmpp_2m", 13, None), ("dpmpp_2m", 9, None),
        ("ddim", 64, None), ("ddim", 64, (3, 0)), ("ddim", 64, (5, 0)), ("ddim", 26, None)]
prompts = heldout_prompts(n, seed=0)
oracle = Oracle.load()
reals = oracle.features(real_images(n, 0))
pipe = TextToImage.from_folder("ldm/assets/shapes64")

# the U-Net's inputs as CFG gives them: a batch of 2 x min(n, 100), the prompts' and the empty prompt's tokens
cond = pipe.encode_prompts(prompts[:100])
uncond = pipe.encode_prompts([""])
context = torch.cat([cond["context"], uncond["context"].expand_as(cond["context"])])
mask = None if cond.get("context_mask") is None else torch.cat(
    [cond["context_mask"], uncond["context_mask"].expand_as(cond["context_mask"])])
x = torch.randn(len(context), *pipe.latent_shape(1)[1:])
skipped = {b: skipped_fraction(pipe.unet, x, torch.full((len(x),), 500.0), context, b, context_mask=mask)
           for b in range(len(pipe.unet.skip_channels))}
print(json.dumps({"skipped_by_branch": skipped}), flush=True)

full = {}
for sampler, steps, deepcache in RUNS:
    pipe.set_deepcache(*(deepcache or (None,)))
    images, nfe, seconds = [], 0, 0.0
    for i in range(0, n, 100):
        start = time.perf_counter()
        out, info = pipe.generate(prompts[i:i + 100], steps=steps, seed=i, teacher=True, sampler=sampler)
        seconds += time.perf_counter() - start
        images.append(to_uint8(out))
        nfe = info["nfe"]
    images = torch.cat(images)
    r = evaluate_images(oracle, images, prompts, reals)
    row = dict(sampler=sampler, steps=steps, deepcache=None if deepcache is None else "{}:{}".format(*deepcache),
               nfe=nfe, accuracy=r["accuracy"], fd=r["fd"], seconds_per_image=seconds / n)
    if deepcache is None and (sampler, steps) in [(s, k) for s, k, d in RUNS if d is not None]:
        full[sampler, steps] = (r, images)
    interval, branch = deepcache or (1, 0)
    calls = nfe // 2                                          # U-Net calls: CFG counts two evaluations a call
    full_calls = -(-calls // interval)                        # calls 0, N, 2N, ...
    row["skipped"] = (1 - full_calls / calls) * skipped[branch] if deepcache else 0.0
    key = (sampler, steps) if (sampler, steps) in full else next((k for k in full if k[0] == sampler), None)
    if key is not None and (key != (sampler, steps) or deepcache is not None):   # not the full run itself
        ref_result, ref_images = full[key]
        vs = paired(ref_result["correct"], r["correct"])
        per_image = (images.float() - ref_images.float()).abs().mean(dim=(1, 2, 3))
        row["vs_full"] = dict(steps=key[1], diff=vs["diff"], ci95=vs["ci95"], p=vs["p"],
                              pixel_mae=(images.float() - ref_images.float()).abs().mean().item(),
                              close=(per_image < 4).float().mean().item())   # images within MAE 4 of the full's
    row["correct"] = r["correct"]
    print(json.dumps(row), flush=True)
