"""Session-19 check: `python -m ldm.eval` with the 2-step grid's middle time moved from 0.5 to MID
(docs/stage3-distill.md, "Session 19"); every other grid is left alone.

    MID=0.6 python docs/provenance/grid_eval.py report --model DIR --teacher-steps 8 --ws 2 \
        --student-steps 2 --student-sweep 0 --decoder-precision fp32 --out-dir OUT
"""
import os
import runpy
import sys

from ldm.pipeline import TextToImage

mid = float(os.environ["MID"])
from_folder = TextToImage.from_folder


def patched(*args, **kwargs):
    pipe = from_folder(*args, **kwargs)
    timesteps = pipe.schedule.timesteps

    def grid(n, **options):
        ts = timesteps(n, **options)
        if n == 2:
            ts = ts.clone()
            ts[1] = mid
        return ts
    pipe.schedule.timesteps = grid
    return pipe


TextToImage.from_folder = patched
sys.argv = ["ldm.eval"] + sys.argv[1:]
runpy.run_module("ldm.eval", run_name="__main__")
