"""CFG in a limited interval of noise levels (Kynkaanniemi et al. 2024): the wrapper, EDM's sigma of each schedule,
and --guidance-interval end to end on the shipped model."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ldm import txt2img
from ldm.diffusion.guidance import cfg, check_interval, edm_sigma
from ldm.diffusion.schedules import make_schedule
from ldm.pipeline import DEFAULT_MODEL, TextToImage, save_random_model

B, L, D = 4, 5, 8


class TextNet(nn.Module):
    """A text-conditional stand-in, nonlinear in x, t and the context; a forward hook on its conv (a plain
    torch module) records the batch of every network evaluation."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.batches = []
        self.conv.register_forward_hook(lambda module, args, out: self.batches.append(args[0].shape[0]))

    def forward(self, x, t, context):
        pooled = context.mean(1)                                                      # (B, D)
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        return torch.tanh(self.conv(x) * pooled[:, :1, None, None]) + (pooled[:, 1] * t)[:, None, None, None]


def inputs(batch=B):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 2, 4, 4, generator=g), torch.randn(batch, L, D, generator=g),
            {"context": torch.randn(1, L, D, generator=g)})


SIGMA = lambda t: torch.as_tensor(t, dtype=torch.float64)   # noqa: E731  a model whose time is EDM's sigma itself


@pytest.mark.parametrize("w", [3.0, torch.tensor([0.5, 1.0, 2.0, 4.0])], ids=["w3", "per-sample-w"])
def test_inside_the_interval_it_is_plain_cfg(w):
    x, ctx, null = inputs()
    net = TextNet()
    t = torch.full((B,), 1.5)
    limited = cfg(net, w, null, interval=(0.5, 2.0), noise_level=SIGMA)(x, t, context=ctx)
    assert net.batches == [2 * B]
    assert torch.equal(limited, cfg(net, w, null)(x, t, context=ctx))


@pytest.mark.parametrize("t", [0.3, 5.0, 1e6], ids=["below", "above", "far-above"])
def test_outside_it_is_the_conditional_model_in_one_pass(t):
    x, ctx, null = inputs()
    net = TextNet()
    t = torch.full((B,), t)
    out = cfg(net, 3.0, null, interval=(0.5, 2.0), noise_level=SIGMA)(x, t, context=ctx)
    assert net.batches == [B]                                  # the unconditional half never ran
    assert torch.equal(out, net(x, t, context=ctx))


def test_lo_is_excluded_and_hi_included():
    """(lo, hi] as the paper's eq. 6, on the identity map and through rectified flow, where sigma = t / (1 - t) is
    exact in floating point at t = 0.5 (sigma 1) and t = 0.75 (sigma 3)."""
    x, ctx, null = inputs(1)
    for noise_level, interval, at_lo, at_hi in ((SIGMA, (0.5, 2.0), 0.5, 2.0),
                                                (edm_sigma(make_schedule("rectified_flow")), (1.0, 3.0), 0.5, 0.75)):
        net = TextNet()
        model = cfg(net, 3.0, null, interval=interval, noise_level=noise_level)
        for t, guided in ((at_lo, False), (at_hi, True), (np.nextafter(at_lo, 1.0), True),
                          (np.nextafter(at_hi, np.inf), False)):
            net.batches.clear()
            model(x, torch.tensor([t], dtype=torch.float64), context=ctx)
            assert net.batches == [2 if guided else 1], (interval, t)


def test_per_sample_t_guides_the_samples_inside_only():
    x, ctx, null = inputs()
    net = TextNet()
    t = torch.tensor([1.5, 0.5, 2.0, 7.0])                     # inside, at lo (out), at hi (in), above (out)
    out = cfg(net, 3.0, null, interval=(0.5, 2.0), noise_level=SIGMA)(x, t, context=ctx)
    assert net.batches == [2 * B]                              # one pass of 2B serves both kinds
    guided, cond = cfg(net, 3.0, null)(x, t, context=ctx), net(x, t, context=ctx)
    torch.testing.assert_close(out[[0, 2]], guided[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(out[[1, 3]], cond[[1, 3]], rtol=1e-6, atol=1e-6)   # a B-batch vs a 2B-batch call
    assert (guided[[1, 3]] - cond[[1, 3]]).abs().max() > 1e-2  # guidance would have moved them


def test_rescale_and_the_unbounded_interval():
    x, ctx, null = inputs()
    net = TextNet()
    t = torch.full((B,), 1.5)
    torch.testing.assert_close(cfg(net, 3.0, null, 0.7, interval=(1.0, math.inf), noise_level=SIGMA)(x, t, context=ctx),
                               cfg(net, 3.0, null, 0.7)(x, t, context=ctx), rtol=0, atol=0)
    net.batches.clear()
    cfg(net, 3.0, null, interval=(0.0, math.inf), noise_level=SIGMA)(x, torch.full((B,), 1e9), context=ctx)
    assert net.batches == [2 * B]                              # (0, inf] is CFG everywhere


def test_bad_intervals_are_refused():
    for interval, message in (((2.0, 2.0), "0 <= LO < HI"), ((3.0, 1.0), "0 <= LO < HI"),
                              ((-0.1, 1.0), "0 <= LO < HI"), ((float("nan"), 1.0), "0 <= LO < HI")):
        with pytest.raises(ValueError, match=message):
            check_interval(interval)
    with pytest.raises(ValueError, match="needs noise_level"):
        cfg(TextNet(), 1.0, {}, interval=(0.1, 1.0))


def test_edm_sigma_of_each_schedule_kind():
    """sigma_t / alpha_t against closed forms: discrete VP sqrt((1 - abar) / abar), cosine log-SNR tan(pi t / 2),
    VE sigma_min (sigma_max / sigma_min)^t, rectified flow t / (1 - t); 0 at clean data, inf at zero SNR; a net
    fed t * time_scale maps through t / time_scale."""
    for name in ("linear", "scaled_linear", "cosine"):
        sched = make_schedule(name)
        t = torch.tensor([0.0, 1.0, 250.0, 999.0], dtype=torch.float64)
        abar = sched.alphas_cumprod[t.long()]
        torch.testing.assert_close(edm_sigma(sched)(t), ((1 - abar) / abar).sqrt(), rtol=1e-9, atol=0)
    zero = make_schedule("scaled_linear", zero_snr=True)
    assert math.isinf(float(edm_sigma(zero)(torch.tensor([999.0]))[0]))
    t = torch.tensor([0.05, 0.3, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(edm_sigma(make_schedule("cosine_logsnr"))(t), torch.tan(math.pi / 2 * t),
                               rtol=1e-9, atol=0)
    assert float(edm_sigma(make_schedule("cosine_logsnr"))(torch.tensor(1.0))) == pytest.approx(math.exp(10))  # clip
    torch.testing.assert_close(edm_sigma(make_schedule("ve", sigma_min=0.02, sigma_max=80.0))(t),
                               0.02 * (80.0 / 0.02) ** t, rtol=1e-12, atol=0)
    flow = make_schedule("rectified_flow", shift=3.0)          # a grid shift moves the grid, not sigma(t)
    torch.testing.assert_close(edm_sigma(flow)(t), t / (1 - t), rtol=1e-12, atol=0)
    assert math.isinf(float(edm_sigma(flow)(torch.tensor(1.0))))
    for sched in (flow, make_schedule("cosine"), make_schedule("ve")):
        assert float(edm_sigma(sched)(torch.tensor(-1.0))) == 0.0                    # CLEAN
    cosine = make_schedule("cosine_logsnr")
    torch.testing.assert_close(edm_sigma(cosine, 1000.0)(t.float() * 1000), edm_sigma(cosine)(t), rtol=1e-6, atol=0)


# ---- the pipeline and the CLI, on the shipped model (ldm/assets/shapes64: cosine log-SNR, a 2-step grid at
# sigma / alpha = 22026 and 1.0) ----

@pytest.fixture(scope="module")
def shipped(one_thread_module):
    return TextToImage.from_folder(DEFAULT_MODEL, decoder_precision="fp32")


def sample(pipe, net, prompts, **kwargs):
    """pipe.sample's latents and nfe, checked against the rows `net` (a torch module) actually ran per prompt."""
    rows = []
    hook = net.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        z, info = pipe.sample(prompts, **kwargs)
    finally:
        hook.remove()
    assert sum(rows) == info["nfe"] * len(prompts), (rows, info)
    return z, info["nfe"]


def test_pipeline_interval_against_plain_cfg_and_the_conditional_model(shipped):
    run = dict(steps=2, teacher=True, seed=3)
    plain, nfe = sample(shipped, shipped.unet, ["a red circle"], **run)
    assert nfe == 4
    every, nfe = sample(shipped, shipped.unet, ["a red circle"], guidance_interval=(0.5, math.inf), **run)
    assert nfe == 4 and torch.equal(every, plain)
    with pytest.warns(UserWarning, match=r"holds none of this run's 2 steps"):
        none, nfe = sample(shipped, shipped.unet, ["a red circle"], guidance_interval=(2.0, 3.0), **run)
    cond, _ = sample(shipped, shipped.unet, ["a red circle"], guidance=0.0, **run)
    assert nfe == 2 and torch.equal(none, cond)
    for interval in ((2.0, math.inf), (0.0, 2.0)):             # the first step only, the second only
        half, nfe = sample(shipped, shipped.unet, ["a red circle"], guidance_interval=interval, **run)
        assert nfe == 3 and (half - plain).abs().max() > 1e-3 and (half - cond).abs().max() > 1e-3
    with pytest.raises(ValueError, match="--guidance-interval needs the teacher"):
        shipped.sample(["a red circle"], steps=4, guidance_interval=(0.28, 5.42))
    with pytest.raises(ValueError, match="0 <= LO < HI"):
        shipped.sample(["a red circle"], guidance_interval=(5.0, 1.0), **run)


def test_guidance_rescale_path_maps_the_nets_time(shipped):
    """With --guidance-rescale CFG wraps the raw net, which sees t * 1000: the interval must still read sigma(t)."""
    run = dict(steps=2, teacher=True, seed=3, guidance_rescale=0.7)
    plain, _ = sample(shipped, shipped.unet, ["a blue square"], **run)
    every, nfe = sample(shipped, shipped.unet, ["a blue square"], guidance_interval=(0.5, 1e9), **run)
    assert nfe == 4 and torch.equal(every, plain)
    _, nfe = sample(shipped, shipped.unet, ["a blue square"], guidance_interval=(0.0, 2.0), **run)
    assert nfe == 3


def test_cli_flag_png_settings_and_replay(tmp_path, capsys, one_thread):
    common = ["a red circle above a blue square", "--teacher", "--steps", "2", "--decoder-precision", "fp32"]
    txt2img.main([*common, "--guidance-interval", ":2", "--out", str(tmp_path / "a.png")])
    assert "teacher, 2 steps, ddim, w=2, NFE 3," in capsys.readouterr().out
    with Image.open(tmp_path / "a.png") as im:
        run = json.loads(im.text["ldm"])
    assert run["guidance_interval"] == ":2.0" and run["drawn_by"] == "teacher"
    txt2img.main(["--replay", str(tmp_path / "a.png"), "--decoder-precision", "fp32", "--out", str(tmp_path / "b.png")])
    assert "NFE 3," in capsys.readouterr().out                 # (the decoder precision is not replayed: auto is bf16
                                                               # on a CPU with native bf16)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


@pytest.mark.parametrize("value, message", [("5:1", "need 0 <= LO < HI"), ("-1:2", "need 0 <= LO < HI"),
                                            ("2:2", "need 0 <= LO < HI"), ("0.3", "expected LO:HI"),
                                            (":", "expected LO:HI"), ("a:b", "expected LO:HI")])
def test_cli_refuses_bad_intervals(value, message, capsys):
    with pytest.raises(SystemExit) as e:
        txt2img.main(["a red circle", "--teacher", f"--guidance-interval={value}"])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_refuses_it_with_a_student(tmp_path, capsys, one_thread):
    with pytest.raises(SystemExit) as e:
        txt2img.main(["a red circle", "--steps", "4", "--guidance-interval", "0.28:5.42",
                      "--out", str(tmp_path / "s.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--guidance-interval needs the teacher" in err and "student-4" in err
    assert not (tmp_path / "s.png").exists()


class GuidanceBound(nn.Module):
    """The tiny U-Net as a guidance-distilled net (FLUX.1-dev's interface: the scale as an input, here added to
    the output), to run the pipeline's true-CFG branch without FLUX.1 weights."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.cfg = unet, unet.cfg

    def forward(self, x, t, context, guidance=None, **kwargs):
        return self.unet(x, t, context, **kwargs) + 0.01 * guidance[:, None, None, None]


def test_true_cfg_branch_takes_the_interval(tmp_path, one_thread):
    save_random_model(str(tmp_path), resolution=32)
    pipe = TextToImage.from_folder(str(tmp_path), decoder_precision="fp32")
    pipe.index.guidance_embed, pipe.unet = True, GuidanceBound(pipe.unet)
    run = dict(steps=3, seed=0, negative="a blue square")
    net = pipe.unet.unet
    true, nfe = sample(pipe, net, ["a red circle"], true_cfg=4.0, **run)
    assert nfe == 6
    limited, nfe = sample(pipe, net, ["a red circle"], true_cfg=4.0, guidance_interval=(0.0, 1.0), **run)
    assert nfe == 4                                            # cosine log-SNR at 3 steps: 22026, 1.73, 0.58
    with pytest.warns(UserWarning, match="holds none"):
        none, nfe = sample(pipe, net, ["a red circle"], true_cfg=4.0, guidance_interval=(1e5, 1e6), **run)
    assert nfe == 3 and torch.equal(none, pipe.sample(["a red circle"], true_cfg=1.0, **run)[0])
    assert (limited - true).abs().max() > 1e-4 and (limited - none).abs().max() > 1e-4
    with pytest.raises(ValueError, match="distilled into the net"):
        pipe.sample(["a red circle"], steps=3, guidance_interval=(0.0, 1.0))
    ctrl = type("ControlledFlux", (), {"cond_half": True})()    # FLUX.1 ControlNets under CFG halve the batch
    with pytest.raises(ValueError, match="not supported with FLUX.1 ControlNets"):
        pipe._refuse_interval_with_cond_half(ctrl, (0.0, 1.0))
