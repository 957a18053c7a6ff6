"""KL autoencoder: parity with diffusers' AutoencoderKL and the CompVis layout, posterior math, fp16 guard,
save/load, and the AE losses against their closed forms."""
import re

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from safetensors.torch import save_file

from sd_layouts import vae_key_to_compvis

from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from ldm.models.convert_ae import load_compvis_autoencoder, load_diffusers_autoencoder
from ldm.models.losses_ae import (AELossConfig, AutoencoderLoss, PatchDiscriminator, PerceptualDistance,
                                  adaptive_weight, hinge_d_loss, load_feature_net)

WIDTHS = (32, 64, 64)                                                # f = 4


def small_config(**kw) -> AutoencoderConfig:
    base = dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, num_groups=8)
    return AutoencoderConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def diffusers_vae():
    """A small random diffusers AutoencoderKL with every tensor perturbed (norms are not 1/0)."""
    torch.manual_seed(0)
    vae = DiffusersAutoencoderKL(
        block_out_channels=WIDTHS, layers_per_block=1, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        scaling_factor=0.3, shift_factor=0.1,
    ).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def assert_matches_diffusers(ours: AutoencoderKL, ref: DiffusersAutoencoderKL, x: torch.Tensor) -> None:
    with torch.no_grad():
        want, got = ref.encode(x).latent_dist, ours.eval().encode(x)
        torch.testing.assert_close(got.mean, want.mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.logvar, want.logvar, atol=1e-4, rtol=1e-4)
        z = want.mean
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------
# Converters.

def test_diffusers_folder_loads_and_matches(diffusers_vae, image, tmp_path):
    diffusers_vae.save_pretrained(tmp_path / "vae")
    ours = load_diffusers_autoencoder(tmp_path)                      # finds vae/ like a pipeline folder
    assert ours.config.num_groups == 8 and ours.config.channel_mult == (1, 2, 2)
    assert (ours.config.scaling_factor, ours.config.shift_factor) == (0.3, 0.1)
    assert_matches_diffusers(ours, diffusers_vae, image)


def compvis_state_dict(vae: DiffusersAutoencoderKL) -> dict:
    state = {}
    for key, value in vae.state_dict().items():
        key = vae_key_to_compvis(key, len(WIDTHS))
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", key):
            value = value[:, :, None, None]                           # CompVis uses 1x1 convs
        state[key] = value.clone()
    # A full SD checkpoint also holds the U-Net and text encoder: they must be ignored.
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.zeros(1)
    return state


def test_compvis_dict_and_files_load_and_match(diffusers_vae, image, tmp_path):
    state = compvis_state_dict(diffusers_vae)
    config = small_config()
    assert_matches_diffusers(load_compvis_autoencoder(state, config), diffusers_vae, image)
    torch.save({"state_dict": state}, tmp_path / "sd.ckpt")
    assert_matches_diffusers(load_compvis_autoencoder(tmp_path / "sd.ckpt", config), diffusers_vae, image)
    save_file(state, str(tmp_path / "sd.safetensors"))
    assert_matches_diffusers(load_compvis_autoencoder(tmp_path / "sd.safetensors", config), diffusers_vae, image)


def test_compvis_wrong_keys_are_listed(diffusers_vae):
    state = compvis_state_dict(diffusers_vae)
    del state["first_stage_model.decoder.up.0.block.1.conv2.weight"]
    state["first_stage_model.encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys: \['decoder\.up\.2\.res\.1\.conv2\.weight'\]"
                                         r"(.|\n)*unexpected keys: \['encoder\.extra\.weight'\]"):
        load_compvis_autoencoder(state, small_config())


def test_diffusers_unsupported_config_is_named(diffusers_vae, tmp_path):
    diffusers_vae.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(path.read_text().replace('"silu"', '"relu"'))
    with pytest.raises(ValueError, match="act_fn='relu'"):
        load_diffusers_autoencoder(tmp_path)


# ----------------------------------------------------------------------------
# Model.

@pytest.mark.parametrize("channel_mult, f", [((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
def test_shapes(channel_mult, f):
    model = AutoencoderKL(small_config(channel_mult=channel_mult, z_channels=3)).eval()
    assert model.config.downsample_factor == f
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        posterior = model.encode(x)
        assert posterior.mean.shape == posterior.logvar.shape == (1, 3, 32 // f, 40 // f)
        assert model.decode(posterior.sample()).shape == x.shape


def test_kl_matches_closed_form_and_logvar_is_clamped():
    mean, logvar = torch.randn(3, 4, 5, 5), 2 * torch.randn(3, 4, 5, 5)
    logvar[0, 0, 0, :2] = torch.tensor([-50.0, 40.0])
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    clamped = logvar.clamp(-30, 20)
    assert torch.equal(posterior.logvar, clamped)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * clamped))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    want = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), want, rtol=1e-5, atol=1e-3)


def test_posterior_sample_statistics_and_generator():
    mean = torch.tensor([-1.0, 0.5]).view(1, 2, 1, 1).expand(4000, 2, 8, 8)
    logvar = torch.tensor([0.0, -2.0]).view(1, 2, 1, 1).expand(4000, 2, 8, 8)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    z = posterior.sample(torch.Generator().manual_seed(0))
    # 256k draws per channel: the sample mean/std are within ~0.01 of the truth.
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.tensor([-1.0, 0.5]), atol=0.01, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.tensor([1.0, torch.e ** -1]), atol=0.01, rtol=0)
    assert torch.equal(z, posterior.sample(torch.Generator().manual_seed(0)))
    assert torch.equal(posterior.mode(), mean)


def test_latent_scaling_round_trip(image):
    model = AutoencoderKL(small_config(scaling_factor=0.5, shift_factor=0.2)).eval()
    with torch.no_grad():
        mode = model.encode(image).mode()
        z_scaled = model.encode_latents(image, sample=False)
        torch.testing.assert_close(z_scaled, (mode - 0.2) * 0.5)
        torch.testing.assert_close(model.decode_latents(z_scaled), model.decode(mode), atol=1e-5, rtol=1e-5)


def test_fp16_decode_of_large_activations_stays_finite():
    """An fp16 decoder whose activations pass 65504 gives NaN unguarded; the guard matches fp32."""
    torch.manual_seed(0)
    model = AutoencoderKL(small_config()).eval()
    with torch.no_grad():
        model.decoder.conv_in.weight.mul_(100.0)                    # activations ~1e5 after conv_in
    half = AutoencoderKL(small_config(fp16_decode_dtype="float16")).eval()
    half.load_state_dict(model.state_dict())
    half.half()
    z = (1000 * torch.randn(1, 4, 8, 8)).half()                    # |z| < 65504 itself
    reference = AutoencoderKL(small_config()).eval()                # fp32 with the same fp16-rounded weights
    reference.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    with torch.no_grad():
        assert not torch.isfinite(half.decode(z)).all()             # the test can fail: fp16 overflows
        want = reference.decode(z.float())
        for dtype, tol in (("float32", 2e-3), ("bfloat16", 0.1)):
            half.config.fp16_decode_dtype = dtype
            got = half.decode(z)
            assert got.dtype == torch.float16 and torch.isfinite(got).all()
            torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_gradient_checkpointing_gives_same_gradients(image):
    torch.manual_seed(0)
    model = AutoencoderKL(small_config(channel_mult=(1, 2)))
    x = image[:1]

    def grads():
        model.zero_grad()
        x_rec, posterior = model(x, sample=True, generator=torch.Generator().manual_seed(0))
        (x_rec.square().mean() + posterior.kl().mean()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_save_load_round_trip_is_bitwise(image, tmp_path):
    torch.manual_seed(0)
    model = AutoencoderKL(small_config(scaling_factor=0.25, mid_attn=True)).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoencoderKL.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(model(image, sample=False)[0], loaded(image, sample=False)[0])


def test_bad_config_key_is_named():
    with pytest.raises(ValueError, match="'z_chanels'"):
        AutoencoderConfig.from_dict({"z_chanels": 4})
    with pytest.raises(ValueError, match="num_groups=32 does not divide channel count 48"):
        AutoencoderConfig(base_channels=48)


# ----------------------------------------------------------------------------
# Losses.

def test_adaptive_weight_equals_its_formula():
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    target, c = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.3, -0.4, 1.2])
    rec = 0.5 * (w - target).pow(2).sum()                            # grad = w - target
    gan = (c * w).sum()                                              # grad = c
    want = (w - target).norm() / (c.norm() + 1e-4)
    torch.testing.assert_close(adaptive_weight(rec, gan, w), want.detach())
    tiny = (1e-9 * c * w).sum()                                      # ratio ~ 4e4 -> clamped
    assert adaptive_weight(rec, tiny, w).item() == 1e4


def test_hinge_and_generator_loss_terms(image):
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 0.5])
    # relu(1 - real) = [0, .5, 2], relu(1 + fake) = [0, 1, 1.5]
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (2.5 / 3 + 2.5 / 3)))

    torch.manual_seed(0)
    model = AutoencoderKL(small_config())
    loss_fn = AutoencoderLoss(AELossConfig(reconstruction="l2", kl_weight=1e-3, disc_start=10,
                                           disc_channels=8, disc_layers=2))
    x_rec, posterior = model(image)
    before, logs = loss_fn.generator_loss(image, x_rec, posterior, step=9, last_layer=model.decoder.conv_out.weight)
    torch.testing.assert_close(before, (image - x_rec).pow(2).sum() / 2 + 1e-3 * posterior.kl().mean())
    assert "g_loss" not in logs and loss_fn.discriminator_loss(image, x_rec, step=9)[0].item() == 0.0
    after, logs = loss_fn.generator_loss(image, x_rec, posterior, step=10, last_layer=model.decoder.conv_out.weight)
    torch.testing.assert_close(after, before + 0.5 * logs["adaptive_weight"] * logs["g_loss"])
    after.backward()
    assert model.decoder.conv_out.weight.grad is not None
    d_loss, d_logs = loss_fn.discriminator_loss(image, x_rec, step=10)
    assert d_loss.requires_grad and set(d_logs) == {"d_loss", "logits_real", "logits_fake"}


def test_patch_discriminator_grid():
    disc = PatchDiscriminator(3, channels=8, num_layers=3)
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)    # 64 -> 32 -> 16 -> 8 -> 7 -> 6


class TwoTaps(torch.nn.Module):
    """A toy feature net returning two feature maps."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 5, 3, stride=2)

    def forward(self, x):
        h = self.a(x)
        return [h, self.b(h)]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_perceptual_distance_from_a_local_file(suffix, tmp_path):
    torch.manual_seed(0)
    net, x, y = TwoTaps().eval(), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    if suffix == ".pt":
        torch.jit.script(net).save(str(tmp_path / "feat.pt"))
    else:
        torch.export.save(torch.export.export(net, (x,)), str(tmp_path / "feat.pt2"))
    dist = PerceptualDistance(load_feature_net(tmp_path / f"feat{suffix}"))
    with torch.no_grad():
        want = sum((F.normalize(a, dim=1, eps=0) - F.normalize(b, dim=1, eps=0)).pow(2).sum(1).mean(dim=(1, 2))
                   for a, b in zip(net(x), net(y)))
        torch.testing.assert_close(dist(x, y), want, atol=1e-5, rtol=1e-5)
        assert dist(x, x).abs().max() < 1e-6


def test_vgg16_features_match_torchvision_layout(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"]).eval()  # vgg16().features
    save_file({f"features.{k}": v for k, v in features.state_dict().items()}, str(tmp_path / "vgg.safetensors"))
    ours = load_feature_net(tmp_path / "vgg.safetensors")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        h = ((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        want = []
        for i, layer in enumerate(features):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):                              # relu1_2 .. relu5_3
                want.append(h)
        for got, ref in zip(ours(x), want, strict=True):
            torch.testing.assert_close(got, ref)
    save_file({"0.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="missing keys"):
        load_feature_net(tmp_path / "bad.safetensors")


def test_loss_config_errors_name_the_value():
    with pytest.raises(ValueError, match="'l3'"):
        AELossConfig(reconstruction="l3")
    with pytest.raises(ValueError, match="perceptual_net"):
        AELossConfig(perceptual_weight=1.0)
