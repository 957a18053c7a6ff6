"""Perturbed-attention guidance (Ahn et al. 2024) on the U-Net side: the identity self-attention, the layers by
name, the per-sample switch, and our pipeline's images against diffusers' StableDiffusionPAGPipeline on a tiny
random SD pipeline converted with our importer, from the same noise."""
import pytest
import torch
import torch.nn.functional as F

from sd_layouts import PROMPTS, diffusers_images, write_sd_pipeline

from ldm import ops
from ldm.models.from_diffusers import convert
from ldm.models.layers import Attention
from ldm.models.unet import (UNet, layer_names, perturbed_self_attention, self_attention_layers, tiny_config,
                             transformers_by_name)
from ldm.pipeline import TextToImage

diffusers = pytest.importorskip("diffusers")


def random_attention(dim=32, heads=2, head_dim=16, seed=0):
    torch.manual_seed(seed)
    attn = Attention(dim, None, heads, head_dim)
    with torch.no_grad():
        attn.to_out.bias.normal_()          # nn.Linear's bias starts small: make it count
    return attn


def reference_attention(attn, x):
    """softmax(q k^T / sqrt(d)) v per head, by hand from the module's weights."""
    B, N, _ = x.shape
    q, k, v = (F.linear(x, lin.weight).view(B, N, attn.heads, -1).transpose(1, 2)
               for lin in (attn.to_q, attn.to_k, attn.to_v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return F.linear((weights @ v).transpose(1, 2).reshape(B, N, -1), attn.to_out.weight, attn.to_out.bias)


def test_perturbed_self_attention_is_out_proj_of_v_proj():
    """The identity map: every token's output is W_o (W_v x) + b_o; the unperturbed samples attend as usual."""
    attn = random_attention()
    x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(1))
    attn.identity = torch.tensor([False, True, False])
    out = attn(x)
    identity = x[1] @ attn.to_v.weight.T @ attn.to_out.weight.T + attn.to_out.bias     # (N, C)
    torch.testing.assert_close(out[1], identity, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[[0, 2]], reference_attention(attn, x[[0, 2]]), atol=1e-5, rtol=1e-5)
    assert (out[1] - reference_attention(attn, x[1:2])[0]).abs().max() > 0.1           # the map mattered


def test_identity_path_runs_no_attention_kernel(monkeypatch):
    """The perturbed samples never reach ldm.ops.attention, so Triton, SDPA or any backend give the same."""
    attn = random_attention()
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    expected = attn.to_out(attn.to_v(x))

    def refuse(*args, **kwargs):
        raise AssertionError("the identity path called an attention kernel")
    monkeypatch.setattr(ops, "attention", refuse)
    attn.identity = torch.ones(2, dtype=torch.bool)
    torch.testing.assert_close(attn(x), expected, atol=0, rtol=0)


def test_cross_attention_refuses_the_identity():
    torch.manual_seed(0)
    attn = Attention(32, 16, 2, 16)
    attn.identity = torch.ones(1, dtype=torch.bool)
    with pytest.raises(ValueError, match="cross-attention"):
        attn(torch.randn(1, 4, 32), torch.randn(1, 3, 16))


def test_layers_by_name_match_diffusers_block_numbers():
    """down.L counts from the full resolution, up.L in the decoder's running order (deepest first), as diffusers'
    down_blocks / up_blocks; only self-attentions (attn1) are picked; diffusers' spellings read alike."""
    unet = UNet(tiny_config(channels=(32, 64, 64), attention_levels=(1, 2), transformer_depth=(1, 1, 2)))
    names = transformers_by_name(unet)
    assert list(names) == ["down.1.0", "down.2.0", "mid.0", "up.0.0", "up.0.1", "up.1.0", "up.1.1"]
    assert names["up.0.0"] is unet.up[2].attn[0] and names["up.1.1"] is unet.up[1].attn[1]
    assert "down" in layer_names(unet) and "up.1" in layer_names(unet) and "down.0" not in layer_names(unet)
    mid = self_attention_layers(unet, ["mid"])
    assert mid == [block.attn1 for block in unet.mid.attn.blocks] and len(mid) == 2       # depth 2 at level 2
    up0 = self_attention_layers(unet, ["up.0"])
    assert up0 == [b.attn1 for t in unet.up[2].attn for b in t.blocks]
    assert self_attention_layers(unet, ["up_blocks.0"]) == up0
    assert self_attention_layers(unet, ["down_blocks.1.attentions.0", "mid_block"]) == \
        [unet.down[1].attn[0].blocks[0].attn1, *mid]
    assert self_attention_layers(unet, ["up.1.1"]) == [unet.up[1].attn[1].blocks[0].attn1]
    assert len(self_attention_layers(unet, ["mid", "mid.0"])) == 2                          # no duplicates
    every = self_attention_layers(unet, ["down", "mid", "up"])
    assert all(a.to_k.in_features == a.to_q.in_features for a in every) and len(every) == 3 + 2 + 6
    for bad in ("down.0", "middle", "up.5"):
        with pytest.raises(ValueError, match=r"no self-attention layer .*its layers: down, down\.1, down\.1\.0"):
            self_attention_layers(unet, [bad])


def test_the_switch_perturbs_the_chosen_samples_and_turns_off():
    torch.manual_seed(0)
    unet = UNet(tiny_config()).eval()
    x = torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1)
    t, context = torch.tensor([500.0, 500.0]), torch.randn(1, 5, 32).expand(2, -1, -1)
    with torch.no_grad():
        plain = unet(x, t, context)
        layers = self_attention_layers(unet, ["mid"])
        with perturbed_self_attention(layers, torch.tensor([False, True])):
            mixed = unet(x, t, context)
        assert all(a.identity is None for a in layers)
        torch.testing.assert_close(mixed[0], plain[0], atol=1e-5, rtol=1e-5)
        assert (mixed[1] - plain[1]).abs().max() > 1e-3
        with pytest.raises(RuntimeError), perturbed_self_attention(layers, torch.tensor([True, True])):
            raise RuntimeError("a failing call")
        assert all(a.identity is None for a in layers)                              # off after an error too
        torch.testing.assert_close(unet(x, t, context), plain, atol=0, rtol=0)


@pytest.mark.parametrize("w,scale,ours,theirs,rescale", [
    (3.0, 2.5, ["mid", "down.1"], ["mid", "down_blocks.1"], 0.0),
    (3.0, 2.0, ["up.0"], ["up_blocks.0"], 0.7),
    (0.0, 3.0, ["mid", "up.0"], ["mid", "up_blocks.0"], 0.0),
], ids=["cfg-mid-down1", "cfg-up0-rescale", "pag-alone-mid-up0"])
def test_pag_draws_what_diffusers_pag_pipeline_draws(tmp_path, one_thread, w, scale, ours, theirs, rescale):
    """StableDiffusionPAGPipeline (pag_scale, pag_applied_layers; its guidance_scale is our 1 + w) on the same tiny
    random SD pipeline, same noise and grid: same images; 3 net calls a step with CFG, 2 without."""
    plain_sd = write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    steps = 4
    images, info = pipe.generate(PROMPTS, steps=steps, guidance=w, seed=0, pag_scale=scale, pag_layers=ours,
                                 guidance_rescale=rescale)
    assert info["nfe"] == (3 if w else 2) * steps
    theirs_pipe = diffusers.StableDiffusionPAGPipeline(**plain_sd.components, pag_applied_layers=theirs)
    reference = diffusers_images(theirs_pipe, pipe, PROMPTS, steps, 1 + w, pag_scale=scale, guidance_rescale=rescale)
    assert reference.std() > 0.05
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=2e-5, rtol=0)     # measured: at most 7e-7
    plain, _ = pipe.generate(PROMPTS, steps=steps, guidance=w, seed=0, guidance_rescale=rescale)
    assert (images - plain).abs().max() > 0.05                       # PAG changed the images (0.16 to 0.26 here)
