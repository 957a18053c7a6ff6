"""ControlNet (ldm.models.controlnet) against diffusers: a random ControlNetModel made from the tiny SD
U-Net (its zero convolutions made non-zero, so that it does something), read into ours; the residuals,
the controlled U-Net and the whole txt2img equal diffusers' ControlNetModel, UNet2DConditionModel and
StableDiffusionControlNetPipeline on the same weights and noise."""
import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sd_layouts import PROMPTS, on_our_grid, write_sd_pipeline

from ldm.bench_models import TINY
from ldm.diffusion.samplers import initial_noise
from ldm.models.controlnet import (ControlNet, ControlSteps, controlnet_state_from_diffusers, load_controlnet,
                                   load_diffusers_controlnet, save_controlnet)
from ldm.models.from_diffusers import convert
from ldm.pipeline import TextToImage

diffusers = pytest.importorskip("diffusers")


def write_controlnet(folder, unet):
    torch.manual_seed(1)
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))  # f = 2, as the VAE
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                p.normal_(0, 0.1)
    net.save_pretrained(str(folder))
    return net


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    theirs = write_sd_pipeline(root)
    convert(str(root / "sd"), str(root / "model"))
    return root, theirs, write_controlnet(root / "cn", theirs.unet)


def test_residuals_and_controlled_unet_equal_diffusers(setup, one_thread):
    root, theirs, net = setup
    ours = load_diffusers_controlnet(str(root / "cn"))
    pipe = TextToImage.from_folder(str(root / "model"))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([10.0, 700.0])
    context = torch.randn(2, 77, TINY.unet["cross_attention_dim"], generator=g)
    hint = torch.rand(2, 3, 16, 24, generator=g)
    with torch.no_grad():
        down, mid = net(x, t, context, hint, return_dict=False)
        our_down, our_mid = ours(x, t, context, hint)
        assert len(our_down) == len(down) == len(pipe.unet.skip_channels)
        for a, b in zip(our_down, down):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(our_mid, mid, atol=1e-5, rtol=1e-5)
        reference = theirs.unet(x, t, context, down_block_additional_residuals=down,
                                mid_block_additional_residual=mid).sample
        torch.testing.assert_close(pipe.unet(x, t, context, control=(our_down, our_mid)), reference,
                                   atol=1e-5, rtol=1e-5)
        assert (reference - theirs.unet(x, t, context).sample).abs().max() > 1e-2   # the control mattered


def test_txt2img_with_a_controlnet_draws_what_diffusers_draws(setup, tmp_path, one_thread, capsys):
    from ldm import txt2img
    root, theirs, net = setup
    side = TINY.image
    control = (np.random.default_rng(0).random((side, side, 3)) * 255).astype(np.uint8)
    Image.fromarray(control).save(tmp_path / "edges.png")
    txt2img.main([PROMPTS[0], "--model", str(root / "model"), "--steps", "3", "--controlnet", str(root / "cn"),
                  "--control-image", str(tmp_path / "edges.png"), "--control-scale", "0.8",
                  "--decoder-precision", "fp32", "--out", str(tmp_path / "ours.png")])
    pipe = TextToImage.from_folder(str(root / "model"))
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(3), pipe.latent_shape(1),
                          generator=torch.Generator().manual_seed(0))
    cn_pipe = diffusers.StableDiffusionControlNetPipeline(**theirs.components, controlnet=net)
    on_our_grid(cn_pipe)
    image = torch.from_numpy(control.astype(np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        reference = cn_pipe(PROMPTS[0], image=image, controlnet_conditioning_scale=0.8, num_inference_steps=3,
                            guidance_scale=1 + pipe.index.guidance, latents=noise, output_type="np").images[0]
    ours = np.asarray(Image.open(tmp_path / "ours.png"), dtype=np.int16)
    assert np.abs(ours - np.round(reference * 255)).max() <= 1              # PNG rounding
    plain, _ = pipe.generate([PROMPTS[0]], steps=3, seed=0)
    assert np.abs(ours - np.asarray(((plain[0] * 0.5 + 0.5).clamp(0, 1) * 255).round().permute(1, 2, 0))).max() > 8
    with pytest.raises(SystemExit):
        txt2img.main([PROMPTS[0], "--model", str(root / "model"), "--controlnet", str(root / "cn")])
    assert "--controlnet and --control-image go together" in capsys.readouterr().err
    # two ControlNets add up: the same one twice at 0.4 each is it once at 0.8
    txt2img.main([PROMPTS[0], "--model", str(root / "model"), "--steps", "3", "--decoder-precision", "fp32",
                  *["--controlnet", str(root / "cn"), "--control-image", str(tmp_path / "edges.png")] * 2,
                  "--control-scale", "0.4", "--out", str(tmp_path / "twice.png")])
    assert np.abs(np.asarray(Image.open(tmp_path / "twice.png"), dtype=np.int16) - ours).max() <= 1
    unit = 'Model: cn, Weight: 0.4, Guidance Start: 0, Guidance End: 1"'   # the A1111 ControlNet extension's units
    assert f'ControlNet 0: "{unit}, ControlNet 1: "{unit}' in Image.open(tmp_path / "twice.png").text["parameters"]
    with pytest.raises(SystemExit):
        txt2img.main([PROMPTS[0], "--model", str(root / "model"), "--controlnet", str(tmp_path),
                      "--control-image", str(tmp_path / "edges.png")])
    assert "not a diffusers ControlNetModel folder" in capsys.readouterr().err


def test_a_hub_name_is_looked_up_and_named_when_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="(?s)not downloadable .* and not in the local Hugging Face cache"):
        load_diffusers_controlnet("nobody/no-such-controlnet")
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub repo id"):
        load_diffusers_controlnet(str(tmp_path / "nowhere"))


def test_a_controlnet_made_from_our_unet_is_diffusers_from_unet(setup, one_thread):
    """ControlNet.from_unet against diffusers' ControlNetModel.from_unet on the same U-Net: the encoder copied,
    the zero convolutions and the hint encoder's last conv zero (the hint encoder's other convs are random)."""
    root, theirs, _ = setup
    pipe = TextToImage.from_folder(str(root / "model"))
    ours = ControlNet.from_unet(pipe.unet, latent_factor=pipe.autoencoder.config.downsample_factor)
    reference = controlnet_state_from_diffusers(
        diffusers.ControlNetModel.from_unet(theirs.unet, conditioning_embedding_out_channels=(16, 32)).state_dict(),
        len(pipe.unet.cfg.channels))
    state = ours.state_dict()
    assert state.keys() == reference.keys()
    random_hint = [k for k in state if k.startswith("hint.") and not k.startswith("hint.conv_out.")]
    assert random_hint and all(torch.equal(state[k], reference[k]) for k in state if k not in random_hint)
    assert all(state[k].abs().sum() == 0 for k in state if k.startswith(("zero_", "hint.conv_out.")))


def test_saved_controlnets_load_in_diffusers_and_back(setup, tmp_path, one_thread):
    """save_controlnet: an SD-architecture ControlNet as a diffusers folder that ControlNetModel.from_pretrained
    reads to the same residuals; a U-Net diffusers cannot hold (position features) in our layout."""
    root, _, _ = setup
    pipe = TextToImage.from_folder(str(root / "model"))
    ours = ControlNet.from_unet(pipe.unet, latent_factor=2)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)                   # non-zero zero convolutions, as after training
    assert save_controlnet(ours, str(tmp_path / "sd"), sample_size=8) == "diffusers"
    theirs = diffusers.ControlNetModel.from_pretrained(str(tmp_path / "sd"))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([10.0, 700.0])
    context = torch.randn(2, 77, TINY.unet["cross_attention_dim"], generator=g)
    hint = torch.rand(2, 3, 16, 24, generator=g)
    with torch.no_grad():
        down, mid = theirs(x, t, context, hint, return_dict=False)
        for net in (ours, load_controlnet(str(tmp_path / "sd"))):
            our_down, our_mid = net(x, t, context, hint)
            for a, b in zip(our_down, down):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(our_mid, mid, atol=1e-5, rtol=1e-5)

    from ldm.models.unet import UNet
    positional = UNet(dataclasses.replace(pipe.unet.cfg, pos_embed=True))
    net = ControlNet.from_unet(positional, latent_factor=4)
    assert net.hint_widths == (16, 32, 96)
    assert save_controlnet(net, str(tmp_path / "ours")) == "ours"
    again = load_controlnet(str(tmp_path / "ours"))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())


def test_control_steps_map_net_times_to_diffusers_keep():
    """Step i of n acts when i / n >= start and (i + 1) / n <= end; a time between grid points (Heun's, DPM
    solvers' inner evaluations) belongs to the step it falls in; float32 net times still find their step."""
    grid = torch.tensor([999.0, 749.0, 499.0, 249.0], dtype=torch.float64)
    steps = ControlSteps([(0.25, 0.75), (0.0, 0.5), (0.0, 1.0)], grid)
    on = [steps(torch.tensor([t], dtype=torch.float32)) for t in grid.tolist()]
    assert on == [[False, True, True], [True, True, True], [True, False, True], [False, False, True]]
    assert [steps.step(torch.tensor(t)) for t in (999.5, 998.9999, 600.0, 250.0, 248.0, 0.0)] == [0, 0, 1, 2, 3, 3]
    # a rectified-flow grid of t in [0, 1] the net sees as float32 1000 t: 1000 * float32(5/6) < 1000 * 5/6
    flow = torch.arange(6, 0, -1, dtype=torch.float64) / 6
    steps = ControlSteps([(0.0, 1.0)], flow * 1000)
    assert [steps.step(t.float() * 1000) for t in flow] == list(range(6))
    with pytest.raises(ValueError, match="start < end"):
        ControlSteps([(0.5, 0.5)], grid)
    from ldm.cli import parse_control_range
    assert parse_control_range("0:0.6") == (0.0, 0.6)
    with pytest.raises(argparse.ArgumentTypeError, match="START < END"):
        parse_control_range("0.6:0.2")


def test_control_range_equals_diffusers_control_guidance_start_end(setup, tmp_path, one_thread):
    """sample(control_range=[(0.25, 0.75)]) over 4 steps (the ControlNet acts on steps 1 and 2) = diffusers'
    StableDiffusionControlNetPipeline with control_guidance_start=0.25, end=0.75; 0:1 is the plain control
    exactly; --control-range reaches the PNG and --replay draws it again."""
    from ldm import txt2img
    root, theirs, net = setup
    side, steps = TINY.image, 4
    control = (np.random.default_rng(0).random((side, side, 3)) * 255).astype(np.uint8)
    Image.fromarray(control).save(tmp_path / "edges.png")
    image = torch.from_numpy(control.astype(np.float32) / 255).permute(2, 0, 1)[None]
    pipe = TextToImage.from_folder(str(root / "model"), decoder_precision="fp32")
    ours_net = load_controlnet(str(root / "cn"))
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(steps), pipe.latent_shape(1),
                          generator=torch.Generator().manual_seed(0))
    cn_pipe = on_our_grid(diffusers.StableDiffusionControlNetPipeline(**theirs.components, controlnet=net))
    call = dict(image=image, controlnet_conditioning_scale=0.8, num_inference_steps=steps,
                guidance_scale=1 + pipe.index.guidance, latents=noise, output_type="pt")
    with torch.no_grad():
        reference = cn_pipe(PROMPTS[0], control_guidance_start=0.25, control_guidance_end=0.75, **call).images
        throughout = cn_pipe(PROMPTS[0], **call).images
    control_list = [(ours_net, image, 0.8)]
    ours, _ = pipe.generate([PROMPTS[0]], steps=steps, seed=0, control=control_list, control_range=[(0.25, 0.75)])
    ours = ours * 0.5 + 0.5
    diff = (ours - reference).abs().max().item()
    print(f"control range 0.25:0.75, max |ours - diffusers| = {diff:.2e}")
    assert diff < 1e-5
    assert (ours - throughout).abs().max() > 1e-2                             # the range mattered
    full, _ = pipe.generate([PROMPTS[0]], steps=steps, seed=0, control=control_list, control_range=[(0, 1)])
    plain, _ = pipe.generate([PROMPTS[0]], steps=steps, seed=0, control=control_list)
    assert torch.equal(full, plain)

    out = tmp_path / "ranged.png"
    txt2img.main([PROMPTS[0], "--model", str(root / "model"), "--steps", str(steps), "--controlnet", str(root / "cn"),
                  "--control-image", str(tmp_path / "edges.png"), "--control-scale", "0.8", "--control-range",
                  "0.25:0.75", "--decoder-precision", "fp32", "--out", str(out)])
    drawn = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(drawn - np.round(reference[0].permute(1, 2, 0).numpy() * 255)).max() <= 1
    assert json.loads(Image.open(out).text["ldm"])["control_range"] == [[0.25, 0.75]]
    assert 'ControlNet 0: "Model: cn, Weight: 0.8, Guidance Start: 0.25, Guidance End: 0.75"' in \
        Image.open(out).text["parameters"]
    txt2img.main(["--replay", str(out), "--decoder-precision", "fp32", "--out", str(tmp_path / "again.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png"), dtype=np.int16), drawn)
