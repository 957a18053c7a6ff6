"""Stable Diffusion 3 (Esser et al. 2024) imported from a tiny random diffusers pipeline: our model folder draws
what diffusers' StableDiffusion3Pipeline draws from the same noise on the same flow-matching grid."""
import json

import diffusers
import numpy as np
import pytest
import torch

from ldm.models.from_diffusers import convert
from ldm.pipeline import TextToImage
from sd_layouts import write_sd3_pipeline

PROMPTS = ["a red cube on a blue floor", "a cat"]


def their_images(theirs, pipe, prompts, steps: int, guidance_scale: float, seed: int = 0, **call):
    """diffusers' images on our trailing grid (it shifts the sigmas it is given itself) from our starting noise."""
    from ldm.diffusion.samplers import initial_noise
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(steps), pipe.latent_shape(len(prompts)),
                          generator=torch.Generator().manual_seed(seed))
    side = pipe.index.resolution
    with torch.no_grad():
        return theirs(prompts, num_inference_steps=steps, sigmas=list(1 - np.arange(steps) / steps),
                      guidance_scale=guidance_scale, latents=noise, height=side, width=side, output_type="pt",
                      **call).images


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3")
    return write_sd3_pipeline(folder), folder


def test_sd3_pipeline_draws_what_diffusers_draws(sd3, tmp_path, one_thread):
    """Converted (sharded transformer, T5, shift 3): Euler = DDIM on the flow path draws diffusers' images, with
    CFG (w = 3 is their scale 4) and a negative prompt; the folder records rectified flow, shift 3, flow."""
    theirs, folder = sd3
    index = convert(str(folder / "sd3"), str(tmp_path / "model"), guidance=3.0)
    assert index.schedule == {"name": "rectified_flow", "shift": 3.0} and index.prediction == "flow"
    assert json.loads((tmp_path / "model" / "unet" / "config.json").read_text())["kind"] == "mmdit"
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    for sampler in ("ddim", "euler"):
        images, info = pipe.generate(PROMPTS, steps=4, seed=0, sampler=sampler, negative="blurry")
        assert info["nfe"] == 8
        reference = their_images(theirs, pipe, PROMPTS, 4, 4.0, negative_prompt="blurry")
        torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=2e-4, rtol=0)
    plain, _ = pipe.generate(PROMPTS, steps=4, seed=0, guidance=0.0)
    assert ((plain * 0.5 + 0.5) - reference).abs().max() > 0.05            # guidance mattered


def test_sd3_without_t5_and_a_grid_shift(tmp_path, one_thread):
    """No T5 (SD3 runs on zeros in its place) and another shift: still diffusers' images; --shift at sampling
    time equals a folder written with that shift."""
    theirs = write_sd3_pipeline(tmp_path, t5=False, shift=1.0)
    convert(str(tmp_path / "sd3"), str(tmp_path / "model"), guidance=2.0)
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    images, _ = pipe.generate(PROMPTS, steps=3, seed=1)
    torch.testing.assert_close(images * 0.5 + 0.5, their_images(theirs, pipe, PROMPTS, 3, 3.0, seed=1), atol=2e-4, rtol=0)
    theirs.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=2.5)
    shifted, _ = pipe.generate(PROMPTS, steps=3, seed=1, shift=2.5, teacher=True)
    torch.testing.assert_close(shifted * 0.5 + 0.5, their_images(theirs, pipe, PROMPTS, 3, 3.0, seed=1),
                               atol=2e-4, rtol=0)


def test_sd3_refusals_name_what_is_missing(sd3, tmp_path):
    theirs, folder = sd3
    convert(str(folder / "sd3"), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"))
    for call, message in ((lambda: pipe.set_freeu((1.1, 1.2, 0.9, 0.2)), "FreeU works on U-Nets"),
                          (lambda: pipe.add_lora("x.safetensors"), "LoRA works on U-Nets"),
                          (lambda: pipe.add_embedding("x.pt"), "not read for SD3")):
        with pytest.raises(ValueError, match=message):
            call()
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(folder / "sd3", broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        convert(str(broken), str(tmp_path / "other"))
