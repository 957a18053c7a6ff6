"""Adaptive projected guidance (Sadat, Hilliges & Weber 2024): the combination against diffusers'
AdaptiveProjectedGuidance over successive calls, its closed forms, the `cfg` wrapper's momentum, and the option
through the pipeline, txt2img (--apg, the PNG's settings, refusals) and `ldm.eval report`."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ldm import txt2img
from ldm.cli import format_apg, parse_apg
from ldm.diffusion.guidance import APG, apg_guided, cfg, project
from ldm.pipeline import TextToImage, save_random_model

B, C, H, W = 4, 4, 8, 8


def predictions(calls: int, seed: int = 0, dtype=torch.float32):
    """`calls` pairs (D_cond, D_uncond) (B, C, H, W), the difference's norm spread over the batch (about 4 to 32)
    so that a cut at r = 10 holds some samples and not others."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.tensor([0.5, 1.0, 2.0, 4.0])[:, None, None, None]
    pairs = []
    for _ in range(calls):
        cond = torch.randn(B, C, H, W, generator=g) + 0.5
        pairs.append((cond.to(dtype), (cond + spread * torch.randn(B, C, H, W, generator=g)).to(dtype)))
    return pairs


def parallel_part(v, onto):
    """<v, c> / <c, c> c per sample: the projection, written independently of `project`."""
    v, onto = v.double(), onto.double()
    coef = (v * onto).flatten(1).sum(1) / (onto * onto).flatten(1).sum(1)
    return coef[:, None, None, None] * onto


# (r, eta, beta): the paper's recommendation (eta 0, beta -0.5), a partial parallel part with stronger reverse
# momentum, forward momentum without a cut, and a cut alone
SETTINGS = [(10.0, 0.0, -0.5), (10.0, 0.3, -0.75), (math.inf, 0.5, 0.5), (10.0, 1.0, 0.0)]


@pytest.mark.parametrize("r, eta, beta", SETTINGS, ids=["paper", "eta0.3-beta-0.75", "no-cut-beta0.5", "cut-only"])
@pytest.mark.parametrize("w", [1.0, 6.0])
def test_matches_diffusers_over_successive_calls(r, eta, beta, w):
    """Five successive calls, momentum carried, against diffusers' guider. Conventions: its guidance_scale with
    use_original_formulation=True is our w (cond + w * update, the paper's Algorithm 1 at their scale 1 + w); its
    default form, uncond + (1 + w) * update, is another rule once the update is cut or projected. Space: diffusers'
    pipelines hand it eps / flow predictions, the paper (and our pipeline) x0-hat; here both see the same tensors."""
    guiders = pytest.importorskip("diffusers.guiders")
    theirs = guiders.AdaptiveProjectedGuidance(
        guidance_scale=w, adaptive_projected_guidance_momentum=beta or None,
        adaptive_projected_guidance_rescale=0.0 if r == math.inf else r, eta=eta, use_original_formulation=True)
    default_form = guiders.AdaptiveProjectedGuidance(
        guidance_scale=1 + w, adaptive_projected_guidance_momentum=beta or None,
        adaptive_projected_guidance_rescale=0.0 if r == math.inf else r, eta=eta)
    apg, average = APG(r, eta, beta), None
    for step, (cond, uncond) in enumerate(predictions(5)):
        for guider in (theirs, default_form):
            guider.set_state(step=step, num_inference_steps=5, timestep=torch.tensor(999 - step))
            guider.prepare_inputs({})                  # starts its momentum buffer at step 0
        ours, average = apg_guided(cond, uncond, w, apg, average)
        torch.testing.assert_close(ours, theirs.forward(cond, uncond).pred, atol=1e-5, rtol=1e-5)
        if eta != 1:                                   # the forms agree only where nothing is projected away
            assert (ours - default_form.forward(cond, uncond).pred).abs().max() > 1e-2


def test_eta_1_no_cut_no_momentum_is_plain_cfg():
    """r = inf, eta = 1, beta = 0: (1 + w) cond - w uncond up to rounding (float64), and through `cfg` bit for bit,
    per-sample w included."""
    w = torch.tensor([0.0, 1.0, 3.0, 7.5], dtype=torch.float64)
    for cond, uncond in predictions(2, dtype=torch.float64):
        guided, _ = apg_guided(cond, uncond, w, APG(math.inf, 1.0, 0.0))
        plain = (1 + w[:, None, None, None]) * cond - w[:, None, None, None] * uncond
        torch.testing.assert_close(guided, plain, atol=1e-12, rtol=0)
    x, ctx, null, net = text_inputs()
    for weight in (3.0, w.float()):
        as_apg = cfg(net, weight, null, apg=APG(math.inf, 1.0, 0.0))(x, torch.full((B,), 0.5), context=ctx)
        assert torch.equal(as_apg, cfg(net, weight, null)(x, torch.full((B,), 0.5), context=ctx))


@pytest.mark.parametrize("eta", [0.0, 0.4, 1.0])
def test_parallel_and_orthogonal_parts(eta):
    """guided - cond = w (d_perp + eta d_par) for the cut difference d: its part along cond is w eta d_par, the rest
    w d_perp, orthogonal to cond; the cut leaves each sample's difference at norm min(||dD||, r)."""
    w, r = 2.5, 10.0
    cond, uncond = predictions(1)[0]
    guided, _ = apg_guided(cond, uncond, w, APG(r, eta, 0.0))
    diff = cond - uncond
    norms = diff.flatten(1).norm(dim=1)
    assert (norms < r).any() and (norms > r).any()                        # the cut holds some samples only
    cut = diff * torch.clamp(r / norms, max=1.0)[:, None, None, None]
    update = (guided - cond).double() / w
    par, perp = parallel_part(update, cond), update - parallel_part(update, cond)
    torch.testing.assert_close(par, eta * parallel_part(cut, cond), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(perp, cut.double() - parallel_part(cut, cond), atol=1e-5, rtol=1e-5)
    cosine = (perp * cond.double()).flatten(1).sum(1) / (perp.flatten(1).norm(dim=1) * cond.flatten(1).norm(dim=1))
    assert cosine.abs().max() < 1e-6
    if eta == 1:
        torch.testing.assert_close(update.flatten(1).norm(dim=1), torch.clamp(norms, max=r).double(), rtol=1e-5,
                                   atol=0)
    p, q = project(diff, cond)
    torch.testing.assert_close(p + q, diff, atol=1e-6, rtol=0)


def test_momentum_sums_the_past_differences():
    """A constant difference d over n calls: the running update is d (1 + beta + ... + beta^(n-1))."""
    beta, w = -0.5, 2.0
    cond, uncond = predictions(1)[0]
    average = None
    for n in range(1, 6):
        guided, average = apg_guided(cond, uncond, w, APG(math.inf, 1.0, beta), average)
        total = (1 - beta ** n) / (1 - beta)
        torch.testing.assert_close(guided, cond + w * total * (cond - uncond), atol=1e-5, rtol=1e-5)


class TextNet(nn.Module):
    """A text-conditional stand-in, nonlinear in x, t and the context."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x, t, context):
        pooled = context.mean(1)
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        return torch.tanh(self.conv(x) * pooled[:, :1, None, None]) + (pooled[:, 1] * t)[:, None, None, None]


def text_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, C, H, W, generator=g), torch.randn(B, 5, 8, generator=g),
            {"context": torch.randn(1, 5, 8, generator=g)}, TextNet())


def test_cfg_wrapper_carries_momentum_within_one_wrapper_only():
    """`cfg(apg=...)`: successive calls chain `apg_guided`'s running update; a new wrapper starts afresh; inside a
    guidance interval the calls outside leave the average as it was."""
    x, ctx, null, net = text_inputs()
    apg, w = APG(5.0, 0.0, -0.5), 3.0
    halves = lambda t: (net(x, t, context=ctx), net(x, t, context=null["context"].expand(B, -1, -1)))  # noqa: E731
    model = cfg(net, w, null, apg=apg)
    average = None
    for t in (0.9, 0.6, 0.3):
        expected, average = apg_guided(*halves(torch.full((B,), t)), w, apg, average)
        torch.testing.assert_close(model(x, torch.full((B,), t), context=ctx), expected, atol=1e-6, rtol=0)
    first = cfg(net, w, null, apg=apg)(x, torch.full((B,), 0.9), context=ctx)
    torch.testing.assert_close(first, apg_guided(*halves(torch.full((B,), 0.9)), w, apg)[0], atol=1e-6, rtol=0)
    sigma = lambda t: torch.as_tensor(t, dtype=torch.float64)   # noqa: E731  time is EDM's sigma itself
    limited = cfg(net, w, null, apg=apg, interval=(0.5, 1.0), noise_level=sigma)
    limited(x, torch.full((B,), 0.9), context=ctx)
    assert torch.equal(limited(x, torch.full((B,), 0.3), context=ctx), net(x, torch.full((B,), 0.3), context=ctx))
    after, _ = apg_guided(*halves(torch.full((B,), 0.6)), w, apg, apg_guided(*halves(torch.full((B,), 0.9)), w, apg)[1])
    torch.testing.assert_close(limited(x, torch.full((B,), 0.6), context=ctx), after, atol=1e-6, rtol=0)


@pytest.mark.parametrize("settings", [dict(r=0.0), dict(r=-1.0), dict(r=float("nan")), dict(r=1.0, beta=1.0),
                                      dict(r=1.0, beta=-1.0), dict(r=1.0, eta=float("inf"))])
def test_refuses_bad_settings(settings):
    with pytest.raises(ValueError, match="APG needs r > 0"):
        APG(**settings)


def test_refuses_rescale_with_apg():
    with pytest.raises(ValueError, match="use one"):
        cfg(TextNet(), 2.0, {}, rescale=0.7, apg=APG(2.0))


# ------------------------------------------------------------------------------------------------ pipeline

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("apg-model")
    save_random_model(str(folder), resolution=32)
    return folder


def test_pipeline_apg_on_the_teacher(tiny, one_thread):
    """inf:1:0 draws plain CFG's latents bit for bit; a cut changes them at the same number of net calls; guidance
    rescale, perturbed-attention guidance and a student are refused, naming the flags."""
    pipe = TextToImage.from_folder(str(tiny), decoder_precision="fp32")
    run = dict(steps=3, guidance=6.0, seed=0)
    plain, info = pipe.sample(["a red circle"], **run)
    same, _ = pipe.sample(["a red circle"], apg=APG(math.inf, 1.0, 0.0), **run)
    cut, cut_info = pipe.sample(["a red circle"], apg=APG(0.5), **run)
    assert torch.equal(same, plain) and (cut - plain).abs().max() > 1e-3 and cut_info["nfe"] == info["nfe"] == 6
    again, _ = pipe.sample(["a red circle"], apg=APG(0.5), **run)
    assert torch.equal(again, cut)                                         # momentum starts afresh per run
    with pytest.raises(ValueError, match="--apg and --guidance-rescale"):
        pipe.sample(["a red circle"], apg=APG(0.5), guidance_rescale=0.7, **run)
    with pytest.raises(ValueError, match="--apg is not combined with --pag"):
        pipe.sample(["a red circle"], apg=APG(0.5), pag_scale=3.0, **run)
    index = json.loads((tiny / "model_index.json").read_text())
    students = tiny.parent / "apg-with-student"
    shutil.copytree(tiny, students, dirs_exist_ok=True)
    (students / "model_index.json").write_text(json.dumps({**index, "students": {"2": "student-2"}}))
    with pytest.raises(ValueError, match="--apg needs the teacher"):        # refused before the student loads
        TextToImage.from_folder(str(students)).sample(["a red circle"], steps=2, apg=APG(0.5))


class GuidanceBound(nn.Module):
    """The tiny U-Net as a guidance-distilled net (FLUX.1-dev's interface: the scale as an input)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.cfg = unet, unet.cfg

    def forward(self, x, t, context, guidance=None, **kwargs):
        return self.unet(x, t, context, **kwargs) + 0.01 * guidance[:, None, None, None]


def test_pipeline_apg_with_true_cfg(tiny, one_thread):
    """FLUX.1-dev: APG changes true CFG's combination (inf:1:0 is true CFG itself); without true CFG there is no CFG
    to change."""
    pipe = TextToImage.from_folder(str(tiny), decoder_precision="fp32")
    pipe.index.guidance_embed, pipe.unet = True, GuidanceBound(pipe.unet)
    run = dict(steps=3, seed=0, negative="a blue square", true_cfg=6.0)
    true, _ = pipe.sample(["a red circle"], **run)
    assert torch.equal(pipe.sample(["a red circle"], apg=APG(math.inf, 1.0, 0.0), **run)[0], true)
    assert (pipe.sample(["a red circle"], apg=APG(0.5), **run)[0] - true).abs().max() > 1e-3
    for true_cfg in (None, 1.0):
        with pytest.raises(ValueError, match="--apg changes CFG; this model's guidance is distilled into the net"):
            pipe.sample(["a red circle"], steps=3, true_cfg=true_cfg, apg=APG(0.5))


# ------------------------------------------------------------------------------------------------ CLI

@pytest.mark.parametrize("text, expected", [("2", APG(2.0)), ("2:0.3", APG(2.0, 0.3)), ("2::0", APG(2.0, 0.0, 0.0)),
                                            ("inf:1:0", APG(math.inf, 1.0, 0.0)),
                                            ("1.5:0:-0.75", APG(1.5, 0.0, -0.75))])
def test_parse_apg(text, expected):
    assert parse_apg(text) == expected and parse_apg(format_apg(expected)) == expected


@pytest.mark.parametrize("value, message", [("0", "APG needs r > 0"), ("2:0:1", "-1 < beta < 1"),
                                            ("2:x", "expected R[:ETA[:BETA]]"), (":0.5", "expected R[:ETA[:BETA]]"),
                                            ("1:0:0:0", "expected R[:ETA[:BETA]]"), ("nan", "APG needs r > 0")])
def test_cli_refuses_bad_values(value, message, capsys):
    with pytest.raises(SystemExit) as e:
        txt2img.main(["a red circle", "--teacher", f"--apg={value}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--apg" in err and message in err


@pytest.mark.parametrize("flags, message", [
    (["--steps", "4"], "--apg needs the teacher"),                               # the shipped model's student-4
    (["--teacher", "--guidance-rescale", "0.7"], "--apg and --guidance-rescale"),
    (["--teacher", "--true-cfg", "4"], "--true-cfg (true_cfg) is for")])
def test_cli_refusals_before_any_model_runs(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        txt2img.main(["a red circle", "--apg", "2", *flags, "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_png_settings_and_replay(tmp_path, capsys, one_thread):
    common = ["a red circle above a blue square", "--teacher", "--steps", "2", "--guidance", "6",
              "--decoder-precision", "fp32"]
    txt2img.main([*common, "--apg", "1.5::-0.75", "--out", str(tmp_path / "a.png")])
    txt2img.main([*common, "--out", str(tmp_path / "plain.png")])
    with Image.open(tmp_path / "a.png") as im:
        run, parameters, first = json.loads(im.text["ldm"]), im.text["parameters"], np.asarray(im)
    assert run["apg"] == "1.5:0.0:-0.75"
    assert "CFG scale: 7, " in parameters and ", APG r: 1.5, APG eta: 0, APG momentum: -0.75" in parameters
    assert not np.array_equal(first, np.asarray(Image.open(tmp_path / "plain.png")))
    with Image.open(tmp_path / "plain.png") as im:
        assert "apg" not in json.loads(im.text["ldm"]) and "APG" not in im.text["parameters"]
    txt2img.main(["--replay", str(tmp_path / "a.png"), "--decoder-precision", "fp32", "--out", str(tmp_path / "b.png")])
    with Image.open(tmp_path / "b.png") as im:
        assert json.loads(im.text["ldm"]) == run and np.array_equal(np.asarray(im), first)


# ------------------------------------------------------------------------------------------------ eval

def test_report_apg_reaches_the_teacher_only(tiny, tmp_path, capsys, one_thread):
    from ldm.eval.__main__ import main
    from ldm.eval.report import make_report

    with pytest.raises(SystemExit) as e:
        main(["report", "--model", str(tiny), "--n", "2", "--apg", "2:0:1"])
    assert e.value.code == 2 and "--apg: " in capsys.readouterr().err
    grids = {}
    for name, apg in (("plain", None), ("apg", APG(0.5))):
        report = make_report(tiny, tmp_path / name, n=2, teacher_steps=(2,), ws=(6,), guidance=6.0, device="cpu",
                             apg=apg)
        grids[name] = (tmp_path / name / report["rows"][0]["grid"]).read_bytes()
    assert grids["plain"] != grids["apg"] and report["apg"] == "0.5:0.0:-0.5"
    assert [row["model"] for row in report["rows"]] == ["teacher"] and report["student_sweep"] is None
    assert "adaptive projected guidance, R:ETA:BETA 0.5:0.0:-0.5" in (tmp_path / "apg" / "report.md").read_text()
