"""IP-Adapter (ldm.models.ip_adapter) against diffusers' load_ip_adapter on the tiny SD pipeline: a random
adapter file written with diffusers' own attention numbering, a tiny random CLIP image encoder, the same
image prompt: the same images."""
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from sd_layouts import (PROMPTS, ip_image, on_our_grid, with_ip_adapter, write_image_encoder, write_ip_adapter,
                        write_sd_pipeline)

from ldm.diffusion.samplers import initial_noise
from ldm.models.from_diffusers import convert
from ldm.pipeline import TextToImage

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
BOTH_LEVELS = {"down_block_types": ("CrossAttnDownBlock2D",) * 2, "up_block_types": ("CrossAttnUpBlock2D",) * 2}


def test_image_prompt_draws_what_diffusers_draws(tmp_path, one_thread):
    theirs = write_sd_pipeline(tmp_path, unet_options=BOTH_LEVELS)   # cross-attention at both levels: the order counts
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    encoder = write_image_encoder(tmp_path / "image_encoder")
    adapter = write_ip_adapter(tmp_path / "ip.safetensors", theirs.unet)
    image = ip_image()

    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    plain, _ = pipe.generate(PROMPTS, steps=4, seed=0)
    pipe.add_ip_adapter(str(adapter), str(encoder), scale=0.7)
    ours, info = pipe.generate(PROMPTS, steps=4, seed=0, ip_image=image)
    assert info["nfe"] == 8

    sd = with_ip_adapter(diffusers.StableDiffusionPipeline, theirs, encoder, adapter, 0.7)
    on_our_grid(sd)
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(4), pipe.latent_shape(2),
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = sd(PROMPTS, ip_adapter_image=image, num_inference_steps=4, guidance_scale=1 + pipe.index.guidance,
                       latents=noise, output_type="pt").images
    torch.testing.assert_close(ours * 0.5 + 0.5, reference, atol=2e-4, rtol=0)
    assert (ours - plain).abs().max() > 1e-2                               # the image prompt mattered
    again, _ = pipe.generate(PROMPTS, steps=4, seed=0)                      # no image: the plain U-Net
    torch.testing.assert_close(again, plain)


def test_bad_adapters_are_refused(tmp_path):
    theirs = write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    encoder = write_image_encoder(tmp_path / "image_encoder")
    pipe = TextToImage.from_folder(str(tmp_path / "model"))
    save_file({"image_proj.latents": torch.zeros(1, 4, 8), "ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2)},
              str(tmp_path / "plus.safetensors"))
    with pytest.raises(ValueError, match="IP-Adapter Plus"):
        pipe.add_ip_adapter(str(tmp_path / "plus.safetensors"), str(encoder))
    adapter = write_ip_adapter(tmp_path / "ip.safetensors", theirs.unet)
    from safetensors.torch import load_file
    state = load_file(str(adapter))
    save_file({k: v for k, v in state.items() if not k.startswith("ip_adapter.1.")}, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="cross-attention entries, this U-Net has"):
        pipe.add_ip_adapter(str(tmp_path / "short.safetensors"), str(encoder))
    with pytest.raises(ValueError, match="an image prompt needs an IP-Adapter"):
        pipe.generate(PROMPTS, steps=2, ip_image=Image.new("RGB", (32, 32)))
