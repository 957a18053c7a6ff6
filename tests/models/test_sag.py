"""Self-attention guidance (Hong et al. 2023) on the U-Net side: the middle block's recorded map against softmax(Q K^T)
by hand, the blur against torchvision's, and our pipeline's images against diffusers' StableDiffusionSAGPipeline on a
tiny random SD pipeline converted with our importer, from the same noise and DDIM grid."""
import pytest
import torch
import torch.nn.functional as F

from sd_layouts import PROMPTS, diffusers_images, write_sd_pipeline

from ldm.diffusion.sag import attention_mask, gaussian_blur
from ldm.models.from_diffusers import convert
from ldm.models.unet import UNet, recorded_attention, sag_attention, tiny_config
from ldm.pipeline import TextToImage

diffusers = pytest.importorskip("diffusers")


def test_recorded_map_is_the_mid_self_attention_by_hand():
    """Each U-Net call records (B, h, w): softmax(q k^T / sqrt(d)) of the middle block's first self-attention, from
    its own input tokens, summed over queries and averaged over heads; the tokens average 1; hooks gone after."""
    torch.manual_seed(0)
    unet = UNet(tiny_config(transformer_depth=2)).eval()
    transformer, attn = sag_attention(unet)
    assert attn is unet.mid.attn.blocks[0].attn1 and transformer is unet.mid.attn
    seen = []
    handle = attn.register_forward_hook(lambda m, args, out: seen.append(args[0]))   # the tokens attn1 saw
    x, context = torch.randn(3, 4, 16, 8), torch.randn(3, 5, 32)
    with torch.no_grad(), recorded_attention(unet) as maps:
        unet(x, torch.tensor([100.0, 500.0, 900.0]), context)
    handle.remove()
    assert len(maps) == 1 and maps[0].shape == (3, 8, 4)          # the middle block's 8 x 4 tokens of a 16 x 8 latent
    tokens = seen[0]
    B, N, _ = tokens.shape
    q = (tokens @ attn.to_q.weight.T).view(B, N, attn.heads, -1).permute(0, 2, 1, 3)
    k = (tokens @ attn.to_k.weight.T).view(B, N, attn.heads, -1).permute(0, 2, 1, 3)
    probs = F.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / q.shape[-1] ** 0.5, dim=-1)
    torch.testing.assert_close(maps[0].flatten(1), probs.mean(1).sum(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps[0].mean((1, 2)), torch.ones(3), atol=1e-5, rtol=0)
    assert maps[0].std() > 0.01                                   # not uniform: the mask has something to pick
    assert not attn._forward_pre_hooks and not transformer._forward_pre_hooks


def test_a_unet_without_mid_attention_is_refused():
    unet = UNet(tiny_config(mid_attention=False))
    with pytest.raises(ValueError, match="no transformer in its middle block"):
        sag_attention(unet)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_blur_is_torchvision_gaussian_blur(sigma):
    tvf = pytest.importorskip("torchvision.transforms.functional")
    x = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gaussian_blur(x, sigma), tvf.gaussian_blur(x, [9, 9], [sigma, sigma]),
                               atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="reflects 4 latent pixels"):
        gaussian_blur(torch.randn(1, 4, 4, 4))


def test_mask_threshold_and_nearest_upsampling():
    received = torch.tensor([[[0.5, 1.5], [1.0, 2.0]]])         # 1.0 itself is not above the threshold
    mask = attention_mask(received, (4, 4))
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)
    expected[2:, :2] = 0
    assert torch.equal(mask[0, 0], expected)


@pytest.mark.parametrize("w,scale,negative", [
    (3.0, 0.75, ""),
    (2.0, 1.0, "a dog"),
    (0.0, 0.75, ""),
], ids=["cfg-0.75", "cfg-1.0-negative", "sag-alone"])
def test_sag_draws_what_diffusers_sag_pipeline_draws(tmp_path, one_thread, w, scale, negative):
    """StableDiffusionSAGPipeline (sag_scale; its guidance_scale is our 1 + w) on the same tiny random SD pipeline
    (an eps net), same noise and DDIM grid: same images; 3 net calls a step with CFG, 2 without."""
    plain_sd = write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    steps = 4
    images, info = pipe.generate(PROMPTS, steps=steps, guidance=w, seed=0, sag_scale=scale, negative=negative)
    assert info["nfe"] == (3 if w else 2) * steps
    theirs = diffusers.StableDiffusionSAGPipeline(**plain_sd.components)
    reference = diffusers_images(theirs, pipe, PROMPTS, steps, 1 + w, sag_scale=scale,
                                 negative_prompt=[negative] * len(PROMPTS) if negative else None)
    assert reference.std() > 0.05
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=2e-5, rtol=0)
    plain, _ = pipe.generate(PROMPTS, steps=steps, guidance=w, seed=0, negative=negative)
    assert (images - plain).abs().max() > 0.02                      # SAG changed the images
    zero, info0 = pipe.generate(PROMPTS, steps=steps, guidance=w, seed=0, negative=negative, sag_scale=0.0)
    assert torch.equal(zero, plain) and info0["nfe"] == (2 if w else 1) * steps


def test_sdxl_import_runs_sag_with_its_added_conditioning(tmp_path, one_thread):
    """An imported tiny SDXL (pooled text and size numbers in both halves, two transformer blocks in the middle):
    SAG reads the first block's map; scale 0 is exactly CFG; 3 calls a step; the negative prompt's numbers go to
    the degraded pass as its unconditional half (diffusers has no SDXL SAG pipeline to compare with)."""
    from sd_layouts import write_sdxl_pipeline
    write_sdxl_pipeline(tmp_path)
    convert(str(tmp_path / "sdxl"), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    assert len(pipe.unet.mid.attn.blocks) == 2 and sag_attention(pipe.unet)[1] is pipe.unet.mid.attn.blocks[0].attn1
    plain, info = pipe.sample(PROMPTS, steps=3, guidance=4.0, negative="blurry")
    zero, _ = pipe.sample(PROMPTS, steps=3, guidance=4.0, negative="blurry", sag_scale=0.0)
    guided, info_sag = pipe.sample(PROMPTS, steps=3, guidance=4.0, negative="blurry", sag_scale=0.75)
    assert torch.equal(zero, plain) and info["nfe"] == 6 and info_sag["nfe"] == 9
    assert (guided - plain).abs().max() > 1e-3 and torch.isfinite(guided).all()
