"""python -m ldm.models.to_diffusers: our model folder back to a diffusers pipeline that draws what we draw.

Import the tiny random SD pipeline (sd_layouts), export it again, and load the export with diffusers'
own StableDiffusionPipeline.from_pretrained: the weights come back under the original names, and its
default call draws our images from the same noise."""
import json

import pytest
import torch
from safetensors.torch import load_file

from sd_layouts import PROMPTS, write_sd_pipeline

from ldm.diffusion.samplers import initial_noise
from ldm.models.from_diffusers import convert
from ldm.models.to_diffusers import export, main
from ldm.pipeline import TextToImage, save_random_model

diffusers = pytest.importorskip("diffusers")


def _their_images(pipeline_dir, noise, steps, w):
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(pipeline_dir))
    theirs.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return theirs(PROMPTS, num_inference_steps=steps, guidance_scale=1 + w, latents=noise, output_type="pt").images


@pytest.mark.parametrize("prediction_type,zero_snr", [("epsilon", False), ("v_prediction", False),
                                                      ("v_prediction", True)])
def test_export_loads_in_diffusers_and_draws_our_images(tmp_path, one_thread, prediction_type, zero_snr):
    write_sd_pipeline(tmp_path, prediction_type, rescale_betas_zero_snr=zero_snr)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    export(str(tmp_path / "model"), str(tmp_path / "back"))
    for part in ("unet", "vae"):                                # the original names and tensors, all of them
        a = load_file(str(tmp_path / "sd" / part / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(tmp_path / "back" / part / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    scheduler = json.loads((tmp_path / "back" / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["prediction_type"], scheduler["timestep_spacing"], scheduler["rescale_betas_zero_snr"]) == \
        (prediction_type, "trailing", zero_snr)

    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    steps, w = 4, 3.0          # n divides T = 1000: diffusers' DDIM then steps on its own grid (schedules.py)
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(steps), pipe.latent_shape(len(PROMPTS)),
                          generator=torch.Generator().manual_seed(0))
    ours, _ = pipe.generate(PROMPTS, steps=steps, guidance=w, seed=0)
    torch.testing.assert_close(_their_images(tmp_path / "back", noise, steps, w), ours * 0.5 + 0.5, atol=2e-4, rtol=0)


def test_penultimate_layer_exports_as_sd2_does(tmp_path, one_thread):
    """A U-Net conditioned on CLIP's penultimate layer (SD 2.x): exported with that layer last, as SD 2.x ships."""
    write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    config = tmp_path / "model" / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "layer": "penultimate"}))
    export(str(tmp_path / "model"), str(tmp_path / "back"), dtype="float32")
    layers = json.loads((tmp_path / "back" / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    assert layers == json.loads((tmp_path / "sd" / "text_encoder" / "config.json").read_text())["num_hidden_layers"] - 1
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(2), pipe.latent_shape(len(PROMPTS)),
                          generator=torch.Generator().manual_seed(0))
    ours, _ = pipe.generate(PROMPTS, steps=2, guidance=2.0, seed=0)
    torch.testing.assert_close(_their_images(tmp_path / "back", noise, 2, 2.0), ours * 0.5 + 0.5, atol=2e-4, rtol=0)


def test_what_diffusers_cannot_run_is_refused(tmp_path, capsys):
    save_random_model(str(tmp_path / "ours"))                  # shapes-style: continuous schedule, scratch text
    with pytest.raises(ValueError, match="has no diffusers scheduler"):
        export(str(tmp_path / "ours"), str(tmp_path / "out"))
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    (tmp_path / "ours" / "model_index.json").write_text(json.dumps(   # our own rectified-flow training: no SD3
        {**index, "schedule": {"name": "rectified_flow", "shift": 1.0}, "prediction": "flow"}))
    with pytest.raises(ValueError, match="rectified flow exports with SD3's transformer, an MMDiT, alone"):
        export(str(tmp_path / "ours"), str(tmp_path / "out"))
    (tmp_path / "ours" / "model_index.json").write_text(json.dumps(
        {**index, "schedule": {"name": "scaled_linear", "T": 1000, "beta_start": 0.00085, "beta_end": 0.012},
         "time_scale": 1.0}))
    with pytest.raises(ValueError, match="position features|runs a transformers CLIPTextModel"):
        export(str(tmp_path / "ours"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert "model_index.json is missing" in capsys.readouterr().err
