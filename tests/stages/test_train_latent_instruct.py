"""Stage 2 with image_input=instruct-pix2pix at tiny size: the widened input conv starts as the text-to-image net,
a run on shapes-edits triples writes a model folder that TextToImage.edit samples, and bad settings are refused."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from stage_scripts import load_stage, train_latent

from ldm.instruct_pix2pix import widen_input
from ldm.models.unet import UNet, UNetConfig
from ldm.pipeline import TextToImage, load_index

stage = load_stage("train_latent")
pytestmark = pytest.mark.usefixtures("one_thread_module")
INSTRUCT = ["data.source=shapes-edits", "image_input=instruct-pix2pix", "unet.in_channels=8"]


run = train_latent          # stages/train_latent.py on configs/latent/tiny.yaml (tests/stage_scripts.py)


def test_widened_input_conv_is_the_original_net_while_the_image_weights_are_zero():
    """Conv is linear in its input channels: W' [x; c] = W x + 0 c (sec. 3.2.1's zero init), for any c; once the
    image weights move, the image matters, and the zero image still gives the original net (closed form)."""
    torch.manual_seed(0)
    cfg = dict(out_channels=4, channels=(16, 32), layers_per_block=1, attention_levels=(1,), num_heads=2,
               context_dim=32, norm_groups=8)
    base, wide = UNet(UNetConfig(in_channels=4, **cfg)).eval(), UNet(UNetConfig(in_channels=8, **cfg)).eval()
    state = base.state_dict()
    state["conv_in.weight"] = widen_input(state["conv_in.weight"], 8)
    wide.load_state_dict(state)
    x, image, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        ref = base(x, t, ctx)
        assert torch.equal(wide(torch.cat([x, torch.zeros_like(x)], 1), t, ctx), ref)
        assert torch.equal(wide(torch.cat([x, image], 1), t, ctx), ref)
        wide.conv_in.weight[:, 4:].normal_()
        assert torch.allclose(wide(torch.cat([x, torch.zeros_like(x)], 1), t, ctx), ref, atol=1e-6)
        assert not torch.allclose(wide(torch.cat([x, image], 1), t, ctx), ref, atol=1e-3)
    with pytest.raises(ValueError, match="cannot widen"):
        widen_input(state["conv_in.weight"], 2)


def test_instruct_run_from_a_text_to_image_folder_writes_a_model_that_edits(tiny_ae, tmp_path):
    common = ["cache_latents=false", "train.ema_decay=0"]
    t2i = run(tiny_ae, tmp_path / "t2i", *common, "train.max_steps=1")
    # lr 0: the exported net is the text-to-image one with zero image channels
    still = run(tiny_ae, tmp_path / "still", *common, *INSTRUCT, f"init_from={t2i}", "train.max_steps=1",
                "train.lr=0")
    src, out = (load_file(str(f / "unet" / "model.safetensors")) for f in (t2i, still))
    assert out["conv_in.weight"].shape[1] == 8 and torch.equal(out["conv_in.weight"][:, :4], src["conv_in.weight"])
    assert not out["conv_in.weight"][:, 4:].any()
    assert all(torch.equal(out[k], src[k]) for k in src if k != "conv_in.weight")

    folder = run(tiny_ae, tmp_path / "edit", *common, *INSTRUCT, f"init_from={t2i}", "train.max_steps=2",
                 "train.lr=1e-2")
    assert load_index(str(folder)).image_input == "instruct-pix2pix"
    trained = load_file(str(folder / "unet" / "model.safetensors"))["conv_in.weight"][:, 4:]
    assert trained.abs().max() > 1e-3                                    # the image channels learned something
    pipe = TextToImage.from_folder(str(folder))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    edited, info = pipe.edit(images, ["make the circle blue", "make the background white"], steps=2,
                             image_guidance=1.5)
    assert edited.shape == (2, 3, 32, 32) and torch.isfinite(edited).all()
    assert info["nfe"] == 6 and info["image_guidance"] == 1.5                 # eq. 3: three calls a step
    with pytest.raises(ValueError, match="edits an image"):
        pipe.generate(["a red circle"], steps=2)


@pytest.mark.parametrize("overrides,match", [
    (["image_input=instruct-pix2pix"], "set both image_input=instruct-pix2pix and data.source=shapes-edits"),
    (["data.source=shapes-edits"], "set both image_input=instruct-pix2pix and data.source=shapes-edits"),
    ([*INSTRUCT, "cache_latents=true"], "cache_latents=false"),
    (["data.source=shapes-edits", "image_input=instruct-pix2pix"], "takes 8 input channels"),
])
def test_refusals_name_the_keys(tiny_ae, tmp_path, capsys, overrides, match):
    with pytest.raises((SystemExit, ValueError)) as err:
        run(tiny_ae, tmp_path / "bad", "train.max_steps=1", *overrides)
    assert match in (capsys.readouterr().err if err.type is SystemExit else str(err.value))


def test_instruct_run_resumes_exactly(tiny_ae, tmp_path):
    """The image dropout draws from the checkpointed global RNG: 2 + 2 steps equal 4 steps, bit for bit."""
    from ldm.training import find_latest_checkpoint
    common = ["cache_latents=false", *INSTRUCT, "p_uncond=0.3", "train.checkpoint_every=2"]
    run(tiny_ae, tmp_path / "straight", *common, "train.max_steps=4")
    run(tiny_ae, tmp_path / "resumed", *common, "train.max_steps=2")
    run(tiny_ae, tmp_path / "resumed", *common, "train.max_steps=4", "--resume", "latest")
    a, b = (load_file(str(find_latest_checkpoint(tmp_path / r) / "model.safetensors")) for r in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
