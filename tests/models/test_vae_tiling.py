"""Exact tiled VAE decode and encode (ldm.models.vae_tiling): equal to the untiled network within float rounding
(fp32, float64 references, diffusers' untiled AutoencoderKL), in bf16/fp16 within the untiled path's own error,
and through the pipeline and CLI on the shipped model. Also measures how far diffusers' blended tiles are."""
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from sd_layouts import perturb

from ldm.bench_models import TINY
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.convert_ae import load_diffusers_autoencoder
from ldm.models.vae_tiling import AUTO_TILE, GroupStats, parse_tiling, tile_for

CONFIGS = {
    # f = 4, mid attention, quant convs, 8 groups of 2-4 channels
    "attn-quant-3-levels": dict(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, num_groups=8),
    # f = 2, no attention, no quant convs, 6 groups of 4-8 channels, 3 latent channels, 1x1 skips
    "plain-2-levels": dict(base_channels=24, channel_mult=(1, 2), num_res_blocks=2, z_channels=3, num_groups=6,
                           mid_attn=False, use_quant_conv=False),
}
LATENT = (13, 9)                                       # odd sides: tiles never divide them
pytestmark = pytest.mark.usefixtures("one_thread_module")   # hundreds of small convs: threads only spin


def random_autoencoder(name: str, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return perturb(AutoencoderKL(AutoencoderConfig(**CONFIGS[name])).eval(), seed)


def latents(ae: AutoencoderKL, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, ae.config.z_channels, *LATENT, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, one_thread_module):
    """(config name, autoencoder, latents, untiled fp32 image, float64 image)."""
    ae = random_autoencoder(request.param)
    z = latents(ae)
    with torch.no_grad():
        plain = ae.decode(z)
        exact = random_autoencoder(request.param).double().decode(z.double())
    return request.param, ae, z, plain, exact


# ----------------------------------------------------------------------------
# fp32: the tiled network equals the untiled one.

@pytest.mark.parametrize("tile_latents", [4, 1.75, 0.75])   # 4 latents; 7 and 3 px (not multiples of f)
def test_tiled_decode_equals_untiled(pair, tile_latents):
    _, ae, z, plain, exact = pair
    tile = round(tile_latents * ae.config.downsample_factor)
    with torch.no_grad():
        tiled = ae.decode(z, tile=tile)
    torch.testing.assert_close(tiled, plain, atol=1e-5, rtol=1e-5)
    # as close to the float64 network as the untiled fp32 one is (the GroupNorm statistics merge in float64)
    assert (tiled - exact).abs().max() <= 2 * (plain - exact).abs().max() + 1e-6


def test_one_tile_is_the_plain_path(pair):
    _, ae, z, plain, _ = pair
    side = ae.config.downsample_factor * max(LATENT)
    with torch.no_grad():
        assert torch.equal(ae.decode(z, tile=side), plain)
        assert torch.equal(ae.decode(z, tile=10_000), plain)


def test_channels_last_decode(pair):
    """As the pipeline decodes on a CPU: weights and latents channels_last."""
    _, ae, z, plain, _ = pair
    twin = random_autoencoder(next(k for k in CONFIGS if CONFIGS[k]["base_channels"] == ae.config.base_channels))
    twin.to(memory_format=torch.channels_last)
    with torch.no_grad():
        tiled = twin.decode(z.contiguous(memory_format=torch.channels_last), tile=4 * ae.config.downsample_factor)
    torch.testing.assert_close(tiled, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiled_encode_equals_untiled(name):
    ae = random_autoencoder(name)
    f = ae.config.downsample_factor
    # odd image sides: the Downsample's right/bottom pad and stride-2 windows cross tiles unaligned
    x = torch.randn(2, 3, 13 * f + 1, 9 * f - 1, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ae.encode(x)
        for tile in (4 * f, 5):
            got = ae.encode(x, tile=tile)
            torch.testing.assert_close(got.mean, want.mean, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.logvar, want.logvar, atol=1e-5, rtol=1e-5)
        assert torch.equal(ae.encode(x, tile=14 * f).mean, want.mean)


def test_latent_scaling_and_encode_latents():
    ae = random_autoencoder("attn-quant-3-levels")
    ae.config.scaling_factor, ae.config.shift_factor = 0.3, 0.1
    x = torch.randn(1, 3, 40, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z = ae.encode_latents(x, sample=False)
        torch.testing.assert_close(ae.encode_latents(x, sample=False, tile=16), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ae.decode_latents(z, tile=16), ae.decode_latents(z), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# bf16 / fp16: within the untiled path's own error in that dtype.

def test_bf16_autocast_decode_is_as_accurate_as_untiled(pair):
    """TextToImage.decode's bf16 autocast on a CPU."""
    _, ae, z, plain, _ = pair
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        untiled = ae.decode(z).float()
        tiled = ae.decode(z, tile=4 * ae.config.downsample_factor)
    assert tiled.dtype == torch.bfloat16
    error, own = (tiled.float() - plain).abs().max(), (untiled - plain).abs().max()
    assert error <= 2 * own + 1e-3, (error, own)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_fp16_latents_follow_fp16_decode_dtype(compute):
    """AutoencoderKL.decode's fp16 guard: fp16 latents computed in fp16_decode_dtype, fp16 images out."""
    ae = random_autoencoder("attn-quant-3-levels")
    ae.config.fp16_decode_dtype = compute
    z = latents(ae)
    with torch.no_grad():
        reference = ae.decode(z.half().float())
        untiled, tiled = ae.decode(z.half()), ae.decode(z.half(), tile=16)
    assert tiled.dtype == torch.float16
    error, own = (tiled.float() - reference).abs().max(), (untiled.float() - reference).abs().max()
    assert error <= 2 * own + 1e-3, (error, own)


# ----------------------------------------------------------------------------
# The pieces: GroupNorm statistics, settings.

def test_group_stats_merge_tiles_soundly():
    """Per (sample, group) mean and variance over uneven tiles equal float64's, even with |mean| >> std
    (where fp32 E[x^2] - E[x]^2 loses every digit)."""
    g = torch.Generator().manual_seed(4)
    x = 1000.0 + 0.1 * torch.randn(2, 12, 23, 17, generator=g)
    stats = GroupStats(3)
    for a, b in ((0, 5), (5, 6), (6, 23)):
        for c, d in ((0, 10), (10, 17)):
            stats.add(x[:, :, a:b, c:d])
    grouped = x.double().view(2, 3, -1)
    assert stats.n == grouped.shape[-1]
    torch.testing.assert_close(stats.mean, grouped.mean(-1), atol=0, rtol=1e-7)
    var = grouped.var(-1, correction=0)
    torch.testing.assert_close(stats.m2 / stats.n, var, atol=0, rtol=1e-4)           # measured 8e-6
    flat = x.view(2, 3, -1)
    naive = flat.square().mean(-1) - flat.mean(-1).square()
    assert ((naive - var) / var).abs().max() > 1                                     # measured 37


def test_settings():
    assert parse_tiling("AUTO") == "auto" and parse_tiling(512) == "512"
    for bad in ("0", "-8", "big", "1.5"):
        with pytest.raises(ValueError, match=repr(bad)):
            parse_tiling(bad)
    assert tile_for("off", torch.device("cpu"), 4096, 4096) is None
    assert tile_for("96", "cpu", 64, 64) == 96
    assert tile_for("auto", "cpu", 4096, 4096) is None                          # auto tiles on CUDA only
    assert tile_for("auto", "cuda", 1024, 1024) is None                         # 1 Mpx fits
    assert tile_for("auto", "cuda", 2048, 2048) == AUTO_TILE
    ae = random_autoencoder("plain-2-levels")
    with pytest.raises(ValueError, match="tile must be a positive number of pixels, got -4"):
        ae.decode(latents(ae), tile=-4)


# ----------------------------------------------------------------------------
# An imported SD-layout autoencoder against diffusers.

def test_imported_sd_autoencoder_matches_diffusers_untiled(tmp_path):
    """Ours, tiled, equals diffusers' untiled decode; diffusers' own enable_tiling() is printed for scale."""
    torch.manual_seed(0)
    theirs = perturb(DiffusersAutoencoderKL(**TINY.vae).eval())                  # f = 2, 32 px tiles when tiled
    theirs.save_pretrained(tmp_path / "vae")
    ours = load_diffusers_autoencoder(tmp_path / "vae")
    z = torch.randn(2, 4, 34, 18, generator=torch.Generator().manual_seed(5))    # 68 x 36 px
    with torch.no_grad():
        want = theirs.decode(z).sample
        got = ours.decode(z, tile=20)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        theirs.enable_tiling()
        blended = theirs.decode(z).sample
    gap = (blended - want).abs()
    print(f"\nours tiled (20 px) vs diffusers untiled: max {(got - want).abs().max():.2e}; diffusers enable_tiling() "
          f"vs untiled: max {gap.max():.3f}, mean {gap.mean():.4f} (image std {want.std():.3f})")
    assert gap.max() > 100 * (got - want).abs().max()


# ----------------------------------------------------------------------------
# The pipeline and the CLI on the shipped model.

def test_pipeline_img2img_tiled_equals_untiled():
    """Encode (img2img) and decode in 24-px tiles on the shipped 64-px model: the same images."""
    from ldm.pipeline import TextToImage
    pipe = TextToImage.from_folder(decoder_precision="fp32")
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6)) * 2 - 1
    runs = {}
    for setting in ("off", "24"):
        pipe.vae_tiling = setting
        runs[setting], _ = pipe.img2img(image, ["a red circle"], strength=0.5, steps=4)
    torch.testing.assert_close(runs["24"], runs["off"], atol=1e-5, rtol=0)


def test_cli_vae_tiling(tmp_path):
    import numpy as np
    from PIL import Image

    from ldm.cli import load_pipeline
    from ldm.txt2img import build_parser, main
    parser = build_parser()
    assert load_pipeline(parser, parser.parse_args(["a red circle", "--vae-tiling", "32"])).vae_tiling == "32"
    with pytest.raises(SystemExit):
        parser.parse_args(["a red circle", "--vae-tiling", "0"])
    paths = {}
    for setting in ("off", "32"):
        paths[setting] = tmp_path / f"{setting}.png"
        main(["a red circle", "--steps", "1", "--decoder-precision", "fp32", "--vae-tiling", setting,
              "--out", str(paths[setting])])
    off, tiled = (np.asarray(Image.open(paths[s]), dtype=np.int16) for s in ("off", "32"))
    assert np.abs(off - tiled).max() <= 1                       # 8-bit rounding of images equal within 1e-5
