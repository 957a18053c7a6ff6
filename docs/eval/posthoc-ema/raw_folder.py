"""A run's raw (un-averaged) weights at a checkpoint as a model folder, for comparison with its EMAs.

    python docs/eval/posthoc-ema/raw_folder.py RUN/checkpoint-000600 OUT [TEMPLATE (default RUN/model)]
"""
import sys
from pathlib import Path

from safetensors.torch import load_file

from ldm.training.posthoc_ema import write_model_folder

checkpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
template = Path(sys.argv[3]) if len(sys.argv) > 3 else checkpoint.parent / "model"
state = load_file(str(checkpoint / "model.safetensors"))    # "unet.*", "text_encoder.*": every weight, fp32
write_model_folder(state, template, out, {"raw": str(checkpoint)})
print(f"raw weights of {checkpoint}: {out}")
