"""python -m ldm.models.from_single_file: an SD 1.x or 2.x checkpoint file in the CompVis layout becomes our
model folder, and our TextToImage on it draws what diffusers' StableDiffusionPipeline draws from the same
weights (for SD 2.x: from the conditioning open_clip's own model computes).

The file is written here from the tiny random diffusers pipeline of test_from_diffusers.py with the
test-side name maps of test_unet.py and test_autoencoder.py (the U-Net one is checked there against
diffusers' own CompVis converter); the SD 2.x file's text tower is a tiny random open_clip CLIP."""
import re

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import save_file
from sd_layouts import (PROMPTS, diffusers_images, on_our_grid, openclip_text_model, openclip_tokens, unet_to_compvis,
                        vae_key_to_compvis, write_sd_pipeline, write_sdxl_pipeline, write_sdxl_refiner)

from ldm.bench_models import TINY
from ldm.diffusion.samplers import initial_noise
from ldm.models.from_single_file import convert, main
from ldm.pipeline import TextToImage

diffusers = pytest.importorskip("diffusers")
open_clip = pytest.importorskip("open_clip")
pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny pipelines, fixtures included: threads only contend


def vae_state(pipe) -> dict:
    """The pipeline's autoencoder under `first_stage_model.` in the CompVis layout."""
    state = {}
    for key, value in pipe.vae.state_dict().items():
        key = vae_key_to_compvis(key, len(TINY.vae["block_out_channels"]))
        state[key] = value[:, :, None, None] if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", key) else value
    return state


def sgm_unet_state(pipe) -> dict:
    """An SDXL pipeline's U-Net in Stability AI's sgm layout (the CompVis names, `label_emb` added); checked
    against diffusers' own converter, which must map it back exactly."""
    unet = unet_to_compvis(pipe.unet.state_dict(), levels=len(pipe.unet.config.block_out_channels),
                           n=pipe.unet.config.layers_per_block)
    back = convert_ldm_unet_checkpoint(unet, dict(pipe.unet.config))
    assert set(back) == set(pipe.unet.state_dict()) and all(torch.equal(back[k], v) for k, v in pipe.unet.state_dict().items())
    return unet


def single_file_state(pipe) -> dict:
    """The pipeline's three models under the CompVis prefixes, as an SD 1.x .ckpt / .safetensors holds them."""
    state = unet_to_compvis(pipe.unet.state_dict(), levels=len(TINY.unet["block_out_channels"]),
                                  n=TINY.unet["layers_per_block"])
    state |= vae_state(pipe)
    for key, value in pipe.text_encoder.state_dict().items():    # transformers 4's names, as every SD 1.x file has
        state["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
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
def test_single_file_draws_what_diffusers_draws(sd, tmp_path, name, capsys):
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
            ("v2.safetensors", lambda s: {**s, "cond_stage_model.model.ln_final.weight": torch.ones(1)},
             "OpenCLIP text tower: the weights lack"),
            ("xl.safetensors", lambda s: {**s, "conditioner.embedders.1.model.x": torch.ones(1)},
             "conditioner.embedders.0.model."),
            ("unet.safetensors", lambda s: {k: v for k, v in s.items() if k.startswith("model.")}, "first_stage_model"),
            ("bad.safetensors", lambda s: {k: v for k, v in s.items() if "conv_in" not in k}, "missing keys")):
        save_file(edit(state), str(tmp_path / name))
        with pytest.raises(SystemExit):
            main([str(tmp_path / name), "--out", str(tmp_path / "model"), *configs(folder)])
        assert message in capsys.readouterr().err, name
        assert not (tmp_path / "model").exists()
    # SD 1.x's sizes on a tiny file. The 860M-parameter U-Net is built on the meta device: the refusal compares
    # shapes before any weight is copied, and random init of real ones would take most of this test's time.
    with pytest.raises(ValueError, match="does not fit UNet"), torch.device("meta"):
        convert(str(folder / "sd.safetensors"), str(tmp_path / "model"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        convert(str(folder / "sd.safetensors"), str(tmp_path / "model"), unet_config=str(tmp_path / "none.json"))


SD2_UNET = {"cross_attention_dim": 128, "use_linear_projection": True, "attention_head_dim": [1, 2]}  # heads per level


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """(diffusers pipeline with an SD 2.x-style U-Net predicting v, open_clip model, folder with sd2.safetensors)."""
    folder = tmp_path_factory.mktemp("single2")
    pipe = write_sd_pipeline(folder, prediction_type="v_prediction", unet_options=SD2_UNET)
    tower = openclip_text_model()
    state = {k: v for k, v in single_file_state(pipe).items() if not k.startswith("cond_stage_model.")}
    # open_clip's whole CLIP as SD 2.x's FrozenOpenCLIPEmbedder holds it, plus what old open_clip saved
    state |= {f"cond_stage_model.model.{k}": v.contiguous() for k, v in tower.state_dict().items()}
    state["cond_stage_model.model.attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)
    save_file(state, str(folder / "sd2.safetensors"))
    return pipe, tower, folder


def test_sd2_file_draws_from_open_clips_conditioning(sd2, tmp_path, capsys):
    theirs, tower, folder = sd2
    main([str(folder / "sd2.safetensors"), "--out", str(tmp_path / "model"), "--guidance", "3", "--prediction", "v",
          "--resolution", "48", *configs(folder)[:4]])                      # the text tower's sizes: from its weights
    assert "48 px, prediction v, w = 3" in capsys.readouterr().out
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    prompts = [*PROMPTS, "a photo of a corgi, " * 30]                       # one row truncated at 77 tokens
    ids, _ = pipe.text_encoder.tokenize(prompts)
    torch.testing.assert_close(ids, open_clip.tokenize(prompts), atol=0, rtol=0)   # zero padding, as open_clip
    context = pipe.encode_prompts(prompts)["context"]
    torch.testing.assert_close(context, openclip_tokens(tower, prompts), atol=2e-5, rtol=1e-5)

    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(4), pipe.latent_shape(len(PROMPTS)),
                          generator=torch.Generator().manual_seed(0))
    assert noise.shape[-1] == 48 // 2
    images, _ = pipe.generate(PROMPTS, steps=4, seed=0)
    scheduler = diffusers.DDIMScheduler.from_config(theirs.scheduler.config, timestep_spacing="trailing",
                                                    set_alpha_to_one=True, steps_offset=1)
    reference_pipe = diffusers.StableDiffusionPipeline(**{**theirs.components, "scheduler": scheduler})
    reference_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        reference = reference_pipe(prompt_embeds=openclip_tokens(tower, PROMPTS),
                                   negative_prompt_embeds=openclip_tokens(tower, [""] * len(PROMPTS)),
                                   height=48, width=48, num_inference_steps=4, guidance_scale=1 + 3.0,
                                   latents=noise, output_type="pt").images
    assert reference.std() > 0.05
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=2e-4, rtol=0)


def test_built_in_sd2_sizes_are_the_real_models():
    """At full size, on the meta device (no memory): the SD 2.x U-Net config builds diffusers' model (865.9M
    parameters), every CompVis name lands on ours with its shape, and OpenCLIP ViT-H/14's text tower (built by
    open_clip from its own model config) reads off as the CLIPTextConfig of stabilityai/stable-diffusion-2-1's
    text_encoder/config.json: 1024 wide, 16 heads, 4096 MLP, 23 layers, GELU (its projection_dim is unused by a
    CLIPTextModel and left out)."""
    from ldm.models.convert_openclip import clip_config, text_tower
    from ldm.models.convert_unet import compvis_to_ours, unet_config_from_diffusers
    from ldm.models.from_single_file import SD2_UNET
    from ldm.models.unet import UNet
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**SD2_UNET)
        ours = UNet(unet_config_from_diffusers(SD2_UNET))
        clip = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters()) == 865_910_724
    mapped = compvis_to_ours(unet_to_compvis(theirs.state_dict(), levels=4, n=2), ours.cfg)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    config = clip_config(text_tower({f"m.{k}": v for k, v in clip.state_dict().items()}, "m."))
    assert {k: config[k] for k in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers",
                                   "hidden_act", "max_position_embeddings", "vocab_size")} == {
        "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096, "num_hidden_layers": 23,
        "hidden_act": "gelu", "max_position_embeddings": 77, "vocab_size": 49408}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(diffusers SDXL pipeline, folder with sdxl.safetensors in Stability AI's sgm layout): the second text
    encoder is a tiny open_clip model, in the file as open_clip holds it and in the diffusers pipeline as
    transformers does (that conversion is checked against open_clip in test_convert_openclip.py)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ldm.models import convert_openclip
    from ldm.models.text import clip_name
    folder = tmp_path_factory.mktemp("singlexl")
    tower = {k: v for k, v in openclip_text_model(seed=1).state_dict().items() if not k.startswith("visual.")}
    bigg = CLIPTextModelWithProjection(CLIPTextConfig(**convert_openclip.clip_config(tower, drop_last=False))).eval()
    bigg.load_state_dict({clip_name(k, bigg): v for k, v in
                          convert_openclip.to_transformers(tower, drop_last=False, projection=True).items()})
    pipe = write_sdxl_pipeline(folder, text_encoder_2=bigg)
    state = {**sgm_unet_state(pipe), **vae_state(pipe)}
    state |= {"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
              for k, v in pipe.text_encoder.state_dict().items()}
    state |= {f"conditioner.embedders.1.model.{k}": v for k, v in tower.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "sdxl.safetensors"))
    refiner = write_sdxl_refiner(folder, text_encoder_2=bigg)       # the same bigG: the refiner's only encoder
    state = {**sgm_unet_state(refiner), **vae_state(refiner),
             **{f"conditioner.embedders.0.model.{k}": v for k, v in tower.items()}}
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "refiner.safetensors"))
    return pipe, refiner, folder


def test_sdxl_file_draws_what_diffusers_draws(sdxl, tmp_path, capsys):
    theirs, _, folder = sdxl
    sd = folder / "sdxl"
    main([str(folder / "sdxl.safetensors"), "--out", str(tmp_path / "model"), "--guidance", "3",
          "--unet-config", str(sd / "unet" / "config.json"), "--vae-config", str(sd / "vae" / "config.json"),
          "--text-config", str(sd / "text_encoder" / "config.json")])        # bigG's sizes: from its weights
    assert "prediction eps, w = 3" in capsys.readouterr().out
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    assert pipe.text_encoder.cfg.kind == "sdxl" and pipe.text_encoder.cfg.zero_empty
    images, _ = pipe.generate(PROMPTS, steps=4, seed=0)
    reference = diffusers_images(theirs, pipe, PROMPTS, 4, 1 + 3.0)
    assert reference.std() > 0.05
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=2e-4, rtol=0)


def test_sdxl_refiner_file_refines_as_diffusers_does(sdxl, tmp_path):
    """A refiner file (bigG alone under conditioner.embedders.0.model.): the folder has bigG as its second
    encoder, the aesthetic scores 6.0 / 2.5, the empty prompt encoded; img2img from the same latents equals
    diffusers' StableDiffusionXLImg2ImgPipeline (requires_aesthetics_score) on the same weights."""
    _, theirs, folder = sdxl
    sd = folder / "refiner"
    main([str(folder / "refiner.safetensors"), "--out", str(tmp_path / "model"), "--guidance", "3",
          "--unet-config", str(sd / "unet" / "config.json"), "--vae-config", str(sd / "vae" / "config.json")])
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    assert pipe.index.aesthetic == [6.0, 2.5] and not pipe.text_encoder.cfg.zero_empty and pipe.text_encoder.model is None
    init = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    z, _ = pipe.sample(PROMPTS, steps=4, seed=0, init=init, strength=0.5)
    img2img = on_our_grid(diffusers.StableDiffusionXLImg2ImgPipeline(**{
        k: v for k, v in theirs.components.items() if k not in ("image_encoder", "feature_extractor")},
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False))
    with torch.no_grad():
        reference = img2img(PROMPTS, image=init, strength=0.5, num_inference_steps=4, guidance_scale=4.0,
                            generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(pipe.decode(z) * 0.5 + 0.5, reference, atol=2e-4, rtol=0)


@pytest.mark.parametrize("name", ["SDXL_UNET", "REFINER_UNET"])
def test_built_in_sdxl_configs_are_diffusers_models(name):
    """At full size on the meta device: the built-in SDXL base and refiner U-Net configs build diffusers'
    models and ours with the same parameter count (the base: 2,567,463,684), every sgm name placed."""
    from ldm.models import from_single_file
    from ldm.models.convert_unet import compvis_to_ours, unet_config_from_diffusers
    from ldm.models.unet import UNet
    config = getattr(from_single_file, name)
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**config)
        ours = UNet(unet_config_from_diffusers(config))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) and (name != "SDXL_UNET" or count == 2_567_463_684)
    mapped = compvis_to_ours(unet_to_compvis(theirs.state_dict(), levels=len(config["block_out_channels"]), n=2),
                             ours.cfg)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ours.state_dict().items()}
