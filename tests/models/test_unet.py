"""U-Net: shapes, conditioning, checkpointing, save/load, and equality with diffusers' SD U-Net."""
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import save_file

from ldm.models.convert_unet import load_compvis_unet, load_diffusers_unet, unet_config_from_diffusers
from ldm.models.layers import timestep_embedding
from sd_layouts import perturb, unet_to_compvis

from ldm.models.unet import UNet, UNetConfig, count_params, sd2_config, sd15_config, sdxl_config, tiny_config


def _inputs(cfg, batch=2, size=8, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.tensor([3.0, 917.0])[:batch]
    ctx = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    return x, t, ctx


def test_timestep_embedding_matches_diffusers_reference():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    ref = get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 64), ref)


def test_output_shape_dtype_and_time_formats():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = UNet(cfg).eval()
    x, t, ctx = _inputs(cfg)
    out = model(x, t, ctx)
    assert out.shape == (2, cfg.out_channels, 8, 8) and out.dtype == torch.float32
    # a scalar t broadcasts; int and float tensors of the same value agree
    torch.testing.assert_close(model(x, 5, ctx), model(x, torch.tensor([5.0, 5.0]), ctx))
    torch.testing.assert_close(model(x, torch.tensor([5, 5]), ctx), model(x, 5.0, ctx))


def test_cond_emb_is_added_to_time_embedding():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = perturb(UNet(cfg)).eval()
    x, t, ctx = _inputs(cfg)
    base = model(x, t, ctx)
    torch.testing.assert_close(model(x, t, ctx, cond_emb=torch.zeros(2, cfg.time_embed_dim)), base)
    cond = torch.randn(2, cfg.time_embed_dim)
    assert (model(x, t, ctx, cond_emb=cond) - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="cond_emb shape"):
        model(x, t, ctx, cond_emb=torch.zeros(2, 3))


def test_position_embeddings_zero_is_plain_and_nonzero_breaks_translation_symmetry():
    """pos_embed adds W @ features(y, x) to every transformer token (W random at construction):
    zero W = the plain U-Net;
    a trained (non-zero) W makes the output depend on where a pattern sits, checked against
    features computed from the definition."""
    import dataclasses
    import math

    from ldm.models.layers import POS_FREQS, position_features

    cfg = tiny_config()
    plain = perturb(UNet(cfg)).eval()
    pos = UNet(dataclasses.replace(cfg, pos_embed=True)).eval()
    missing, unexpected = pos.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(".pos_proj." in k for k in missing) and not unexpected
    assert all(pos.get_parameter(k).abs().max() > 0 for k in missing if k.endswith("weight"))  # random start
    with torch.no_grad():
        for k in missing:
            pos.get_parameter(k).zero_()
    x, t, ctx = _inputs(cfg)
    torch.testing.assert_close(pos(x, t, ctx), plain(x, t, ctx))
    with torch.no_grad():
        for k in missing:
            pos.get_parameter(k).normal_(0, 0.5)
    assert (pos(x, t, ctx) - plain(x, t, ctx)).abs().max() > 1e-3
    f = position_features(2, 4, POS_FREQS)
    assert f.shape == (8, 4 * POS_FREQS)
    # token (row 1, col 2) of a 2x4 grid: centre y = 0.75, x = 0.625; first frequency pi
    assert math.isclose(f[6, 0].item(), math.sin(math.pi * 0.75), abs_tol=1e-6)
    assert math.isclose(f[6, POS_FREQS].item(), math.sin(math.pi * 0.625), abs_tol=1e-6)
    assert math.isclose(f[6, 2 * POS_FREQS].item(), math.cos(math.pi * 0.75), abs_tol=1e-6)


def test_context_mask_equals_dropping_masked_tokens():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = perturb(UNet(cfg)).eval()
    x, t, ctx = _inputs(cfg, tokens=6)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 4 + [False] * 2])
    torch.testing.assert_close(model(x, t, ctx, context_mask=mask), model(x, t, ctx[:, :4]), atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = perturb(UNet(cfg)).train()
    x, t, ctx = _inputs(cfg)

    def grads(flag):
        model.zero_grad()
        model.enable_gradient_checkpointing(flag)
        model(x, t, ctx).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(linear_projection=True, num_heads=(2, 4), transformer_depth=2)
    model = perturb(UNet(cfg)).eval()
    model.save_pretrained(tmp_path)
    loaded = UNet.from_pretrained(tmp_path).eval()
    assert loaded.cfg == cfg
    x, t, ctx = _inputs(cfg)
    torch.testing.assert_close(loaded(x, t, ctx), model(x, t, ctx), atol=0, rtol=0)


def test_from_pretrained_errors_name_the_key(tmp_path):
    UNet(tiny_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "widths": [1]}))
    with pytest.raises(ValueError, match="widths"):
        UNet.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = UNet(tiny_config()).state_dict()
    del state["mid.res1.conv1.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"mid\.res1\.conv1\.weight"):
        UNet.from_pretrained(tmp_path)


def test_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="exactly one"):
        UNetConfig(num_heads=8, head_dim=64)
    with pytest.raises(ValueError, match="divisible"):
        UNet(tiny_config(num_heads=3))


@pytest.mark.parametrize("make, expected", [(sd15_config, 859_520_964), (sd2_config, 865_910_724),
                                            (sdxl_config, 2_567_463_684)])
def test_stable_diffusion_sizes_on_meta(make, expected):
    # Published parameter counts of the SD 1.x, SD 2.x and SDXL base U-Nets (diffusers' models: 2.6B for SDXL,
    # Podell et al. 2023, Tab. 1).
    with torch.device("meta"):
        assert count_params(UNet(make())) == expected


# ---- diffusers / CompVis conversion ----------------------------------------------------------

def _small_diffusers(linear: bool, heads):
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=heads, norm_num_groups=8, use_linear_projection=linear,
    )
    return perturb(model).eval()


def _diffusers_out(model, x, t, ctx, mask=None):
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample


@pytest.mark.parametrize("linear, heads", [(False, 8), (True, (4, 2))])
def test_diffusers_unet_loads_and_matches(tmp_path, linear, heads):
    ref = _small_diffusers(linear, heads)
    ref.save_pretrained(tmp_path)
    ours = load_diffusers_unet(str(tmp_path)).eval()
    x, t, ctx = _inputs(ours.cfg)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx), _diffusers_out(ref, x, t, ctx), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours(x, t, ctx, context_mask=mask), _diffusers_out(ref, x, t, ctx, mask),
                                   atol=1e-4, rtol=1e-4)


def _small_sdxl():
    """SDXL's block structure at toy widths: a plain first level, per-level transformer depths (the middle
    takes the last level's), linear projections, and the "text_time" added embedding."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 2, 4),
        transformer_layers_per_block=(1, 2, 3), cross_attention_dim=24, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=20 + 6 * 8)
    return perturb(model).eval()


def test_sdxl_unet_loads_and_matches(tmp_path):
    ref = _small_sdxl()
    ref.save_pretrained(tmp_path)
    ours = load_diffusers_unet(str(tmp_path)).eval()
    assert (ours.cfg.added_cond, ours.cfg.transformer_depth, ours.cfg.attention_levels) == ("text_time", (1, 2, 3), (1, 2))
    x, t, ctx = _inputs(ours.cfg)
    g = torch.Generator().manual_seed(1)
    pooled = torch.randn(2, 20, generator=g)
    time_ids = torch.tensor([[512.0, 384, 0, 16, 512, 512], [1024, 1024, 8, 0, 768, 1024]])
    with torch.no_grad():
        theirs = ref(x, t, encoder_hidden_states=ctx,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        torch.testing.assert_close(ours(x, t, ctx, pooled=pooled, time_ids=time_ids), theirs, atol=1e-4, rtol=1e-4)
        moved = ours(x, t, ctx, pooled=pooled, time_ids=time_ids.flip(0))      # the numbers do reach the output
        assert (moved - theirs).abs().max() > 1e-2
        with pytest.raises(ValueError, match="needs `pooled`"):
            ours(x, t, ctx)
        with pytest.raises(ValueError, match="do not make the 68 inputs"):
            ours(x, t, ctx, pooled=pooled, time_ids=time_ids[:, :5])
        with pytest.raises(ValueError, match="no added conditioning"):
            load_diffusers_unet(str(tmp_path)).__class__(tiny_config())(x, t, torch.zeros(2, 5, 32), pooled=pooled,
                                                                       time_ids=time_ids)


def test_diffusers_config_unsupported_key_is_named():
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_config_from_diffusers({**_small_diffusers(False, 8).config, "class_embed_type": "timestep"})


def test_compvis_checkpoint_loads_and_matches():
    ref = _small_diffusers(False, 8)
    state = ref.state_dict()
    compvis = unet_to_compvis(state, levels=2, n=1)
    # diffusers' own CompVis converter must map our test-side names back exactly
    back = convert_ldm_unet_checkpoint(compvis, dict(ref.config))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)

    cfg = unet_config_from_diffusers(dict(ref.config))
    ours = load_compvis_unet(compvis, cfg).eval()
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx), _diffusers_out(ref, x, t, ctx), atol=1e-4, rtol=1e-4)


def test_compvis_errors_list_missing_and_unexpected_keys():
    ref = _small_diffusers(False, 8)
    compvis = unet_to_compvis(ref.state_dict(), levels=2, n=1)
    del compvis["model.diffusion_model.out.2.weight"]
    compvis["model.diffusion_model.bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"conv_out\.weight.*bogus\.weight"):
        load_compvis_unet(compvis, unet_config_from_diffusers(dict(ref.config)))
