"""Flux (FLUX.1's transformer): equality with diffusers' FluxTransformer2DModel as FluxPipeline calls it,
conditioning, masking, refusals, save/load, gradient checkpointing."""
import dataclasses
import json

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from ldm.models.convert_flux import (
    diffusers_to_ours, flux_config_from_diffusers, load_diffusers_flux, ours_to_diffusers,
)
from ldm.models.flux import Flux, FluxConfig, apply_rope, pack, position_ids, rope_angles, unpack
from sd_layouts import perturb

TINY = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))
DEV = dict(guidance_embeds=True)        # FLUX.1-dev: guidance-distilled
SCHNELL = dict(guidance_embeds=False)   # FLUX.1-schnell


def _reference(**overrides):
    torch.manual_seed(0)
    return perturb(FluxTransformer2DModel(**{**TINY, **overrides})).eval()


def _ours(tmp_path, **overrides):
    """(diffusers model, ours loaded from its saved folder)."""
    ref = _reference(**overrides)
    ref.save_pretrained(tmp_path / "transformer")
    return ref, load_diffusers_flux(str(tmp_path / "transformer")).eval()


def _inputs(cfg, batch=2, hw=(8, 8), tokens=7, seed=1):
    """x, sigma, context, pooled, guidance scale (None without guidance_embeds)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *hw, generator=g)
    sigma = torch.tensor([0.003, 0.917, 0.5])[:batch]
    ctx = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g)
    guidance = torch.tensor([3.5, 1.0, 7.0])[:batch] if cfg.guidance_embeds else None
    return x, sigma, ctx, pooled, guidance


def _theirs(ref, x, sigma, ctx, pooled, guidance):
    """diffusers called as FluxPipeline calls it: packed latents, image/text ids, sigma, the guidance scale."""
    B, C, H, W = x.shape
    img_ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, x.device, x.dtype)
    with torch.no_grad():
        out = ref(hidden_states=FluxPipeline._pack_latents(x, B, C, H, W), encoder_hidden_states=ctx,
                  pooled_projections=pooled, timestep=sigma, img_ids=img_ids, txt_ids=torch.zeros(ctx.shape[1], 3),
                  guidance=guidance).sample
    return FluxPipeline._unpack_latents(out, H * 8, W * 8, vae_scale_factor=8)


@pytest.mark.parametrize("overrides, hw", [
    (DEV, (8, 8)),
    (DEV, (8, 12)),                      # non-square: rows and columns of the ids differ
    (SCHNELL, (8, 8)),
    (SCHNELL, (12, 4)),                  # tall
], ids=["dev-8x8", "dev-8x12", "schnell-8x8", "schnell-12x4"])
def test_matches_diffusers(tmp_path, overrides, hw):
    ref, ours = _ours(tmp_path, **overrides)
    x, sigma, ctx, pooled, guidance = _inputs(ours.cfg, hw=hw)
    with torch.no_grad():
        out = ours(x, sigma * 1000, ctx, pooled=pooled, guidance=guidance)
    expected = _theirs(ref, x, sigma, ctx, pooled, guidance)
    assert out.shape == expected.shape == x.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # a batch of 2 with different t (and guidance) is the two samples run alone
    g1 = None if guidance is None else guidance[1:]
    with torch.no_grad():
        torch.testing.assert_close(ours(x[1:], sigma[1:] * 1000, ctx[1:], pooled=pooled[1:], guidance=g1), out[1:],
                                   atol=1e-5, rtol=1e-5)


def test_pieces_match_the_pipeline_and_diffusers_rope():
    """pack/unpack are FluxPipeline's; our ids and rotation are FluxPosEmbed + apply_rotary_emb (adjacent pairs)."""
    x = torch.randn(2, 16, 8, 12)
    packed = FluxPipeline._pack_latents(x, 2, 16, 8, 12)
    assert torch.equal(pack(x), packed) and torch.equal(unpack(packed, 4, 6), x)
    ids = position_ids(5, 4, 6)
    expected_ids = torch.cat([torch.zeros(5, 3), FluxPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32)])
    assert torch.equal(ids.float(), expected_ids)
    q = torch.randn(2, 3, ids.shape[0], 16)          # (B, H, N, d)
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])(expected_ids)
    theirs = apply_rotary_emb(q.transpose(1, 2), (cos, sin), sequence_dim=1).transpose(1, 2)
    torch.testing.assert_close(apply_rope(q, *rope_angles(ids, (4, 6, 6), 10000.0)), theirs, atol=1e-6, rtol=1e-6)


def test_config_from_diffusers_and_refusals():
    cfg = flux_config_from_diffusers({"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42",
                                      **TINY, "out_channels": None, **DEV})
    assert (cfg.in_channels, cfg.out_channels, cfg.depth_double, cfg.depth_single, cfg.num_heads, cfg.head_dim) == \
        (16, 16, 2, 2, 2, 16)
    assert (cfg.context_dim, cfg.pooled_dim, cfg.guidance_embeds, cfg.axes_dims_rope) == (32, 24, True, (4, 6, 6))
    assert cfg.downsample_factor == 2 and cfg.width == cfg.time_embed_dim == 32 and cfg.kind == "flux"
    assert flux_config_from_diffusers({}) == FluxConfig()                   # diffusers' defaults are FLUX.1's
    with pytest.raises(ValueError, match=r"\['use_flash'\]"):
        flux_config_from_diffusers({**TINY, "use_flash": True})
    with pytest.raises(ValueError, match="patch_size=2"):
        flux_config_from_diffusers({**TINY, "patch_size": 2})
    with pytest.raises(ValueError, match="in_channels=66"):
        flux_config_from_diffusers({**TINY, "in_channels": 66})
    with pytest.raises(ValueError, match="SD3Transformer2DModel"):
        flux_config_from_diffusers({**TINY, "_class_name": "SD3Transformer2DModel"})
    with pytest.raises(ValueError, match="axes_dims_rope"):
        flux_config_from_diffusers({**TINY, "axes_dims_rope": (4, 6, 8)})
    with pytest.raises(ValueError, match=r"\['heads'\]"):
        FluxConfig.from_dict({**dataclasses.asdict(cfg), "heads": 4})


def _tiny_cfg(**overrides):
    return FluxConfig(**{**dict(depth_double=2, depth_single=2, num_heads=2, head_dim=16, context_dim=32,
                                pooled_dim=24, guidance_embeds=True, axes_dims_rope=(4, 6, 6)), **overrides})


def _net(seed=0, **overrides):
    torch.manual_seed(seed)
    return perturb(Flux(_tiny_cfg(**overrides)), seed).eval()


def test_refusals_name_what_is_wrong():
    net, schnell = _net(), _net(guidance_embeds=False)
    x, sigma, ctx, pooled, guidance = _inputs(net.cfg)
    t = sigma * 1000
    with pytest.raises(ValueError, match="needs `pooled`"):
        net(x, t, ctx, guidance=guidance)
    with pytest.raises(ValueError, match="needs `guidance`"):
        net(x, t, ctx, pooled=pooled)
    with pytest.raises(ValueError, match="guidance_embeds=False takes no `guidance`"):
        schnell(x, t, ctx, pooled=pooled, guidance=guidance)
    with pytest.raises(ValueError, match="control"):
        net(x, t, ctx, pooled=pooled, guidance=guidance, control=([], None))
    with pytest.raises(ValueError, match="time_ids"):
        net(x, t, ctx, pooled=pooled, guidance=guidance, time_ids=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="divisible by the patch size 2"):
        net(x[..., :7], t, ctx, pooled=pooled, guidance=guidance)
    with pytest.raises(ValueError, match="context width"):
        net(x, t, ctx[..., :16], pooled=pooled, guidance=guidance)
    with pytest.raises(ValueError, match="guidance has 3 entries"):
        net(x, t, ctx, pooled=pooled, guidance=torch.ones(3))


def test_time_and_guidance_formats_and_cond_emb():
    net = _net()
    x, sigma, ctx, pooled, guidance = _inputs(net.cfg)
    t = sigma * 1000
    with torch.no_grad():
        base = net(x, t, ctx, pooled=pooled, guidance=guidance)
        two = torch.tensor([5.0, 5.0]), torch.tensor([3.5, 3.5])
        torch.testing.assert_close(net(x, 5, ctx, pooled=pooled, guidance=3.5),
                                   net(x, two[0], ctx, pooled=pooled, guidance=two[1]))
        other = net(x, t, ctx, pooled=pooled, guidance=guidance + 1)
        torch.testing.assert_close(net(x, t, ctx, pooled=pooled, guidance=guidance,
                                       cond_emb=torch.zeros(2, net.cfg.time_embed_dim)), base)
        moved = net(x, t, ctx, pooled=pooled, guidance=guidance, cond_emb=torch.randn(2, net.cfg.time_embed_dim))
    assert (other - base).abs().max() > 1e-3 and (moved - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="cond_emb shape"):
        net(x, t, ctx, pooled=pooled, guidance=guidance, cond_emb=torch.zeros(2, 7))


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_context_mask_equals_truncated_context(guidance_embeds):
    """Masking the last k tokens is running on the first L - k: masked tokens are no keys anywhere."""
    net = _net(guidance_embeds=guidance_embeds)
    x, sigma, ctx, pooled, guidance = _inputs(net.cfg, hw=(8, 12), tokens=9)
    t, keep = sigma * 1000, 6
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, :keep] = True
    with torch.no_grad():
        masked = net(x, t, ctx, context_mask=mask, pooled=pooled, guidance=guidance)
        truncated = net(x, t, ctx[:, :keep], pooled=pooled, guidance=guidance)
        unmasked = net(x, t, ctx, pooled=pooled, guidance=guidance)
        torch.testing.assert_close(net(x, t, ctx, context_mask=torch.ones(2, 9, dtype=torch.bool), pooled=pooled,
                                       guidance=guidance), unmasked)
    torch.testing.assert_close(masked, truncated, atol=1e-5, rtol=1e-5)
    assert (masked - unmasked).abs().max() > 1e-3


def test_save_pretrained_round_trip(tmp_path):
    net = _net()
    net.save_pretrained(str(tmp_path / "net"))
    config = json.loads((tmp_path / "net" / "config.json").read_text())
    assert config["kind"] == "flux" and config["axes_dims_rope"] == [4, 6, 6]
    loaded = Flux.from_pretrained(str(tmp_path / "net"))
    assert loaded.cfg == net.cfg
    x, sigma, ctx, pooled, guidance = _inputs(net.cfg, hw=(8, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma * 1000, ctx, pooled=pooled, guidance=guidance),
                                   net(x, sigma * 1000, ctx, pooled=pooled, guidance=guidance), atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        Flux.from_pretrained(str(tmp_path / "nothing"))


def test_gradient_checkpointing_gives_the_same_finite_grads():
    net = _net().train()
    x, sigma, ctx, pooled, guidance = _inputs(net.cfg)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False

    def grads():
        net.zero_grad()
        net(x, sigma * 1000, ctx, context_mask=mask, pooled=pooled, guidance=guidance).square().mean().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    plain = grads()
    net.enable_gradient_checkpointing()
    checkpointed = grads()
    assert set(plain) == {n for n, _ in net.named_parameters()}   # every parameter is used: no dead weights
    for name, g in plain.items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-5, msg=name)
    assert plain["single_blocks.1.mod.weight"].abs().max() > 0


def test_ours_to_diffusers_inverts_the_renaming(tmp_path):
    ref, ours = _ours(tmp_path, **DEV)
    back = ours_to_diffusers(ours.state_dict())
    theirs = ref.state_dict()
    assert set(back) == set(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(back[key], value, atol=0, rtol=0, msg=key)
    assert diffusers_to_ours(back).keys() == ours.state_dict().keys()


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_loads_a_pipeline_folder_with_sharded_weights(tmp_path, variant):
    ref = _reference(**DEV)
    ref.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="40KB", variant=variant)
    index = "diffusion_pytorch_model.safetensors.index" + (f".{variant}" if variant else "") + ".json"
    assert (tmp_path / "pipe" / "transformer" / index).is_file()
    ours = load_diffusers_flux(str(tmp_path / "pipe"), variant=variant).eval()
    x, sigma, ctx, pooled, guidance = _inputs(ours.cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, sigma * 1000, ctx, pooled=pooled, guidance=guidance),
                                   _theirs(ref, x, sigma, ctx, pooled, guidance), atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="load_diffusers_flux"):
        load_diffusers_flux(str(tmp_path / "missing" / "folder"))
