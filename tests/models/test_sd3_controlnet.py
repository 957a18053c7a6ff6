"""SD3 ControlNets (ldm.models.controlnet_sd3) in diffusers' SD3ControlNetModel layout, drawn through our CLIs and
compared with diffusers' pipelines from the same noise with CFG on tiny random SD3 models:
- InstantX's kind (zero pooled text, control latents without the shift) and the other, on a 5-block SD3 (4 ControlNet
  blocks: residual j after blocks int(i / 1.25) = j, none after the last): StableDiffusion3ControlNetPipeline.
- The InstantX kind with SD 3.5's q/k RMSNorm and MMDiT-X blocks (diffusers' test_controlnet_sd35).
- SD 3.5 Large's kind (use_pos_embed false, joint_attention_dim null: the base's patch embedding, image-only blocks)
  on a 4-block SD 3.5 Large-style base (qk_norm rms_norm), 2 ControlNet blocks: the same pipeline.
  Stability's single file of it (`stability_layout`) too.
- The inpainting kind (extra_conditioning_channels 1): StableDiffusion3ControlNetInpaintingPipeline, via ldm.inpaint
  and TextToImage.inpaint.

diffusers samples the autoencoder's posterior for the control image; we take its mode, and so do the reference
pipelines here (`posterior_mode`)."""
import re
import warnings

import diffusers
import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from ldm.models.from_diffusers import convert
from ldm.pipeline import TextToImage
from sd_layouts import SD3_TRANSFORMER, sd3_images, write_sd3_pipeline

PROMPTS = ["a red cube on a blue floor", "a cat"]
SCALE = 0.7


@pytest.fixture
def posterior_mode(monkeypatch):
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


# SD 3.5 Large's ControlNets (stabilityai/stable-diffusion-3.5-large-controlnet-*): no patch embedding or text of
# their own, image-only blocks, half as many as the base's (19 of 38), the pooled text and the shifted latents
SD35_LARGE_CONTROLNET = dict(num_layers=2, use_pos_embed=False, joint_attention_dim=None, pos_embed_type=None,
                             pos_embed_max_size=None, caption_projection_dim=48, zero_pooled=False)   # 48: moot
SD35_LARGE_BASE = dict(num_layers=4, qk_norm="rms_norm")          # SD 3.5 Large: per-head RMSNorm of q and k
# diffusers' test_controlnet_sd35: an InstantX-style ControlNet with SD 3.5 medium's q/k norm and MMDiT-X blocks
SD35_JOINT = dict(qk_norm="rms_norm", dual_attention_layers=(0,),
                  base=dict(num_layers=5, qk_norm="rms_norm", dual_attention_layers=(0, 1)))
KINDS = {"instantx": {}, "pooled": dict(zero_pooled=False), "sd35-joint": SD35_JOINT,
         "sd35-large": dict(SD35_LARGE_CONTROLNET, base=SD35_LARGE_BASE)}


def write_sd3_controlnet_pipeline(folder, zero_pooled: bool = True, base: dict | None = None,
                                  pipeline_class=diffusers.StableDiffusion3ControlNetPipeline, **options):
    """A tiny random SD3 pipeline (5 blocks or `base`'s options; converted to folder/"model", guidance w = 3) and an
    SD3ControlNetModel (4 blocks or `options`) at folder/"controlnet"; returns diffusers' `pipeline_class` over both."""
    sd3 = write_sd3_pipeline(folder, **(base or dict(num_layers=5)))
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        controlnet = diffusers.SD3ControlNetModel(**{**SD3_TRANSFORMER, "num_layers": 4, **options},
                                                  force_zeros_for_pooled_projection=zero_pooled)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in controlnet.parameters():
                if not p.any():                             # the zero-initialised layers: a trained one's are not
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        controlnet.save_pretrained(str(folder / "controlnet"))
        theirs = pipeline_class(**sd3.components, controlnet=controlnet)
    theirs.set_progress_bar_config(disable=True)
    convert(str(folder / "sd3"), str(folder / "model"), guidance=3.0)
    return theirs


@pytest.mark.parametrize("kind", list(KINDS))
def test_sd3_controlnet_draws_what_diffusers_draws(kind, posterior_mode, tmp_path, one_thread):
    from ldm import txt2img
    from ldm.models.controlnet import load_controlnet
    theirs = write_sd3_controlnet_pipeline(tmp_path, **KINDS[kind])
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    side = pipe.index.resolution
    g = torch.Generator().manual_seed(2)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, side // 4, side // 4, generator=g), size=(side, side),
                                        mode="bilinear", align_corners=False)
    hint = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    hint.save(tmp_path / "hint.png")
    reference = sd3_images(theirs, pipe, PROMPTS, 3, 4.0, control_image=hint, controlnet_conditioning_scale=SCALE)
    image = torch.from_numpy(np.array(hint)).permute(2, 0, 1)[None] / 255.0
    net = load_controlnet(str(tmp_path / "controlnet"))
    ours, info = pipe.generate(PROMPTS, steps=3, control=[(net, image, SCALE)])
    assert info["nfe"] == 6
    diff = ((ours * 0.5 + 0.5) - reference).abs().max().item()
    print(f"{kind}: max |ours - diffusers| = {diff:.2e}")
    assert diff < 2e-5
    plain, _ = pipe.generate(PROMPTS, steps=3)
    assert ((plain * 0.5 + 0.5) - reference).abs().max() > 0.01             # the ControlNet mattered

    out = tmp_path / "out.png"
    txt2img.main([PROMPTS[1], "--model", str(tmp_path / "model"), "--controlnet", str(tmp_path / "controlnet"),
                  "--control-image", str(tmp_path / "hint.png"), "--control-scale", str(SCALE), "--steps", "3",
                  "--decoder-precision", "fp32", "--out", str(out)])
    alone = sd3_images(theirs, pipe, PROMPTS[1:], 3, 4.0, control_image=hint, controlnet_conditioning_scale=SCALE)
    drawn = torch.from_numpy(np.array(Image.open(out))).permute(2, 0, 1)[None] / 255.0
    assert (drawn - alone).abs().max() <= 1 / 255 + 1e-4


@pytest.mark.parametrize("kind", ["instantx", "sd35-large"])
def test_sd3_controlnet_on_a_bf16_model(kind, tmp_path, one_thread):
    """--dtype bfloat16 with a ControlNet as the CLI loads it (fp32): its residuals join the net in bf16, and the image
    is the fp32 one up to bf16's rounding."""
    from ldm import txt2img
    write_sd3_controlnet_pipeline(tmp_path, **KINDS[kind])
    Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(5)).numpy() * 255)
                    .round().astype(np.uint8)).save(tmp_path / "hint.png")
    images = []
    for dtype in ("float32", "bfloat16"):
        txt2img.main([PROMPTS[1], "--model", str(tmp_path / "model"), "--controlnet", str(tmp_path / "controlnet"),
                      "--control-image", str(tmp_path / "hint.png"), "--steps", "2", "--dtype", dtype,
                      "--decoder-precision", "fp32", "--out", str(tmp_path / f"{dtype}.png")])
        images.append(np.asarray(Image.open(tmp_path / f"{dtype}.png"), dtype=np.float32) / 255)
    diff = np.abs(images[0] - images[1])
    print(f"{kind}: bf16 vs fp32, max {diff.max():.3f}, mean {diff.mean():.4f}")
    assert diff.max() < 0.05 and diff.mean() < 0.01                 # measured 0.016 / 0.0023 (instantx)


def stability_layout(state: dict) -> dict:
    """diffusers' SD3ControlNetModel keys of an SD 3.5 Large ControlNet -> Stability's single-file names, the inverse
    of diffusers' scripts/convert_sd3_controlnet_to_diffusers.py written from it: to_q, to_k, to_v rows stacked as
    attn.qkv, to_out.0 as attn.proj, ff.net.0.proj / ff.net.2 as mlp.fc1 / fc2, norm1.linear as adaLN_modulation.1."""
    renames = {"attn.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2",
               "norm1.linear": "adaLN_modulation.1"}
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            out[key] = value                      # time_text_embed, pos_embed_input, controlnet_blocks: the same
        elif m[2] == "attn.to_q":
            out[f"transformer_blocks.{m[1]}.attn.qkv.{m[3]}"] = torch.cat(
                [state[f"transformer_blocks.{m[1]}.attn.to_{x}.{m[3]}"] for x in "qkv"])
        elif m[2] not in ("attn.to_k", "attn.to_v"):
            out[f"transformer_blocks.{m[1]}.{renames[m[2]]}.{m[3]}"] = value
    return out


def test_sd35_large_controlnet_single_file(posterior_mode, tmp_path, one_thread):
    """Stability's single file of an SD 3.5 Large ControlNet (its names as diffusers' conversion script reads them;
    heads of 64, as every SD3's) becomes diffusers' tensors key for key, its config read off the tensors builds
    diffusers' SD3ControlNetModel that takes them, and txt2img --controlnet FILE draws what diffusers draws."""
    from safetensors.torch import save_file

    from ldm import txt2img
    from ldm.models.controlnet_sd3 import config_from_original, original_to_diffusers
    heads = dict(attention_head_dim=64, num_attention_heads=1)
    theirs = write_sd3_controlnet_pipeline(tmp_path, **SD35_LARGE_CONTROLNET, **heads,
                                           base=dict(SD35_LARGE_BASE, caption_projection_dim=64, **heads))
    state = {k: v for k, v in theirs.controlnet.state_dict().items() if not k.startswith("pos_embed.")}  # the base's
    original = stability_layout(state)
    save_file(original, str(tmp_path / "sd3.5_large_controlnet_test.safetensors"))
    converted = original_to_diffusers(original)
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], v) for k, v in state.items())
    config = config_from_original(original, "test")
    rebuilt = diffusers.SD3ControlNetModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    rebuilt.load_state_dict(converted, strict=True)

    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    side = pipe.index.resolution
    hint = Image.fromarray((torch.rand(side, side, 3, generator=torch.Generator().manual_seed(4)).numpy() * 255)
                           .round().astype(np.uint8))
    hint.save(tmp_path / "hint.png")
    out = tmp_path / "out.png"
    txt2img.main([PROMPTS[1], "--model", str(tmp_path / "model"), "--controlnet",
                  str(tmp_path / "sd3.5_large_controlnet_test.safetensors"), "--control-image", str(tmp_path / "hint.png"),
                  "--control-scale", str(SCALE), "--steps", "3", "--decoder-precision", "fp32",
                  "--out", str(out)])
    reference = sd3_images(theirs, pipe, PROMPTS[1:], 3, 4.0, control_image=hint, controlnet_conditioning_scale=SCALE)
    plain = sd3_images(theirs, pipe, PROMPTS[1:], 3, 4.0, control_image=hint, controlnet_conditioning_scale=0.0)
    drawn = torch.from_numpy(np.array(Image.open(out))).permute(2, 0, 1)[None] / 255.0
    assert (drawn - reference).abs().max() <= 1 / 255 + 1e-4
    assert (drawn - plain).abs().max() > 4 / 255                               # the ControlNet mattered


def test_sd3_inpainting_controlnet_draws_what_diffusers_draws(posterior_mode, tmp_path, one_thread, capsys):
    """An inpainting ControlNet (extra_conditioning_channels 1: the image blacked out under the mask, as latents, and
    1 - mask) = StableDiffusion3ControlNetInpaintingPipeline from the same noise (it holds no known latents); through
    ldm.inpaint and pipe.inpaint, the kept pixels pasted back. txt2img refuses it (it reads a mask)."""
    from ldm import inpaint, txt2img
    from ldm.models.controlnet import load_controlnet
    from ldm.models.controlnet_sd3 import inpaint_control
    theirs = write_sd3_controlnet_pipeline(tmp_path, extra_conditioning_channels=1,
                                           pipeline_class=diffusers.StableDiffusion3ControlNetInpaintingPipeline)
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    side = pipe.index.resolution
    g = torch.Generator().manual_seed(2)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, side // 4, side // 4, generator=g), size=(side, side),
                                        mode="bilinear", align_corners=False)
    Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "image.png")
    hole = np.zeros((side, side), np.uint8)
    hole[4:20, 8:28] = 255                                   # on the latent grid: nearest and max-pool agree
    Image.fromarray(hole).save(tmp_path / "mask.png")
    image = torch.from_numpy(np.array(Image.open(tmp_path / "image.png"))).permute(2, 0, 1)[None] / 255.0
    mask = torch.from_numpy(hole > 0).float()[None, None]
    call = dict(control_image=image * 2 - 1, control_mask=mask, controlnet_conditioning_scale=SCALE)
    reference = sd3_images(theirs, pipe, PROMPTS, 3, 4.0, **call)
    net = load_controlnet(str(tmp_path / "controlnet"))
    ours, _ = pipe.generate(PROMPTS, steps=3, control=[(net, inpaint_control(image, mask), SCALE)])
    diff = ((ours * 0.5 + 0.5) - reference).abs().max().item()
    with capsys.disabled():
        print(f"inpainting ControlNet: max |ours - diffusers| = {diff:.2e}")
    assert diff < 2e-5
    plain, _ = pipe.generate(PROMPTS, steps=3)
    assert ((plain * 0.5 + 0.5) - reference).abs().max() > 0.01             # the ControlNet mattered

    out = tmp_path / "out.png"
    cli = ["--model", str(tmp_path / "model"), "--controlnet", str(tmp_path / "controlnet"), "--control-image",
           str(tmp_path / "image.png"), "--control-scale", str(SCALE), "--steps", "3"]
    inpaint.main([PROMPTS[1], "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"), *cli,
                  "--decoder-precision", "fp32", "--out", str(out)])
    alone = sd3_images(theirs, pipe, PROMPTS[1:], 3, 4.0, **call)
    drawn = torch.from_numpy(np.array(Image.open(out))).permute(2, 0, 1)[None] / 255.0
    assert (drawn - (mask * alone + (1 - mask) * image)).abs().max() <= 1 / 255 + 1e-4
    # pipe.inpaint: the CLI's path (pure noise, kept pixels pasted back), not the held known latents of a plain model
    painted, _ = pipe.inpaint(image * 2 - 1, mask, PROMPTS, steps=3, control=[(net, image, SCALE)])
    diff = ((painted * 0.5 + 0.5) - (mask * reference + (1 - mask) * image)).abs().max().item()
    with capsys.disabled():
        print(f"pipe.inpaint with the inpainting ControlNet: max |ours - diffusers| = {diff:.2e}")
    assert diff < 2e-5
    painted, _ = pipe.inpaint(image * 2 - 1, mask, PROMPTS[1:], steps=3, control=[(net, image, SCALE)])
    assert ((painted * 0.5 + 0.5) - drawn).abs().max() <= 1 / 255 + 1e-4              # the CLI's PNG, rounded
    with pytest.raises(SystemExit) as e:
        txt2img.main([PROMPTS[1], *cli, "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2 and "an inpainting ControlNet" in capsys.readouterr().err


def test_sd3_controlnet_refusals(tmp_path, capsys):
    """Layouts we do not read are refused naming the config key; an SD3 ControlNet on an SD model, or an SD one on
    SD3, is a usage error."""
    from ldm import txt2img
    from ldm.models.controlnet import load_controlnet
    from ldm.pipeline import save_random_model
    write_sd3_controlnet_pipeline(tmp_path)
    for options, message in ((dict(extra_conditioning_channels=2), "extra_conditioning_channels 2"),
                             (dict(use_pos_embed=False), "use_pos_embed False with joint_attention_dim 96")):
        diffusers.SD3ControlNetModel(**{**SD3_TRANSFORMER, "num_layers": 1, **options}).save_pretrained(
            str(tmp_path / "odd"))
        with pytest.raises(ValueError, match=message):
            load_controlnet(str(tmp_path / "odd"))
    from safetensors.torch import save_file
    save_file({"controlnet_blocks.0.weight": torch.zeros(2, 2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match="no transformer_blocks.0.attn.qkv.weight, pos_embed_input.proj.weight"):
        load_controlnet(str(tmp_path / "odd.safetensors"))
    save_random_model(str(tmp_path / "sd"))
    Image.new("RGB", (32, 32)).save(tmp_path / "hint.png")
    for model, controlnet, message in ((tmp_path / "sd", tmp_path / "controlnet", "needs an SD3 model"),
                                       (tmp_path / "model", "shapes64-edges", "needs a U-Net model")):
        with pytest.raises(SystemExit) as e:
            txt2img.main(["a cat", "--model", str(model), "--controlnet", str(controlnet), "--control-image",
                          str(tmp_path / "hint.png"), "--steps", "1", "--out", str(tmp_path / "x.png")])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_sd3_control_range_equals_diffusers(posterior_mode, tmp_path, one_thread):
    """sample(control_range=[(0.25, 0.75)]) over 4 steps with CFG = StableDiffusion3ControlNetPipeline's
    control_guidance_start=0.25, end=0.75; the range mattered."""
    from ldm.models.controlnet import load_controlnet
    theirs = write_sd3_controlnet_pipeline(tmp_path, True)
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    side = pipe.index.resolution
    hint = Image.fromarray((torch.rand(side, side, 3, generator=torch.Generator().manual_seed(3)).numpy() * 255)
                           .round().astype(np.uint8))
    call = dict(control_image=hint, controlnet_conditioning_scale=SCALE)
    reference = sd3_images(theirs, pipe, PROMPTS, 4, 4.0, control_guidance_start=0.25, control_guidance_end=0.75,
                           **call)
    throughout = sd3_images(theirs, pipe, PROMPTS, 4, 4.0, **call)
    image = torch.from_numpy(np.array(hint)).permute(2, 0, 1)[None] / 255.0
    control = [(load_controlnet(str(tmp_path / "controlnet")), image, SCALE)]
    ours, _ = pipe.generate(PROMPTS, steps=4, control=control, control_range=[(0.25, 0.75)])
    diff = ((ours * 0.5 + 0.5) - reference).abs().max().item()
    print(f"control range 0.25:0.75: max |ours - diffusers| = {diff:.2e}")
    assert diff < 2e-5
    assert (reference - throughout).abs().max() > 0.01
