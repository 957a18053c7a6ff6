"""python -m ldm.models.from_single_file: an SD 1.x checkpoint file in the CompVis layout becomes our model
folder, and our TextToImage on it draws what diffusers' StableDiffusionPipeline draws from the same weights.

The file is written here from the tiny random diffusers pipeline of test_from_diffusers.py with the
test-side name maps of test_unet.py and test_autoencoder.py (the U-Net one is checked there against
diffusers' own CompVis converter)."""
import re

import pytest
import torch
from safetensors.torch import save_file
from sd_layouts import PROMPTS, unet_to_compvis, vae_key_to_compvis, write_sd_pipeline

from ldm.bench_models import TINY
from ldm.diffusion.samplers import initial_noise
from ldm.models.from_single_file import convert, main
from ldm.pipeline import TextToImage

diffusers = pytest.importorskip("diffusers")


def single_file_state(pipe) -> dict:
    """The pipeline's three models under the CompVis prefixes, as an SD 1.x .ckpt / .safetensors holds them."""
    state = unet_to_compvis(pipe.unet.state_dict(), levels=len(TINY.unet["block_out_channels"]),
                                  n=TINY.unet["layers_per_block"])
    for key, value in pipe.vae.state_dict().items():
        key = vae_key_to_compvis(key, len(TINY.vae["block_out_channels"]))
        state[key] = value[:, :, None, None] if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", key) else value
    for key, value in pipe.text_encoder.state_dict().items():
        state["cond_stage_model.transformer." + key] = value
    # what old files carry besides: the CLIP position ids buffer, EMA copies are not there in -emaonly files
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return {k: v.contiguous().clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(diffusers pipeline, folder with sd.safetensors, sd.ckpt and the three config.json files)."""
    folder = tmp_path_factory.mktemp("single")
    pipe = write_sd_pipeline(folder)
    state = single_file_state(pipe)
    save_file(state, str(folder / "sd.safetensors"))
    torch.save({"state_dict": state, "global_step": 1}, folder / "sd.ckpt")
    return pipe, folder


def configs(folder) -> list[str]:
    sd = folder / "sd"
    return ["--unet-config", str(sd / "unet" / "config.json"), "--vae-config", str(sd / "vae" / "config.json"),
            "--text-config", str(sd / "text_encoder" / "config.json")]


@pytest.mark.parametrize("name", ["sd.safetensors", "sd.ckpt"])
def test_single_file_draws_what_diffusers_draws(sd, tmp_path, one_thread, name, capsys):
    theirs, folder = sd
    main([str(folder / name), "--out", str(tmp_path / "model"), "--guidance", "3", *configs(folder)])
    assert "prediction eps, w = 3" in capsys.readouterr().out
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(4), pipe.latent_shape(len(PROMPTS)),
                          generator=torch.Generator().manual_seed(0))
    images, info = pipe.generate(PROMPTS, steps=4, seed=0)
    assert (info["model"], info["nfe"]) == ("teacher", 8)
    scheduler = diffusers.DDIMScheduler.from_config(theirs.scheduler.config, timestep_spacing="trailing",
                                                    set_alpha_to_one=True, steps_offset=1)
    reference_pipe = diffusers.StableDiffusionPipeline(**{**theirs.components, "scheduler": scheduler})
    reference_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        reference = reference_pipe(PROMPTS, num_inference_steps=4, guidance_scale=1 + 3.0, latents=noise,
                                   output_type="pt").images
    assert reference.std() > 0.05
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=2e-4, rtol=0)


def test_wrong_files_are_named(sd, tmp_path, capsys):
    _, folder = sd
    state = single_file_state(sd[0])
    for name, edit, message in (
            ("v2.safetensors", lambda s: {**s, "cond_stage_model.model.ln_final.weight": torch.ones(1)}, "SD 2.x"),
            ("xl.safetensors", lambda s: {**s, "conditioner.embedders.0.x": torch.ones(1)}, "SDXL"),
            ("unet.safetensors", lambda s: {k: v for k, v in s.items() if k.startswith("model.")}, "first_stage_model"),
            ("bad.safetensors", lambda s: {k: v for k, v in s.items() if "conv_in" not in k}, "missing keys")):
        save_file(edit(state), str(tmp_path / name))
        with pytest.raises(SystemExit):
            main([str(tmp_path / name), "--out", str(tmp_path / "model"), *configs(folder)])
        assert message in capsys.readouterr().err, name
        assert not (tmp_path / "model").exists()
    with pytest.raises(ValueError, match="does not fit UNet"):          # SD 1.x's sizes on a tiny file
        convert(str(folder / "sd.safetensors"), str(tmp_path / "model"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        convert(str(folder / "sd.safetensors"), str(tmp_path / "model"), unet_config=str(tmp_path / "none.json"))
