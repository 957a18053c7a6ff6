"""python -m ldm.models.from_diffusers: a diffusers Stable Diffusion pipeline folder becomes our model folder,
and our TextToImage on it draws what diffusers' StableDiffusionPipeline draws from the same noise.

The pipeline is a tiny random one written here with diffusers (the SD block types at toy widths, a
2-layer CLIP with the real CLIP BPE vocabulary): nothing is downloaded."""
import json

import pytest
import torch

from sd_layouts import PROMPTS, on_our_grid, write_sd_pipeline

from ldm.bench_models import TINY
from ldm.diffusion.samplers import initial_noise
from ldm.models.from_diffusers import convert, main
from ldm.pipeline import TextToImage, load_index

diffusers = pytest.importorskip("diffusers")

@pytest.mark.parametrize("prediction_type,ours", [("epsilon", "eps"), ("v_prediction", "v")])
def test_imported_pipeline_draws_what_diffusers_draws(tmp_path, one_thread, prediction_type, ours):
    theirs = write_sd_pipeline(tmp_path, prediction_type)
    index = convert(str(tmp_path / "sd"), str(tmp_path / "model"), guidance=3.0)
    assert index == load_index(str(tmp_path / "model"))
    assert (index.prediction, index.schedule["name"], index.time_scale, index.resolution) == (ours, "scaled_linear",
                                                                                            1.0, TINY.image)
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    steps, w = 4, 3.0
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(steps), pipe.latent_shape(len(PROMPTS)),
                          generator=torch.Generator().manual_seed(0))
    images, info = pipe.generate(PROMPTS, steps=steps, seed=0)
    assert info == {"model": "teacher", "steps": 4, "nfe": 8, "guidance": w, "sampler": "ddim", "spacing": "trailing"}
    # diffusers' reference: DDIM with trailing spacing ending at clean data (set_alpha_to_one), as our
    # grid; its guidance_scale g is our 1 + w; output_type="pt" is in [0, 1]
    on_our_grid(theirs)
    with torch.no_grad():
        reference = theirs(PROMPTS, num_inference_steps=steps, guidance_scale=1 + w, latents=noise,
                           output_type="pt").images
    assert reference.std() > 0.05                              # a real image, not a constant
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=2e-4, rtol=0)


def test_zero_terminal_snr_and_guidance_rescale_draw_what_diffusers_draws(tmp_path, one_thread):
    """A v model trained on a zero-terminal-SNR schedule (`rescale_betas_zero_snr`, Lin et al. 2024) keeps it
    on import, and `guidance_rescale` rescales its v as diffusers' pipeline does: same images, same noise."""
    theirs = write_sd_pipeline(tmp_path, "v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                               set_alpha_to_one=True, steps_offset=1)
    index = convert(str(tmp_path / "sd"), str(tmp_path / "model"), guidance=4.0)
    assert index.schedule["zero_snr"] is True and index.prediction == "v"
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    assert pipe.schedule.zero_terminal_snr and float(pipe.schedule.alpha_sigma(999.0)[0]) == 0.0
    steps, w, phi = 4, 4.0, 0.7
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(steps), pipe.latent_shape(len(PROMPTS)),
                          generator=torch.Generator().manual_seed(0))
    theirs.set_progress_bar_config(disable=True)
    plain, _ = pipe.generate(PROMPTS, steps=steps, seed=0)
    for rescale in (0.0, phi):
        ours, info = pipe.generate(PROMPTS, steps=steps, seed=0, guidance_rescale=rescale)
        with torch.no_grad():
            reference = theirs(PROMPTS, num_inference_steps=steps, guidance_scale=1 + w, guidance_rescale=rescale,
                               latents=noise, output_type="pt").images
        assert reference.std() > 0.05 and info["nfe"] == 2 * steps
        torch.testing.assert_close(ours * 0.5 + 0.5, reference, atol=2e-4, rtol=0)
    assert (ours - plain).abs().max() > 2e-3                   # the rescale changed the images (10x the tolerance)


def test_non_square_sizes_draw_what_diffusers_draws(tmp_path, one_thread):
    """size=(width, height): the latents (B, C, h/8, w/8) as diffusers' height/width make them, same images."""
    theirs = write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    width, height = 2 * TINY.image, TINY.image
    shape = pipe.latent_shape(len(PROMPTS), (width, height))
    assert shape[2:] == (height // 2, width // 2)                 # the tiny VAE downsamples by 2
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(3), shape, generator=torch.Generator().manual_seed(0))
    ours, _ = pipe.generate(PROMPTS, steps=3, seed=0, size=(width, height))
    assert ours.shape == (2, 3, height, width)
    on_our_grid(theirs)
    with torch.no_grad():
        reference = theirs(PROMPTS, height=height, width=width, num_inference_steps=3, guidance_scale=1 + pipe.index.guidance,
                           latents=noise, output_type="pt").images
    torch.testing.assert_close(ours * 0.5 + 0.5, reference, atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="each side must be a positive multiple of"):
        pipe.latent_shape(1, (width + 2, height))


def test_sdedit_on_latents_draws_what_diffusers_img2img_draws(tmp_path, one_thread):
    """sample(init=latents, strength) as diffusers' StableDiffusionImg2ImgPipeline given the same latents
    (it takes 4-channel images as latents): the same grid tail, noise and steps; non-square, as the
    second pass of `hires` runs it."""
    theirs = write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    init = torch.randn(2, 4, TINY.image // 2, TINY.image, generator=torch.Generator().manual_seed(3))
    z, info = pipe.sample(PROMPTS, steps=4, seed=0, init=init, strength=0.5)
    assert info["steps"] == 2 and info["nfe"] == 4
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**theirs.components)
    on_our_grid(img2img)
    with torch.no_grad():
        reference = img2img(PROMPTS, image=init, strength=0.5, num_inference_steps=4, guidance_scale=1 + pipe.index.guidance,
                            generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(pipe.decode(z) * 0.5 + 0.5, reference, atol=2e-4, rtol=0)


def test_clip_skip_draws_what_diffusers_draws(tmp_path, one_thread, capsys):
    """--clip-skip 2 (A1111: the penultimate layer, through the final LayerNorm) is diffusers' clip_skip=1."""
    from ldm import txt2img
    import numpy as np
    from PIL import Image
    theirs = write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    txt2img.main([PROMPTS[0], "--model", str(tmp_path / "model"), "--steps", "4", "--clip-skip", "2",
                  "--decoder-precision", "fp32", "--out", str(tmp_path / "skip.png")])
    pipe = TextToImage.from_folder(str(tmp_path / "model"))
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(4), pipe.latent_shape(1),
                          generator=torch.Generator().manual_seed(0))
    on_our_grid(theirs)
    def penultimate(text):   # diffusers' clip_skip=1, by hand (its own path fails on this transformers' CLIPTextModel)
        ids = theirs.tokenizer([text], padding="max_length", max_length=77, return_tensors="pt").input_ids
        out = theirs.text_encoder(ids, output_hidden_states=True)
        final = getattr(theirs.text_encoder, "text_model", theirs.text_encoder).final_layer_norm
        return final(out.hidden_states[-2])

    with torch.no_grad():
        reference = theirs(prompt_embeds=penultimate(PROMPTS[0]), negative_prompt_embeds=penultimate(""),
                           num_inference_steps=4, guidance_scale=1 + pipe.index.guidance,
                           latents=noise, output_type="np").images[0]
        plain = theirs(PROMPTS[0], num_inference_steps=4, guidance_scale=1 + pipe.index.guidance,
                       latents=noise, output_type="np").images[0]
    ours = np.asarray(Image.open(tmp_path / "skip.png"), dtype=np.int16)
    assert np.abs(ours - np.round(reference * 255)).max() <= 1 and np.abs(ours - np.round(plain * 255)).max() > 8
    with pytest.raises(SystemExit):
        txt2img.main([PROMPTS[0], "--model", str(tmp_path / "model"), "--clip-skip", "9"])
    assert "--clip-skip must be in [1, 2]" in capsys.readouterr().err


def test_freeu_draws_what_diffusers_draws(tmp_path, one_thread):
    """--freeu B1,B2,S1,S2 against diffusers' enable_freeu(s1, s2, b1, b2) on the same tiny pipeline: the
    U-Net's output on a non-square input and the CLI's image."""
    from ldm import txt2img
    import numpy as np
    from PIL import Image
    theirs = write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"))
    pipe.set_freeu((1.5, 1.6, 0.9, 0.2))
    theirs.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([10.0, 700.0])
    context = torch.randn(2, 77, TINY.unet["cross_attention_dim"], generator=g)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, context), theirs.unet(x, t, context).sample, atol=1e-5, rtol=1e-5)
        pipe.set_freeu(None)
        assert (pipe.unet(x, t, context) - theirs.unet(x, t, context).sample).abs().max() > 1e-2   # it does something
    txt2img.main([PROMPTS[0], "--model", str(tmp_path / "model"), "--steps", "4", "--freeu", "1.5,1.6,0.9,0.2",
                  "--decoder-precision", "fp32", "--out", str(tmp_path / "freeu.png")])
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(4), pipe.latent_shape(1),
                          generator=torch.Generator().manual_seed(0))
    on_our_grid(theirs)
    with torch.no_grad():
        reference = theirs(PROMPTS[0], num_inference_steps=4, guidance_scale=1 + pipe.index.guidance,
                           latents=noise, output_type="np").images[0]
    ours = np.asarray(Image.open(tmp_path / "freeu.png"), dtype=np.int16)
    assert np.abs(ours - np.round(reference * 255)).max() <= 1


@pytest.mark.parametrize("w", [0.0, 0.5])
def test_lcm_sampler_draws_what_diffusers_lcm_draws(tmp_path, one_thread, w):
    """sampler="lcm" on the lcm grid, as an LCM-LoRA is run: diffusers' pipeline with its LCMScheduler, the same
    latents and the same generator for the sampler's noise (our seed + 1), with and without CFG."""
    theirs = write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    ours, info = pipe.generate(PROMPTS, steps=4, seed=0, guidance=w, sampler="lcm")
    assert info["spacing"] == "lcm" and info["nfe"] == (4 if w == 0 else 8)
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(4, spacing="lcm"), pipe.latent_shape(2),
                          generator=torch.Generator().manual_seed(0))
    theirs.scheduler = diffusers.LCMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    with torch.no_grad():
        reference = theirs(PROMPTS, num_inference_steps=4, guidance_scale=1 + w, latents=noise,
                           generator=torch.Generator().manual_seed(1), output_type="pt").images
    torch.testing.assert_close(ours * 0.5 + 0.5, reference, atol=2e-4, rtol=0)


def test_padding_is_seen_as_sd_was_trained(tmp_path, one_thread):
    """SD's U-Net attends to all 77 tokens, padding included; masking it would change every image."""
    write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    context, mask = pipe.text_encoder(PROMPTS)
    assert context.shape == (2, 77, TINY.clip["hidden_size"]) and bool(mask.all())
    masked = pipe.text_encoder.tokenize(PROMPTS)[1]            # the tokenizer's own mask still marks padding
    assert masked.sum(1).tolist() == [9, 4]


def test_bad_sources_are_named(tmp_path, capsys):
    write_sd_pipeline(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub repo id"):
        convert(str(tmp_path / "nowhere"), str(tmp_path / "model"))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "clip-src"), "--out", str(tmp_path / "model")])
    assert "model_index.json is missing" in capsys.readouterr().err
    scheduler = tmp_path / "sd" / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    scheduler.write_text(json.dumps({**config, "beta_schedule": "squaredcos_cap_v2"}))
    with pytest.raises(ValueError, match="beta_schedule 'squaredcos_cap_v2' is not supported"):
        convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    assert not (tmp_path / "model").exists()
    scheduler.write_text(json.dumps(config))
    main([str(tmp_path / "sd"), "--out", str(tmp_path / "model"), "--dtype", "float16"])
    assert "schedule scaled_linear, prediction eps" in capsys.readouterr().out
    with pytest.raises(SystemExit):                            # never over a model folder
        main([str(tmp_path / "sd"), "--out", str(tmp_path / "model")])
    assert "already holds a model folder" in capsys.readouterr().err


def test_stage_three_distills_an_imported_teacher(tmp_path):
    """The imported folder is a stage-2 model folder like ours: stage 3 takes it as its teacher (discrete
    scaled-linear schedule, eps prediction, frozen CLIP copied along with the folder)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, str(root / "stages" / "distill.py"), "--config",
                          str(root / "configs" / "distill" / "tiny.yaml"), f"teacher={tmp_path / 'model'}",
                          f"train.output_dir={tmp_path / 'run'}", f"model_out={tmp_path / 'distilled'}",
                          "distill.n_start=2", "train.checkpoint_every=0"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "the teacher predicts eps" in run.stderr                 # the stage says what it thinks of eps
    pipe = TextToImage.from_folder(str(tmp_path / "distilled"), decoder_precision="fp32")
    images, info = pipe.generate(["a cat"], steps=1, guidance=2.0)
    assert info["model"] == "student-1" and images.shape == (1, 3, TINY.image, TINY.image)
    assert torch.isfinite(images).all() and bool(pipe.text_encoder(["a cat"])[1].all())


def test_pipeline_passes_no_mask_where_sd_used_none(tmp_path):
    """No context_mask reaches an imported U-Net (diffusers' call, and the attention without a mask);
    our own models keep theirs, and a scratch encoder cannot be told to drop it."""
    from ldm.models.text import TextEncoderConfig
    from ldm.pipeline import save_random_model
    write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    assert set(TextToImage.from_folder(str(tmp_path / "model")).encode_prompts(PROMPTS)) == {"context"}
    save_random_model(str(tmp_path / "ours"))
    assert set(TextToImage.from_folder(str(tmp_path / "ours")).encode_prompts(PROMPTS)) == {"context", "context_mask"}
    with pytest.raises(ValueError, match="scratch encoder always masks"):
        TextEncoderConfig(kind="scratch", mask_padding=False)


def test_variant_weights_are_read(tmp_path, one_thread, capsys):
    """A pipeline saved as the fp16 variant only (diffusion_pytorch_model.fp16.safetensors, model.fp16.safetensors:
    half the download of SDXL's repo): refused without --variant with the variants it has named, read with
    it, and drawing what diffusers draws from the same variant loaded in fp32."""
    theirs = write_sd_pipeline(tmp_path)
    theirs.to(torch.float16).save_pretrained(str(tmp_path / "v"), variant="fp16")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "v"), "--out", str(tmp_path / "model")])
    assert "it has the variants ['fp16'] (pick one: --variant NAME)" in capsys.readouterr().err
    main([str(tmp_path / "v"), "--out", str(tmp_path / "model"), "--variant", "fp16"])
    clip = tmp_path / "model" / "text_encoder" / "clip" / "text_encoder"
    assert sorted(p.name for p in clip.glob("*.safetensors")) == ["model.safetensors"]
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    assert pipe.text_encoder.model.dtype == torch.float32          # run as the U-Net is, whatever the file holds
    images, _ = pipe.generate(PROMPTS, steps=4, seed=0)
    reference_pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "v"), variant="fp16",
                                                                       torch_dtype=torch.float32)
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(4), pipe.latent_shape(len(PROMPTS)),
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = on_our_grid(reference_pipe)(PROMPTS, num_inference_steps=4, guidance_scale=1 + pipe.index.guidance,
                                                latents=noise, output_type="pt").images
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=2e-4, rtol=0)
