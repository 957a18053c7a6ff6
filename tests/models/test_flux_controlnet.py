"""FLUX.1 ControlNets (ldm.models.controlnet_flux) in diffusers' FluxControlNetModel layout: on a tiny random FLUX.1
pipeline (3 double, 3 single blocks) a tiny random ControlNet (2 double, 1 single block: residuals in runs of 2 and
3) drawn through txt2img --controlnet equals diffusers' FluxControlNetPipeline from the same noise at scale 0.7;
-dev (the guidance input for both nets), -schnell and a Union ControlNet (a control mode).

diffusers samples the autoencoder's posterior for the control image; we take its mode, and so do the reference
pipelines here (`posterior_mode`)."""
import warnings

import diffusers
import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from ldm.models.from_diffusers import convert
from ldm.pipeline import TextToImage
from sd_layouts import FLUX_TRANSFORMER, FLUX_VAE, flux_images, write_flux_text_parts

PROMPT = "a red cube on a blue floor"
SIZE = (48, 32)
SCALE = 0.7


@pytest.fixture
def posterior_mode(monkeypatch):
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


def randomize(module, seed: int) -> None:
    """Non-zero weights for the zero-initialised layers (a trained ControlNet's are not zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def write_flux_controlnet_pipeline(folder, guidance_embeds: bool, num_mode=None):
    """A tiny random FLUX.1 pipeline (FluxPipeline at folder/"flux", converted to our folder/"model") and a
    FluxControlNetModel at folder/"controlnet"; returns diffusers' FluxControlNetPipeline over both."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel
    parts = folder / "parts"
    write_flux_text_parts(parts)
    torch.manual_seed(0)
    config = {**FLUX_TRANSFORMER, "num_layers": 3, "num_single_layers": 3, "guidance_embeds": guidance_embeds}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        components = dict(
            transformer=diffusers.FluxTransformer2DModel(**config),
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0), vae=diffusers.AutoencoderKL(**FLUX_VAE),
            text_encoder=CLIPTextModel.from_pretrained(parts / "text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(parts / "tokenizer"),
            text_encoder_2=T5EncoderModel.from_pretrained(parts / "text_encoder_2"),
            tokenizer_2=AutoTokenizer.from_pretrained(parts / "tokenizer_2"))
        diffusers.FluxPipeline(**components).save_pretrained(str(folder / "flux"))
        controlnet = diffusers.FluxControlNetModel(**{**config, "num_layers": 2, "num_single_layers": 1},
                                                   num_mode=num_mode)
        randomize(controlnet, 1)
        controlnet.save_pretrained(str(folder / "controlnet"))
        theirs = diffusers.FluxControlNetPipeline(**components, controlnet=controlnet)
    theirs.set_progress_bar_config(disable=True)
    convert(str(folder / "flux"), str(folder / "model"))
    return theirs


def hint_image(path, seed: int = 2) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, SIZE[1] // 4, SIZE[0] // 4, generator=g),
                                        size=SIZE[::-1], mode="bilinear", align_corners=False)
    image = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    image.save(path)
    return image


def drawn(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)[None] / 255.0


@pytest.mark.parametrize("variant", ["dev", "schnell", "union"])
def test_flux_controlnet_draws_what_diffusers_draws(variant, posterior_mode, tmp_path, one_thread):
    """txt2img --controlnet --control-scale 0.7 (--control-mode 2: Union) = FluxControlNetPipeline within one 8-bit
    level; the ControlNet mattered; sample(control=...) equals diffusers' float images tightly."""
    from ldm import txt2img
    guidance, mode = variant != "schnell", 2 if variant == "union" else None
    theirs = write_flux_controlnet_pipeline(tmp_path, guidance, num_mode=4 if mode is not None else None)
    hint = hint_image(tmp_path / "hint.png")
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    steps, scale = 3, (3.5 if guidance else 0.0)
    call = dict(control_image=hint, controlnet_conditioning_scale=SCALE, control_mode=mode)
    reference = flux_images(theirs, pipe, [PROMPT], steps, scale, size=SIZE, **call)

    from ldm.models.controlnet import load_controlnet
    net = load_controlnet(str(tmp_path / "controlnet"))
    image = torch.from_numpy(np.array(hint)).permute(2, 0, 1)[None] / 255.0
    control = [(net, image, SCALE) if mode is None else (net, image, SCALE, mode)]
    ours, info = pipe.generate([PROMPT], steps=steps, size=SIZE, control=control)
    assert info["nfe"] == steps
    diff = ((ours * 0.5 + 0.5) - reference).abs().max().item()
    print(f"{variant}: max |ours - diffusers| = {diff:.2e}")
    assert diff < 2e-5

    out = tmp_path / "out.png"
    flags = ["--control-mode", str(mode)] if mode is not None else []
    txt2img.main([PROMPT, "--model", str(tmp_path / "model"), "--controlnet", str(tmp_path / "controlnet"),
                  "--control-image", str(tmp_path / "hint.png"), "--control-scale", str(SCALE), *flags,
                  "--size", "48x32", "--steps", str(steps), "--decoder-precision", "fp32", "--out", str(out)])
    assert (drawn(out) - reference).abs().max() <= 1 / 255 + 1e-4
    plain, _ = pipe.generate([PROMPT], steps=steps, size=SIZE)
    assert ((plain * 0.5 + 0.5) - reference).abs().max() > 0.01             # the ControlNet mattered


def test_flux_controlnet_refusals(tmp_path, capsys):
    """A Union ControlNet without --control-mode, a mode on a plain one, a FLUX.1 ControlNet on an SD model and a
    ControlNet for another FLUX.1 width are usage errors naming the cause."""
    from ldm import txt2img
    from ldm.models.controlnet import load_controlnet
    from ldm.models.controlnet_flux import FluxControlNet
    from ldm.models.flux import Flux, FluxConfig
    from ldm.pipeline import save_random_model
    write_flux_controlnet_pipeline(tmp_path, True, num_mode=4)
    hint_image(tmp_path / "hint.png")
    save_random_model(str(tmp_path / "sd"))
    base = ["--controlnet", str(tmp_path / "controlnet"), "--control-image", str(tmp_path / "hint.png"),
            "--steps", "1", "--out", str(tmp_path / "x.png"), "--size", "48x32"]
    for model, flags, message in ((tmp_path / "model", [], "need one"),
                                  (tmp_path / "sd", ["--control-mode", "1"], "needs a FLUX.1 model"),
                                  (tmp_path / "model", ["--control-mode", "4"], "modes 0..3")):
        with pytest.raises(SystemExit) as e:
            txt2img.main(["a cat", "--model", str(model), *base, *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err
    net = load_controlnet(str(tmp_path / "controlnet"))
    assert isinstance(net, FluxControlNet) and net.num_mode == 4
    wider = Flux(FluxConfig(depth_double=1, depth_single=0, num_heads=4, head_dim=16, context_dim=96, pooled_dim=32,
                            axes_dims_rope=(4, 6, 6), guidance_embeds=True))
    with pytest.raises(ValueError, match="made for another transformer"):
        net.check_base(wider)


def test_flux_control_range_equals_diffusers(posterior_mode, tmp_path, one_thread):
    """sample(control_range=[(0.25, 0.75)]) over 4 steps = FluxControlNetPipeline's control_guidance_start=0.25,
    end=0.75 (-dev: the net's times are 1000 t); the range mattered."""
    theirs = write_flux_controlnet_pipeline(tmp_path, True)
    hint = hint_image(tmp_path / "hint.png")
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    steps, call = 4, dict(control_image=hint, controlnet_conditioning_scale=SCALE)
    reference = flux_images(theirs, pipe, [PROMPT], steps, 3.5, size=SIZE, control_guidance_start=0.25,
                            control_guidance_end=0.75, **call)
    throughout = flux_images(theirs, pipe, [PROMPT], steps, 3.5, size=SIZE, **call)

    from ldm.models.controlnet import load_controlnet
    image = torch.from_numpy(np.array(hint)).permute(2, 0, 1)[None] / 255.0
    control = [(load_controlnet(str(tmp_path / "controlnet")), image, SCALE)]
    ours, _ = pipe.generate([PROMPT], steps=steps, size=SIZE, control=control, control_range=[(0.25, 0.75)])
    diff = ((ours * 0.5 + 0.5) - reference).abs().max().item()
    print(f"control range 0.25:0.75: max |ours - diffusers| = {diff:.2e}")
    assert diff < 2e-5
    assert (reference - throughout).abs().max() > 0.01


def test_flux_controlnet_on_a_bf16_model(tmp_path, one_thread):
    """--dtype bfloat16 with a ControlNet as the CLI loads it (fp32): its residuals join the net in bf16 (was: a dtype
    error in the next block), and the image is the fp32 one up to bf16's rounding."""
    from ldm import txt2img
    write_flux_controlnet_pipeline(tmp_path, True)
    hint_image(tmp_path / "hint.png")
    images = []
    for dtype in ("float32", "bfloat16"):
        txt2img.main([PROMPT, "--model", str(tmp_path / "model"), "--controlnet", str(tmp_path / "controlnet"),
                      "--control-image", str(tmp_path / "hint.png"), "--steps", "2", "--dtype", dtype,
                      "--size", "48x32", "--decoder-precision", "fp32", "--out", str(tmp_path / f"{dtype}.png")])
        images.append(np.asarray(Image.open(tmp_path / f"{dtype}.png"), dtype=np.float32) / 255)
    diff = np.abs(images[0] - images[1])
    assert diff.max() < 0.05 and diff.mean() < 0.01                 # measured 0.0039 / 0.0003
