"""FLUX.1-dev's true CFG (sample(true_cfg=s), --true-cfg S) with the image-conditioned relatives, on tiny random models:
- a FLUX.1 ControlNet: diffusers' FluxControlNetPipeline(true_cfg_scale=s), whose ControlNet runs on the positive
  prompt only and lends its residuals to the negative call too; -schnell's CFG at w = s - 1 is the same true CFG;
- Kontext: diffusers' FluxKontextPipeline(true_cfg_scale=s), the reference tokens in both calls;
- Fill and Depth / Canny: diffusers' FluxFillPipeline and FluxControlPipeline have no true CFG; one step from pure
  noise is the x0 prediction, linear in the net's output, so ours equals neg + s (pos - neg) of two plain one-step
  runs, the negative prompt drawn as a prompt, the image inputs the same in both."""
import importlib.util
import inspect
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.models.controlnet import load_controlnet
from ldm.models.from_diffusers import convert
from ldm.pipeline import TextToImage
from sd_layouts import flux_images

NEGATIVE = "a blurry picture"


def _helpers(name: str):
    """A neighbouring test module's helpers (pytest's importlib mode puts no test folder on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


controlnets, tools = _helpers("test_flux_controlnet"), _helpers("test_flux_tools")
posterior_mode = tools.posterior_mode                           # diffusers encodes with the posterior's mode, as ours


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_controlnet_true_cfg_draws_what_diffusers_draws(variant, posterior_mode, tmp_path, one_thread):
    """-dev: true_cfg=4 with a negative prompt and a ControlNet = FluxControlNetPipeline(true_cfg_scale=4), the
    negative half with the positive half's ControlNet residuals; -schnell: guidance w = 3 is the same; the CLI's
    PNG within rounding (-dev)."""
    dev = variant == "dev"
    theirs = controlnets.write_flux_controlnet_pipeline(tmp_path, guidance_embeds=dev)
    hint = controlnets.hint_image(tmp_path / "hint.png")
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    net = load_controlnet(str(tmp_path / "controlnet"))
    image = torch.from_numpy(np.array(hint)).permute(2, 0, 1)[None] / 255.0
    prompt, size, scale = controlnets.PROMPT, controlnets.SIZE, controlnets.SCALE
    guided = dict(true_cfg=4.0) if dev else dict(guidance=3.0)
    ours, info = pipe.generate([prompt], steps=3, size=size, control=[(net, image, scale)], negative=NEGATIVE,
                               **guided)
    assert info["nfe"] == 6
    reference = flux_images(theirs, pipe, [prompt], 3, 3.5 if dev else 0.0, size=size, control_image=hint,
                            controlnet_conditioning_scale=scale, true_cfg_scale=4.0, negative_prompt=NEGATIVE)
    diff = ((ours * 0.5 + 0.5) - reference).abs().max().item()
    print(f"{variant}: max |ours - diffusers| = {diff:.2e}")
    assert diff < 2e-5
    plain, _ = pipe.generate([prompt], steps=3, size=size, control=[(net, image, scale)])
    assert ((plain * 0.5 + 0.5) - reference).abs().max() > 0.01            # the negative half mattered
    if dev:
        from ldm import txt2img
        out = tmp_path / "out.png"
        txt2img.main([prompt, "--model", str(tmp_path / "model"), "--controlnet", str(tmp_path / "controlnet"),
                      "--control-image", str(tmp_path / "hint.png"), "--control-scale", str(scale), "--size", "48x32",
                      "--steps", "3", "--true-cfg", "4", "--negative", NEGATIVE, "--decoder-precision", "fp32",
                      "--out", str(out)])                  # auto is bf16 on a CPU with native bf16
        assert (controlnets.drawn(out) - reference).abs().max() <= 1 / 255 + 1e-4


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux-kontext-true-cfg")
    theirs = tools.write_tool_pipeline(folder, diffusers.FluxKontextPipeline, 64)
    convert(str(folder / "flux"), str(folder / "model"))
    return theirs, folder / "model"


def test_kontext_true_cfg_draws_what_diffusers_draws(kontext, one_thread):
    """edit(true_cfg=3, negative=...) = FluxKontextPipeline(true_cfg_scale=3): the reference tokens in both halves."""
    theirs, model = kontext
    pipe = TextToImage.from_folder(str(model), decoder_precision="fp32")
    size, image = (48, 32), tools.random_image(40, 24, seed=3)
    edited, info = pipe.edit(tools.as_input(image), tools.PROMPTS, steps=3, size=size, true_cfg=3.0, negative=NEGATIVE)
    assert info["nfe"] == 6
    kontext_call = lambda prompt, **kwargs: theirs(image=image, prompt=prompt, **kwargs)      # noqa: E731
    reference = flux_images(kontext_call, pipe, tools.PROMPTS, 3, 2.5, size=size, max_area=size[0] * size[1],
                            _auto_resize=False, true_cfg_scale=3.0, negative_prompt=NEGATIVE)
    diff = ((edited * 0.5 + 0.5) - reference).abs().max().item()
    print(f"kontext: max |ours - diffusers| = {diff:.2e}")
    assert diff < 2e-5
    plain, _ = pipe.edit(tools.as_input(image), tools.PROMPTS, steps=3, size=size)
    assert ((plain * 0.5 + 0.5) - reference).abs().max() > 0.01              # the negative half mattered


def one_step_cfg(pipe, s: float, **inputs):
    """(ours, reference): one step with true_cfg=s and NEGATIVE, and neg + s (pos - neg) of two plain one-step runs."""
    ours, info = pipe.sample(tools.PROMPTS, steps=1, true_cfg=s, negative=NEGATIVE, **inputs)
    assert info["nfe"] == 2
    pos, _ = pipe.sample(tools.PROMPTS, steps=1, **inputs)
    neg, _ = pipe.sample([NEGATIVE] * len(tools.PROMPTS), steps=1, **inputs)
    assert (pos - neg).abs().max() > 0.01                                     # the prompts differ
    return ours, neg + s * (pos - neg)


@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux-fill-true-cfg")
    tools.write_tool_pipeline(folder, diffusers.FluxFillPipeline, 4 * (16 + 16 + 2 * 2))
    convert(str(folder / "flux"), str(folder / "model"))
    return folder / "model"


def test_fill_true_cfg(fill, tmp_path, one_thread):
    """Fill (no true CFG in diffusers): the one-step CFG identity with the masked image and mask in both halves;
    ldm.inpaint --true-cfg 4 --negative ... draws pipe.inpaint(true_cfg=4) within rounding."""
    assert "true_cfg_scale" not in inspect.signature(diffusers.FluxFillPipeline.__call__).parameters
    from ldm import inpaint
    pipe = TextToImage.from_folder(str(fill), decoder_precision="fp32")
    image, mask = tools.random_image(32, 32, seed=1), tools.rect_mask(32, 32, (5, 8, 27, 21))
    images, masks = tools.as_input(image), torch.from_numpy(np.asarray(mask) / 255.0).float()[None, None]
    ours, reference = one_step_cfg(pipe, 4.0, inpaint=pipe.inpainting_inputs(images, masks))
    print("fill: max |ours - neg + s (pos - neg)|", (ours - reference).abs().max().item())
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)

    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    inpaint.main(["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "a cat", "--model",
                  str(fill), "--steps", "2", "--true-cfg", "4", "--negative", NEGATIVE, "--decoder-precision", "fp32",
                  "--out", str(tmp_path / "out.png")])
    painted, info = pipe.inpaint(images, masks, ["a cat"], steps=2, true_cfg=4.0, negative=NEGATIVE)
    assert info["nfe"] == 4
    drawn = torch.from_numpy(np.array(Image.open(tmp_path / "out.png"))).permute(2, 0, 1)[None] / 255.0
    assert (drawn - (painted * 0.5 + 0.5)).abs().max() <= 1 / 255 + 1e-4
    plain, _ = pipe.inpaint(images, masks, ["a cat"], steps=2)
    assert ((plain - painted) * masks).abs().max() > 0.01                    # the negative half mattered


def test_depth_canny_true_cfg(tmp_path, one_thread):
    """Depth / Canny (no true CFG in diffusers): the one-step CFG identity with the control latents in both halves,
    at 48x32."""
    assert "true_cfg_scale" not in inspect.signature(diffusers.FluxControlPipeline.__call__).parameters
    tools.write_tool_pipeline(tmp_path, diffusers.FluxControlPipeline, 4 * (16 + 16))
    convert(str(tmp_path / "flux"), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    control = pipe.encode_images(tools.as_input(tools.random_image(48, 32, seed=2)))
    ours, reference = one_step_cfg(pipe, 3.0, size=(48, 32), reference=control)
    print("depth / canny: max |ours - neg + s (pos - neg)|", (ours - reference).abs().max().item())
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
