"""MMDiT (SD3's transformer): equality with diffusers' SD3Transformer2DModel, conditioning, masking, save/load."""
import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from ldm.models.convert_mmdit import (
    diffusers_to_ours, load_diffusers_mmdit, mmdit_config_from_diffusers, mmdit_config_to_diffusers, ours_to_diffusers,
)
from ldm.models.layers import timestep_embedding
from ldm.models.mmdit import TIME_FREQS, MMDiT, MMDiTConfig
from sd_layouts import perturb

TINY = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=24,
            pos_embed_max_size=24)
# labelled layouts of the released models, shrunk
SD3_MEDIUM = {}                                                        # no qk norm, last block context_pre_only
SD35_LARGE = dict(qk_norm="rms_norm")
SD35_MEDIUM = dict(qk_norm="rms_norm", dual_attention_layers=(0, 1))   # MMDiT-X blocks first, as released


def _reference(**overrides):
    torch.manual_seed(0)
    return perturb(SD3Transformer2DModel(**{**TINY, **overrides})).eval()


def _ours(tmp_path, **overrides):
    """(diffusers model, ours loaded from its saved folder)."""
    ref = _reference(**overrides)
    ref.save_pretrained(tmp_path / "transformer")
    return ref, load_diffusers_mmdit(str(tmp_path / "transformer")).eval()


def _inputs(cfg, batch=2, hw=(16, 16), tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *hw, generator=g)
    t = torch.tensor([3.0, 917.0, 500.0])[:batch]
    ctx = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g)
    return x, t, ctx, pooled


def _theirs(ref, x, t, ctx, pooled):
    with torch.no_grad():
        return ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample


@pytest.mark.parametrize("overrides, hw", [
    (SD3_MEDIUM, (16, 16)),
    (SD3_MEDIUM, (16, 24)),                                   # non-square latent: the crop's two offsets
    (dict(SD3_MEDIUM, in_channels=16, out_channels=16), (8, 32)),
    (SD35_LARGE, (16, 16)),
    (SD35_MEDIUM, (12, 16)),
], ids=["sd3-medium", "sd3-medium-16x24", "sd3-medium-16ch-8x32", "sd35-large", "sd35-medium-dual"])
def test_matches_diffusers(tmp_path, overrides, hw):
    ref, ours = _ours(tmp_path, **overrides)
    x, t, ctx, pooled = _inputs(ours.cfg, hw=hw)
    with torch.no_grad():
        out = ours(x, t, ctx, pooled=pooled)
    expected = _theirs(ref, x, t, ctx, pooled)
    assert out.shape == expected.shape == x.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # a batch of 2 with different t is the two samples run alone
    with torch.no_grad():
        torch.testing.assert_close(ours(x[1:], t[1:], ctx[1:], pooled=pooled[1:]), out[1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width, max_size, base", [(32, 24, 8), (64, 96, 64), (16, 16, 16)])
def test_position_table_is_the_one_sd3_trained_with(width, max_size, base):
    """A freshly built net computes diffusers' table itself (loading overwrites the buffer, so check it apart)."""
    cfg = MMDiTConfig(**{**_tiny_cfg(), "num_heads": width // 8, "caption_dim": width,
                         "pos_embed_max_size": max_size, "sample_size": 2 * base, "depth": 1})
    expected = get_2d_sincos_pos_embed(width, max_size, base_size=base).float()
    torch.testing.assert_close(MMDiT(cfg).pos_embed.reshape(-1, width), expected, atol=1e-6, rtol=0)


def _tiny_cfg():
    return dict(in_channels=4, out_channels=4, patch_size=2, depth=2, num_heads=4, head_dim=8, context_dim=32,
                caption_dim=32, pooled_dim=24, pos_embed_max_size=16, sample_size=16)


def _net(seed=0, **overrides):
    torch.manual_seed(seed)
    return perturb(MMDiT(MMDiTConfig(**{**_tiny_cfg(), **overrides})), seed).eval()


def test_config_from_diffusers_and_refusals():
    cfg = mmdit_config_from_diffusers({"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.42",
                                       **TINY, "qk_norm": "rms_norm", "dual_attention_layers": [0]})
    assert (cfg.depth, cfg.num_heads, cfg.head_dim, cfg.context_dim, cfg.caption_dim, cfg.pooled_dim) == \
        (3, 4, 8, 32, 32, 24)
    assert cfg.dual_attention_layers == (0,) and cfg.qk_norm == "rms_norm" and cfg.downsample_factor == 2
    assert cfg.time_embed_dim == 32
    with pytest.raises(ValueError, match="use_flash"):
        mmdit_config_from_diffusers({**TINY, "use_flash": True})
    with pytest.raises(ValueError, match="qk_norm"):
        mmdit_config_from_diffusers({**TINY, "qk_norm": "layer_norm"})
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        mmdit_config_from_diffusers({**TINY, "_class_name": "FluxTransformer2DModel"})
    with pytest.raises(ValueError, match="caption_dim"):
        mmdit_config_from_diffusers({**TINY, "caption_projection_dim": 48})
    with pytest.raises(ValueError, match="dual_attention_layers"):
        mmdit_config_from_diffusers({**TINY, "dual_attention_layers": [3]})
    with pytest.raises(ValueError, match=r"\['heads'\]"):
        MMDiTConfig.from_dict({**_tiny_cfg(), "heads": 4})


def test_refusals_name_what_is_wrong():
    net = _net()
    x, t, ctx, pooled = _inputs(net.cfg)
    with pytest.raises(ValueError, match="pooled"):
        net(x, t, ctx)
    with pytest.raises(ValueError, match="control"):
        net(x, t, ctx, pooled=pooled, control=([], None))
    with pytest.raises(ValueError, match="time_ids"):
        net(x, t, ctx, pooled=pooled, time_ids=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="divisible by the patch size 2"):
        net(x[..., :15], t, ctx, pooled=pooled)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        net(torch.randn(2, 4, 16, 34), t, ctx, pooled=pooled)
    with pytest.raises(ValueError, match="context width"):
        net(x, t, ctx[..., :16], pooled=pooled)


def test_time_formats_and_cond_emb():
    net = _net()
    x, t, ctx, pooled = _inputs(net.cfg)
    with torch.no_grad():
        base = net(x, t, ctx, pooled=pooled)
        torch.testing.assert_close(net(x, 5, ctx, pooled=pooled), net(x, torch.tensor([5.0, 5.0]), ctx, pooled=pooled))
        torch.testing.assert_close(net(x, t, ctx, pooled=pooled, cond_emb=torch.zeros(2, net.cfg.time_embed_dim)),
                                   base)
        moved = net(x, t, ctx, pooled=pooled, cond_emb=torch.randn(2, net.cfg.time_embed_dim))
    assert (moved - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="cond_emb shape"):
        net(x, t, ctx, pooled=pooled, cond_emb=torch.zeros(2, 7))


def test_without_pooled_text_c_is_the_time_embedding_and_it_learns():
    """pooled_dim=0 (a scratch text encoder has no pooled vector): no pooled MLP, c = MLP(sinusoid(t)) (+ cond_emb),
    a pooled vector given is refused, SD3's export refuses the net; 30 Adam steps fit a fixed batch."""
    net = _net(pooled_dim=0)
    assert net.pooled_embed is None and not any(k.startswith("pooled_embed") for k in net.state_dict())
    x, t, ctx, _ = _inputs(net.cfg)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    with torch.no_grad():
        out = net(x, t, ctx, context_mask=mask)
        c = net.time_embed(timestep_embedding(t, TIME_FREQS))
        torch.testing.assert_close(net._conditioning(t, None, None, 2, torch.float32), c)
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="pooled_dim=0 takes no `pooled`"):
        net(x, t, ctx, pooled=torch.zeros(2, 24))
    with pytest.raises(ValueError, match="pooled_dim=0"):
        mmdit_config_to_diffusers(net.cfg)
    with pytest.raises(ValueError, match="pooled_dim must be >= 0"):
        MMDiTConfig(**{**_tiny_cfg(), "pooled_dim": -1})

    torch.manual_seed(0)
    net = MMDiT(MMDiTConfig(**{**_tiny_cfg(), "pooled_dim": 0})).train()
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = (net(x, t, ctx, context_mask=mask) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses                          # 0.64 here


@pytest.mark.parametrize("overrides", [{}, dict(qk_norm="rms_norm", dual_attention_layers=(0,))],
                         ids=["plain", "qk-norm-dual"])
def test_context_mask_equals_truncated_context(overrides):
    """Masking the last k tokens is running on the first L - k: masked tokens are no keys anywhere."""
    net = _net(**overrides)
    x, t, ctx, pooled = _inputs(net.cfg, tokens=9)
    keep = 6
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, :keep] = True
    with torch.no_grad():
        masked = net(x, t, ctx, context_mask=mask, pooled=pooled)
        truncated = net(x, t, ctx[:, :keep], pooled=pooled)
        unmasked = net(x, t, ctx, pooled=pooled)
        torch.testing.assert_close(net(x, t, ctx, context_mask=torch.ones(2, 9, dtype=torch.bool), pooled=pooled),
                                   unmasked)
    torch.testing.assert_close(masked, truncated, atol=1e-5, rtol=1e-5)
    assert (masked - unmasked).abs().max() > 1e-3


def test_save_pretrained_round_trip(tmp_path):
    net = _net(qk_norm="rms_norm", dual_attention_layers=(1,))
    net.save_pretrained(str(tmp_path / "net"))
    config = json.loads((tmp_path / "net" / "config.json").read_text())
    assert config["kind"] == "mmdit" and config["dual_attention_layers"] == [1]
    loaded = MMDiT.from_pretrained(str(tmp_path / "net"))
    assert loaded.cfg == net.cfg
    x, t, ctx, pooled = _inputs(net.cfg, hw=(8, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, ctx, pooled=pooled), net(x, t, ctx, pooled=pooled), atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        MMDiT.from_pretrained(str(tmp_path / "nothing"))


def test_gradient_checkpointing_gives_the_same_finite_grads():
    net = _net(qk_norm="rms_norm", dual_attention_layers=(0,)).train()
    x, t, ctx, pooled = _inputs(net.cfg)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False

    def grads():
        net.zero_grad()
        net(x, t, ctx, context_mask=mask, pooled=pooled).square().mean().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    plain = grads()
    net.enable_gradient_checkpointing()
    checkpointed = grads()
    assert set(plain) == {n for n, _ in net.named_parameters()}   # every parameter is used: no dead weights
    for name, g in plain.items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-5, msg=name)
    assert plain["blocks.0.image.mod.weight"].abs().max() > 0


def test_ours_to_diffusers_inverts_the_renaming(tmp_path):
    ref, ours = _ours(tmp_path, **SD35_LARGE)
    back = ours_to_diffusers(ours.state_dict())
    theirs = ref.state_dict()
    assert set(back) == set(theirs)
    dead = ("transformer_blocks.2.attn.add_q_proj.", "transformer_blocks.2.attn.norm_added_q.")
    for key, value in theirs.items():
        if not key.startswith(dead):
            torch.testing.assert_close(back[key], value, atol=0, rtol=0, msg=key)
    rebuilt = SD3Transformer2DModel(**TINY, **SD35_LARGE).eval()
    rebuilt.load_state_dict(back)        # the zeroed dead query changes nothing
    x, t, ctx, pooled = _inputs(ours.cfg)
    torch.testing.assert_close(_theirs(rebuilt, x, t, ctx, pooled), _theirs(ref, x, t, ctx, pooled),
                               atol=1e-6, rtol=1e-6)
    assert set(diffusers_to_ours(back)) == set(ours.state_dict())


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_loads_a_pipeline_folder_with_sharded_weights(tmp_path, variant):
    ref = _reference(**SD3_MEDIUM)
    ref.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="40KB", variant=variant)
    index = "diffusion_pytorch_model.safetensors.index" + (f".{variant}" if variant else "") + ".json"
    assert (tmp_path / "pipe" / "transformer" / index).is_file()
    ours = load_diffusers_mmdit(str(tmp_path / "pipe"), variant=variant).eval()
    x, t, ctx, pooled = _inputs(ours.cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx, pooled=pooled), _theirs(ref, x, t, ctx, pooled),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="load_diffusers_mmdit"):
        load_diffusers_mmdit(str(tmp_path / "missing" / "folder"))


def test_init_for_training_is_adaln_zero():
    """DiT's adaLN-Zero start: every modulation and the output projection zero, so the net predicts exactly 0 and
    each block is the identity (the image tokens leave the blocks as they entered); a few Adam steps fit a batch."""
    torch.manual_seed(0)
    net = MMDiT(MMDiTConfig(**{**_tiny_cfg(), "pooled_dim": 0})).init_for_training()
    x, t, ctx, _ = _inputs(net.cfg)
    with torch.no_grad():
        assert net(x, t, ctx).abs().max() == 0
        c = net._conditioning(t, None, None, 2, torch.float32)
        h = torch.randn(2, 64, net.cfg.width)
        out, _ = net.blocks[0](h, net.context_embed(ctx), c)
        assert torch.equal(out, h)
    assert all(s.mod.weight.abs().max() == 0 for b in net.blocks for s in (b.image, b.text))
    assert net.blocks[0].image.attn.q.weight.abs().max() > 0                  # the rest is not zero
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = (net(x, t, ctx) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses                           # 0.81 here: from zero, slower
