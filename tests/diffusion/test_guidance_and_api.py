"""CFG wrapper against two separate calls; the shared sampler contract."""
import inspect

import pytest
import torch
from torch import nn

from ldm.diffusion.guidance import cfg
from ldm.diffusion.param import Denoiser
from ldm.diffusion.samplers import SAMPLERS, initial_noise
from ldm.diffusion.schedules import make_schedule

B, L, D = 3, 5, 8


class TextNet:
    """A text-conditional stand-in: nonlinear in x, context, mask and t; counts its calls."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, context, context_mask=None, scale=1.0):
        self.batches.append(x.shape[0])
        mask = torch.ones(context.shape[:2]) if context_mask is None else context_mask.float()
        pooled = (context * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)   # (B, D)
        return torch.tanh(x * pooled[:, :1, None, None] * scale) + pooled[:, 1:2, None, None] * t[:, None, None, None]


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 2, 4, 4, generator=g)
    t = torch.tensor([10.0, 500.0, 900.0])
    ctx = torch.randn(B, L, D, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False
    null = {"context": torch.randn(1, L, D, generator=g), "context_mask": torch.ones(1, L, dtype=torch.bool)}
    return x, t, ctx, mask, null


@pytest.mark.parametrize("w", [0.5, 6.5, torch.tensor([0.0, 1.0, 3.0])], ids=["0.5", "6.5", "per-sample"])
def test_cfg_equals_two_separate_calls(w):
    x, t, ctx, mask, null = _inputs()
    net = TextNet()
    guided = cfg(net, w, null)(x, t, context=ctx, context_mask=mask, scale=0.7)
    assert net.batches == [2 * B]                                   # one batched call
    cond = net(x, t, ctx, mask, scale=0.7)
    uncond = net(x, t, null["context"].expand(B, L, D), null["context_mask"].expand(B, L), scale=0.7)
    wb = torch.as_tensor(w).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(guided, (1 + wb) * cond - wb * uncond)


def test_cfg_w_zero_is_the_conditional_model_in_one_pass():
    x, t, ctx, mask, null = _inputs()
    net = TextNet()
    out = cfg(net, 0.0, null)(x, t, context=ctx, context_mask=mask)
    assert net.batches == [B]
    torch.testing.assert_close(out, net(x, t, ctx, mask))


def test_cfg_rejects_mismatched_uncond():
    x, t, ctx, mask, null = _inputs()
    with pytest.raises(ValueError, match="'pooled'"):
        cfg(TextNet(), 1.0, {**null, "pooled": torch.zeros(1, D)})(x, t, context=ctx, context_mask=mask)
    with pytest.raises(ValueError, match="'context'"):
        cfg(TextNet(), 1.0, {"context": torch.zeros(1, L + 1, D)})(x, t, context=ctx, context_mask=mask)


def test_all_samplers_share_one_signature():
    for name, fn in SAMPLERS.items():
        params = inspect.signature(fn).parameters
        assert list(params)[:4] == ["model", "x", "ts", "schedule"], name
        for key in ("extra_args", "callback", "disable", "generator"):
            assert params[key].kind is inspect.Parameter.KEYWORD_ONLY and params[key].default is None, (name, key)


class TinyEpsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, t, context):
        return self.conv(x) * torch.cos(t / 1000)[:, None, None, None] + context.mean((1, 2))[:, None, None, None]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_run_a_guided_network_in_float32(name):
    torch.manual_seed(0)
    sched = make_schedule("scaled_linear")
    model = cfg(Denoiser(TinyEpsNet(), sched, "v"), 2.0, {"context": torch.zeros(1, L, D)})
    ts = sched.timesteps(4)
    gen = torch.Generator().manual_seed(0)
    x = initial_noise(sched, ts, (2, 2, 6, 6), generator=gen)
    seen = []
    options = {"pc": {"n_corrector": 1}, "langevin": {"n_steps": 2}}.get(name, {})
    out = SAMPLERS[name](model, x, ts, sched, extra_args={"context": torch.randn(2, L, D)}, disable=True,
                         generator=gen, callback=lambda d: seen.append(d), **options)
    assert out.shape == x.shape and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert [d["i"] for d in seen] == [0, 1, 2, 3] and [d["t"] for d in seen] == ts[:-1].tolist()
    assert set(seen[0]) == {"i", "t", "x", "denoised"}


def test_sampler_rejects_a_one_entry_grid():
    sched = make_schedule("linear")
    with pytest.raises(ValueError, match="at least 2"):
        SAMPLERS["ddim"](lambda x, t: x, torch.zeros(1, 2), torch.tensor([999.0]), sched)
