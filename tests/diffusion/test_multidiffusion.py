"""MultiDiffusion's window fusion (ldm.diffusion.multidiffusion) against closed forms and explicit loops."""
import pytest
import torch

from ldm.diffusion.guidance import cfg
from ldm.diffusion.multidiffusion import window_boxes, window_starts, windowed
from ldm.diffusion.samplers import SAMPLERS
from ldm.diffusion.schedules import schedule_from_config


def pointwise(x, t, **_):
    """x0-hat = f(x) elementwise, on a grid of eighths: sums of a few such values are exact in fp32."""
    return torch.round(8 * torch.tanh(x)) / 8


def window_mean(x, t, scale=None, **_):
    """x0-hat depends on the whole window: x minus the window's mean, times a per-sample scale."""
    out = x - x.mean(dim=(-2, -1), keepdim=True)
    return out if scale is None else out * scale.view(-1, 1, 1, 1)


@pytest.mark.parametrize("length, window, stride, expected", [
    (10, 4, 3, [0, 3, 6]),            # lands on the edge
    (11, 4, 3, [0, 3, 6, 7]),         # does not: one more window flush with the edge
    (16, 16, 4, [0]),                 # the native size: one window
    (17, 16, 8, [0, 1]),              # one pixel over
    (64, 16, 4, list(range(0, 49, 4))),
])
def test_window_starts(length, window, stride, expected):
    assert window_starts(length, window, stride) == expected


@pytest.mark.parametrize("length, window, stride", [(8, 9, 1), (8, 0, 1), (8, 4, 0)])
def test_window_starts_refuses(length, window, stride):
    with pytest.raises(ValueError):
        window_starts(length, window, stride)


@pytest.mark.parametrize("size, window, stride", [
    ((8, 32), (8, 8), (4, 4)),        # a panorama, stride dividing
    ((8, 30), (8, 8), (4, 5)),        # (30 - 8) % 5 != 0: the edge window
    ((19, 13), (6, 5), (4, 3)),       # both sides odd, both edges
])
def test_windows_cover_every_position(size, window, stride):
    covered = torch.zeros(size, dtype=torch.int64)
    for top, left in window_boxes(size, window, stride):
        assert top + window[0] <= size[0] and left + window[1] <= size[1]
        covered[top:top + window[0], left:left + window[1]] += 1
    assert covered.min() >= 1
    assert covered[-1, -1] >= 1 and covered[0, 0] >= 1


@pytest.mark.parametrize("size, window, stride", [((8, 32), (8, 8), (4, 4)), ((19, 13), (6, 5), (4, 3))])
def test_pointwise_model_unchanged_exactly(size, window, stride):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.5)
    assert torch.equal(windowed(pointwise, window, stride)(x, t), pointwise(x, t))


def reference_fusion(model, x, t, window, stride_starts, **extra):
    """Per position, the mean of `model` over the windows containing it, with explicit loops and hand-listed
    window offsets (independent of window_starts)."""
    (tops, lefts), (h, w) = stride_starts, window
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        preds = {(i, j): model(x[b:b + 1, :, i:i + h, j:j + w], t[b:b + 1],
                               **{k: v[b:b + 1] for k, v in extra.items()})[0]
                 for i in tops for j in lefts}
        for r in range(x.shape[-2]):
            for c in range(x.shape[-1]):
                covering = [p[:, r - i, c - j] for (i, j), p in preds.items() if i <= r < i + h and j <= c < j + w]
                out[b, :, r, c] = sum(covering) / len(covering)
    return out


@pytest.mark.parametrize("size, window, stride, starts", [
    ((6, 20), (6, 6), (6, 4), ([0], [0, 4, 8, 12, 14])),            # edge window at 14
    ((9, 11), (4, 5), (3, 3), ([0, 3, 5], [0, 3, 6])),              # 2-D, edge windows on both sides
])
@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_window_dependent_model_matches_loops(size, window, stride, starts, chunk):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, *size, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9])
    scale = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)    # per sample: must follow its sample's windows
    got = windowed(window_mean, window, stride, chunk=chunk)(x, t, scale=scale)
    want = reference_fusion(window_mean, x, t, window, starts, scale=scale)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, window_mean(x, t, scale=scale))  # the windows change it: the test can fail


def test_one_window_is_the_model():
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.full((2,), 0.3)
    assert torch.equal(windowed(window_mean, (8, 8), (4, 4))(x, t), window_mean(x, t))


def test_composes_with_cfg():
    """cfg(windowed) == windowed(cfg): both linear in the predictions; context rows follow their sample."""
    def model(x, t, context):
        return window_mean(x, t) * context.view(-1, 1, 1, 1) + context.view(-1, 1, 1, 1)
    x = torch.randn(2, 1, 4, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.full((2,), 0.5)
    context, uncond = torch.tensor([2.0, 3.0], dtype=torch.float64), {"context": torch.zeros(1, dtype=torch.float64)}
    a = cfg(windowed(model, (4, 4), (4, 3)), 1.5, uncond)(x, t, context=context)
    b = windowed(cfg(model, 1.5, uncond), (4, 4), (4, 3))(x, t, context=context)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_runs_in_samplers(sampler):
    """Any sampler takes the wrapped model; a pointwise model draws the same as unwrapped."""
    schedule = schedule_from_config({"name": "cosine_logsnr"})
    ts = schedule.timesteps(4, spacing="trailing")
    x = torch.randn(1, 2, 4, 16, generator=torch.Generator().manual_seed(4))
    a = SAMPLERS[sampler](windowed(pointwise, (4, 4), (4, 4)), x, ts, schedule, disable=True)
    b = SAMPLERS[sampler](pointwise, x, ts, schedule, disable=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_fused_x0_step_is_eq7_of_the_windows_steps(sampler):
    """The docstring's claim: one DDIM (or Euler) step on the big latent with the windows' mean x0-hat equals the
    per-pixel mean of each window's own step on its crop (MultiDiffusion, eq. 7 with W_i = 1)."""
    schedule = schedule_from_config({"name": "cosine_logsnr"})
    ts = torch.tensor([0.8, 0.55])                                  # one step between two noise levels
    x = torch.randn(2, 2, 6, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    window, tops, lefts = (6, 6), [0], [0, 4, 8, 12, 14]
    fused = SAMPLERS[sampler](windowed(window_mean, window, (6, 4)), x, ts, schedule, disable=True)
    steps = {(i, j): SAMPLERS[sampler](window_mean, x[..., i:i + 6, j:j + 6], ts, schedule, disable=True)
             for i in tops for j in lefts}
    want = torch.empty_like(x)
    for c in range(x.shape[-1]):
        covering = [s[..., c - j] for (i, j), s in steps.items() if j <= c < j + 6]
        want[..., c] = sum(covering) / len(covering)
    torch.testing.assert_close(fused, want, rtol=1e-10, atol=1e-10)
