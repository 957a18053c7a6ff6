"""How much perturbed-attention guidance at s = 3 moves the shipped teacher's latents, by the layers it perturbs:
mean |z_pag - z_cfg| over the first 16 held-out prompts (16 DDIM steps, w = 2, same noise), beside mean |z_cfg|.
python docs/eval/pag/layer_effect.py"""
import torch

from ldm.eval.metrics import heldout_prompts
from ldm.pipeline import TextToImage

if __name__ == "__main__":
    torch.set_num_threads(2)
    pipe = TextToImage.from_folder(decoder_precision="fp32")
    prompts = heldout_prompts(16, 0)
    base, _ = pipe.sample(prompts, steps=16, teacher=True)
    for layers in (["mid"], ["down.2"], ["down.1"], ["up.0"], ["up.1"], ["mid", "down.2", "up.0"]):
        z, _ = pipe.sample(prompts, steps=16, teacher=True, pag_scale=3.0, pag_layers=layers)
        print(",".join(layers), f"{float((z - base).abs().mean()):.4f}", f"(mean |z_cfg| {float(base.abs().mean()):.4f})")
