"""DeepCache (ldm.models.deepcache) against the plain U-Net: full calls are the plain U-Net, a call that reuses the
cache is the plain U-Net on its own input with the deep feature of the last full call put in by a hook (the input
of the decoder ResBlock taking the chosen skip), and the deep blocks do not run."""
import pytest
import torch

from ldm.models.deepcache import DeepCache, skipped_fraction
from ldm.models.unet import UNet, tiny_config
from ldm.pipeline import TextToImage, save_random_model

CONFIGS = {   # two levels; three levels with two ResBlocks each (skips at level boundaries and mid-level)
    "tiny": tiny_config(),
    "three-level": tiny_config(channels=(16, 32, 32), layers_per_block=2, attention_levels=(1, 2), norm_groups=8),
}


def decoder_blocks(unet: UNet) -> list:
    """The decoder ResBlocks in the order they run: block j takes skip len(skips) - 1 - j."""
    return [block for level in reversed(unet.up) for block in level.res]


def inputs(seed: int, batch: int = 2, size=(8, 8)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, *size, generator=g), torch.rand(batch, generator=g) * 999,
            torch.randn(batch, 5, 32, generator=g))


def plain_with_feature(unet: UNet, branch: int, x, t, context, feature=None, **kwargs):
    """(plain U-Net output, the deep feature entering the decoder block that takes skip `branch`); with `feature`,
    that block's input has its deep part replaced by `feature` (a pre-hook on the plain U-Net)."""
    block = decoder_blocks(unet)[len(unet.skip_channels) - 1 - branch]
    seen = {}

    def hook(module, args):
        joined = args[0]                               # Concat(deep feature, skip), channels first the deep part
        deep = joined.shape[1] - unet.skip_channels[branch]
        seen["feature"] = joined[:, :deep].clone()
        if feature is not None:
            return (torch.cat([feature, joined[:, deep:]], dim=1), *args[1:])
    handle = block.register_forward_pre_hook(hook)
    try:
        saved, unet.deepcache = unet.deepcache, None
        out = unet(x, t, context, **kwargs)
    finally:
        unet.deepcache = saved
        handle.remove()
    return out, seen["feature"]


@pytest.fixture(params=list(CONFIGS))
def unet(request):
    torch.manual_seed(0)
    return UNet(CONFIGS[request.param]).eval()


def test_interval_one_is_the_plain_unet(unet):
    with torch.no_grad():
        for branch in range(len(unet.skip_channels)):
            unet.deepcache = DeepCache(1, branch)
            for seed in range(3):
                x, t, context = inputs(seed)
                plain, _ = plain_with_feature(unet, branch, x, t, context)
                assert torch.equal(unet(x, t, context), plain)


@pytest.mark.parametrize("freeu", [None, (1.3, 1.5, 0.9, 0.2)])
def test_full_calls_are_plain_and_reusing_calls_swap_in_the_cached_feature(unet, freeu):
    """N = 3 over 7 calls with new inputs each: calls 0, 3, 6 the plain U-Net; 1, 2, 4, 5 the plain U-Net with the
    deep feature of the last full call (FreeU scales it before the block either way)."""
    unet.freeu = freeu
    with torch.no_grad():
        for branch in range(len(unet.skip_channels)):
            unet.deepcache = DeepCache(3, branch)
            cached = None
            for call in range(7):
                x, t, context = inputs(10 * branch + call)
                ours = unet(x, t, context)
                plain, feature = plain_with_feature(unet, branch, x, t, context)
                if call % 3 == 0:
                    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
                    cached = feature
                else:
                    reference, _ = plain_with_feature(unet, branch, x, t, context, feature=cached)
                    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
                    assert (ours - plain).abs().max() > 1e-4      # it did reuse: not the plain output


def side_inputs(unet: UNet, x, seed: int) -> dict:
    """Random T2I-Adapter features (one per level: a plain level's on its output, after the downsampler) and
    ControlNet residuals (one per skip, one for the middle) of the shapes the U-Net takes for x."""
    g = torch.Generator().manual_seed(seed)
    cfg, (height, width) = unet.cfg, x.shape[-2:]
    adapter = []
    for lvl, ch in enumerate(cfg.channels):
        down = 2 ** (lvl + (lvl not in cfg.attention_levels and lvl < len(cfg.channels) - 1))
        adapter.append(torch.randn(x.shape[0], ch, height // down, width // down, generator=g))
    scales = [1]                                       # each skip's downsampling: conv_in's, then level by level
    for lvl in range(len(cfg.channels)):
        scales += [2 ** lvl] * cfg.layers_per_block + ([2 ** (lvl + 1)] if lvl < len(cfg.channels) - 1 else [])
    residuals = [torch.randn(x.shape[0], c, height // s, width // s, generator=g)
                 for c, s in zip(unet.skip_channels, scales, strict=True)]
    last = 2 ** (len(cfg.channels) - 1)
    mid = torch.randn(x.shape[0], cfg.channels[-1], height // last, width // last, generator=g)
    return {"adapter": adapter, "control": (residuals, mid)}


@pytest.mark.parametrize("side", ["adapter", "control"])
def test_adapter_features_and_control_residuals_on_the_shallow_path(unet, side):
    """With T2I-Adapter features or ControlNet residuals, a reusing call is the plain U-Net given the same ones with
    the cached deep feature put in (a plain level's adapter feature lands on its last skip: the level runs whole)."""
    with torch.no_grad():
        for branch in range(len(unet.skip_channels)):
            unet.deepcache = DeepCache(2, branch)
            x0, t0, c0 = inputs(branch)
            x1, t1, c1 = inputs(branch + 50)
            extra0, extra1 = side_inputs(unet, x0, 0)[side], side_inputs(unet, x1, 1)[side]
            torch.testing.assert_close(unet(x0, t0, c0, **{side: extra0}),
                                       plain_with_feature(unet, branch, x0, t0, c0, **{side: extra0})[0],
                                       rtol=0, atol=0)
            _, feature = plain_with_feature(unet, branch, x0, t0, c0, **{side: extra0})
            reference, _ = plain_with_feature(unet, branch, x1, t1, c1, feature=feature, **{side: extra1})
            torch.testing.assert_close(unet(x1, t1, c1, **{side: extra1}), reference, rtol=1e-5, atol=1e-5)


def test_reusing_calls_skip_the_deep_blocks(unet):
    """Counted with forward hooks: a reusing call runs the encoder blocks making skips 1..m, the decoder ResBlocks
    taking skips m..0, and neither the middle block nor anything deeper; FLOPs fall accordingly."""
    encoder = [m for level in unet.down for m in [*level.res, *([level.resample] if level.resample else [])]]
    decoder = decoder_blocks(unet)
    ran = []
    handles = [m.register_forward_hook(lambda m, a, o: ran.append(m)) for m in [*encoder, *decoder, unet.mid.res1]]
    x, t, context = inputs(0)
    try:
        with torch.no_grad():
            for branch in range(len(unet.skip_channels)):
                unet.deepcache = DeepCache(2, branch)
                unet(x, t, context)
                ran.clear()
                unet(x, t, context)
                # encoder module k makes skip k + 1; decoder block j takes skip S - 1 - j
                expected = encoder[:branch] + decoder[len(decoder) - 1 - branch:]
                assert [id(m) for m in ran] == [id(m) for m in expected]
    finally:
        for h in handles:
            h.remove()
    fractions = [skipped_fraction(unet, x, t, context, b) for b in range(len(unet.skip_channels))]
    assert all(a > b > 0 for a, b in zip(fractions, fractions[1:]))   # shallower branch: more skipped
    assert unet.deepcache.branch == len(unet.skip_channels) - 1       # skipped_fraction put the option back


def test_new_input_shape_runs_in_full():
    """A call whose batch or size differs from the cached one (CFG's batch halving outside a guidance interval)
    runs the plain U-Net and caches afresh."""
    torch.manual_seed(0)
    unet = UNet(tiny_config()).eval()
    unet.deepcache = DeepCache(4, 0)
    with torch.no_grad():
        unet(*inputs(0, batch=2))
        for call, (batch, size) in enumerate([(1, (8, 8)), (2, (8, 16))]):
            x, t, context = inputs(call + 1, batch=batch, size=size)
            plain, _ = plain_with_feature(unet, 0, x, t, context)
            assert torch.equal(unet(x, t, context), plain)


def test_options_are_checked():
    for args, message in (((0,), "interval N must be an integer >= 1"), ((2.5,), "interval N must be an integer"),
                          ((2, -1), "branch must be an integer >= 0")):
        with pytest.raises(ValueError, match=message):
            DeepCache(*args)
    unet = UNet(tiny_config())
    unet.deepcache = DeepCache(2, len(unet.skip_channels))
    with pytest.raises(ValueError, match=r"this U-Net has 4 skip branches, 0..3"):
        unet(*inputs(0))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    save_random_model(str(folder))
    return TextToImage.from_folder(str(folder))


def test_pipeline_cache_is_per_run(pipe):
    """Each sample call starts with an empty cache and leaves none: a run after another prompt, or another batch
    size, draws what it draws on a fresh pipeline; N = 1 draws the plain images, N = 2 others."""
    run = dict(steps=5, seed=3, sampler="dpmpp_2m")   # 5 calls: a count carried over would reuse at the next run's first
    pipe.set_deepcache(None)
    plain, _ = pipe.sample(["a red circle"], **run)
    pipe.set_deepcache(1)
    assert torch.equal(pipe.sample(["a red circle"], **run)[0], plain)
    pipe.set_deepcache(2, 1)
    alone, _ = pipe.sample(["a red circle"], **run)
    assert (alone - plain).abs().max() > 1e-4
    assert pipe.unet.deepcache.feature is None and pipe.unet.deepcache.calls == 0
    pipe.sample(["a blue square", "a green triangle"], **run)
    assert torch.equal(pipe.sample(["a red circle"], **run)[0], alone)
    pipe.sample(["a blue square"], **{**run, "seed": 4})       # the same batch size: only a reset tells them apart
    assert torch.equal(pipe.sample(["a red circle"], **run)[0], alone)
    pipe.set_deepcache(None)


def test_pipeline_counts_net_calls(pipe):
    """Heun calls the net twice a step (but the last): full calls are every N-th call, not every N-th step."""
    steps, interval = 5, 3
    pipe.set_deepcache(interval, 0)
    mids = []
    handle = pipe.unet.mid.res1.register_forward_hook(lambda m, a, o: mids.append(1))
    try:
        _, info = pipe.sample(["a red circle"], steps=steps, seed=0, sampler="heun", teacher=True)
    finally:
        handle.remove()
        pipe.set_deepcache(None)
    calls = info["nfe"] // 2                                       # CFG: two evaluations a call
    assert calls == 2 * steps - 1 and len(mids) == -(-calls // interval)


def test_pipeline_refuses_non_unets_and_bad_branches(pipe):
    from ldm.models.mmdit import MMDiT, MMDiTConfig
    with pytest.raises(ValueError, match=r"this U-Net has 4 skip branches, 0..3"):
        pipe.set_deepcache(2, 4)
    assert pipe.unet.deepcache is None
    unet, pipe.unet = pipe.unet, MMDiT(MMDiTConfig(in_channels=4, out_channels=4, depth=1, num_heads=2, head_dim=8,
                                                   context_dim=32, caption_dim=16, pooled_dim=0, pos_embed_max_size=8,
                                                   sample_size=8))
    try:
        with pytest.raises(ValueError, match="DeepCache works on U-Nets.*MMDiT"):
            pipe.set_deepcache(3)
    finally:
        pipe.unet = unet
