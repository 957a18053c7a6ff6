"""Perturbed-attention guidance (Ahn et al. 2024) as a model wrapper, in the pipeline, the CLIs and the report:
the combination and the batch it runs, scale 0 as plain CFG, the refusals, the PNG's settings."""
import json
from contextlib import contextmanager

import pytest
import torch
from PIL import Image
from torch import nn

from ldm import txt2img
from ldm.diffusion.guidance import cfg, pag
from ldm.models.mmdit import MMDiT, MMDiTConfig
from ldm.pipeline import TextToImage, save_random_model

from tests.tiny_models import random_model_with_student, write_image_and_mask

B, L, D = 3, 5, 8


class PerturbableNet(nn.Module):
    """A text-conditional stand-in whose output changes where `perturb` marked the sample; records each call's batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.marked, self.calls = None, []

    @contextmanager
    def perturb(self, samples):
        self.marked = samples
        try:
            yield
        finally:
            self.marked = None

    def forward(self, x, t, context):
        self.calls.append((x.shape[0], None if self.marked is None else self.marked.tolist()))
        out = torch.tanh(self.conv(x) * context.mean(1)[:, :1, None, None])
        if self.marked is not None:
            out = torch.where(self.marked[:, None, None, None], out.flip(-1) * 0.5 + 0.1, out)
        return out


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 2, 4, 4, generator=g), torch.randn(B, L, D, generator=g), \
        {"context": torch.randn(1, L, D, generator=g)}


@pytest.mark.parametrize("w", [0.0, 2.0, torch.tensor([0.0, 1.0, 4.0])], ids=["w0", "w2", "per-sample-w"])
def test_pag_combines_cfg_and_the_perturbed_prediction(w):
    """(1 + w) D(c) - w D(u) + s (D(c) - D_perturbed(c)) from one call over [c; u; c] ([c; c] at w = 0), last B perturbed."""
    x, ctx, null = inputs()
    net, t, s = PerturbableNet(), torch.full((B,), 0.5), 3.0
    out = pag(net, w, s, null, net.perturb)(x, t, context=ctx)
    parts = 2 if isinstance(w, float) and w == 0 else 3
    assert net.calls == [(parts * B, [False] * (parts - 1) * B + [True] * B)]
    cond, uncond = net(x, t, ctx), net(x, t, null["context"].expand(B, -1, -1))
    with net.perturb(torch.ones(B, dtype=torch.bool)):
        perturbed = net(x, t, ctx)
    wt = torch.as_tensor(w).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out, (1 + wt) * cond - wt * uncond + s * (cond - perturbed), atol=1e-6, rtol=1e-6)


def test_pag_scale_zero_is_cfg():
    x, ctx, null = inputs()
    net, t = PerturbableNet(), torch.full((B,), 0.5)
    torch.testing.assert_close(pag(net, 2.0, 0.0, null, net.perturb)(x, t, context=ctx),
                               cfg(net, 2.0, null)(x, t, context=ctx), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread_module):
    return random_model_with_student(tmp_path_factory.mktemp("model"), w_features=16)


def test_pipeline_pag_counts_calls_and_scale_zero_is_exactly_cfg(model):
    pipe = TextToImage.from_folder(model, decoder_precision="fp32")
    plain, info = pipe.sample(["a red circle", "a blue square"], steps=3, guidance=2.0, teacher=True)
    zero, info0 = pipe.sample(["a red circle", "a blue square"], steps=3, guidance=2.0, teacher=True, pag_scale=0.0)
    assert torch.equal(zero, plain) and info0 == info and info["nfe"] == 6
    guided, info = pipe.sample(["a red circle", "a blue square"], steps=3, guidance=2.0, teacher=True, pag_scale=2.0,
                               pag_layers=["mid"])
    assert info["nfe"] == 9 and (guided - plain).abs().max() > 1e-3
    _, info = pipe.sample(["a red circle"], steps=3, guidance=0.0, teacher=True, pag_scale=2.0)
    assert info["nfe"] == 6
    assert all(a.identity is None for a in pipe.unet.modules() if hasattr(a, "identity"))


def test_pipeline_refuses_pag_where_it_does_not_apply(model):
    pipe = TextToImage.from_folder(model)
    with pytest.raises(ValueError, match="--pag needs the teacher"):
        pipe.sample(["a red circle"], steps=2, pag_scale=1.0)                          # student-2 would run
    with pytest.raises(ValueError, match="not combined with --guidance-interval"):
        pipe.sample(["a red circle"], steps=3, pag_scale=1.0, guidance_interval=(0.5, 5.0))
    with pytest.raises(ValueError, match=r"no self-attention layer 'down\.0'.*its layers: down, down\.1"):
        pipe.sample(["a red circle"], steps=3, pag_scale=1.0, pag_layers=["down.0"])
    pipe.unet = MMDiT(MMDiTConfig(in_channels=4, out_channels=4, depth=1, num_heads=2, head_dim=8, context_dim=32,
                                  caption_dim=16, pooled_dim=0, pos_embed_max_size=8, sample_size=8))
    with pytest.raises(ValueError, match=r"--pag .* works on U-Nets.*MMDiT"):
        pipe.sample(["a red circle"], steps=3, pag_scale=1.0)


def test_txt2img_pag_flags_and_png_settings(model, tmp_path, capsys):
    out = tmp_path / "pag.png"
    txt2img.main(["a red circle", "--model", model, "--steps", "3", "--teacher", "--guidance", "1", "--pag", "2.5",
                  "--pag-layers", "mid,up.0", "--out", str(out)])
    assert "NFE 9," in capsys.readouterr().out
    with Image.open(out) as im:
        run, parameters = json.loads(im.text["ldm"]), im.text["parameters"]
    assert run["pag"] == 2.5 and run["pag_layers"] == "mid,up.0"
    assert 'PAG scale: 2.5, PAG layers: "mid,up.0"' in parameters
    plain = tmp_path / "plain.png"
    txt2img.main(["a red circle", "--model", model, "--steps", "3", "--teacher", "--guidance", "1", "--out", str(plain)])
    with Image.open(plain) as im:
        assert "pag" not in json.loads(im.text["ldm"]) and "PAG" not in im.text["parameters"]


@pytest.mark.parametrize("extra,message", [
    (["--pag", "1", "--pag-layers", "mid,down.0"], "--pag-layers: no self-attention layer 'down.0'"),
    (["--pag", "1", "--pag-layers", ","], "expected layer names"),
    (["--pag", "1", "--steps", "2"], "--pag needs the teacher"),
    (["--pag", "1", "--teacher", "--guidance-interval", "0.5:5"], "not combined with --guidance-interval"),
], ids=["unknown-layer", "empty-list", "student", "interval"])
def test_txt2img_pag_errors_are_usage_errors(model, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        txt2img.main(["a red circle", "--model", model, "--steps", "3", *extra, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err
    if "unknown" in message or "self-attention" in message:
        assert "its layers: down, down.1, down.1.0, mid, mid.0, up, up.0" in err


def test_txt2img_help_cites_the_paper(capsys):
    with pytest.raises(SystemExit):
        txt2img.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--pag S" in text and "arXiv 2403.17377" in text and "--pag-layers LIST" in text


def test_report_pag_reaches_the_teacher_only(tmp_path, one_thread):
    from ldm.eval.__main__ import main
    from ldm.eval.report import make_report
    save_random_model(str(tmp_path / "tiny"))
    plain = make_report(tmp_path / "tiny", tmp_path / "plain", n=2, teacher_steps=(2,), ws=(1,), device="cpu")
    guided = make_report(tmp_path / "tiny", tmp_path / "pag", n=2, teacher_steps=(2,), ws=(1,), device="cpu",
                         pag=(2.0, ["mid"]))
    assert plain["rows"][0]["nfe"] == 4 and guided["rows"][0]["nfe"] == 6
    assert guided["pag"] == {"scale": 2.0, "layers": ["mid"]} and plain["pag"] is None
    assert "perturbed-attention guidance s = 2 on mid" in (tmp_path / "pag" / "report.md").read_text()
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--model", str(tmp_path / "tiny"), "--n", "2", "--pag", "1", "--pag-layers", "up.7"])
    assert exit_.value.code == 2


def test_txt2img_replays_pag(model, tmp_path):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    txt2img.main(["a red circle", "--model", model, "--steps", "3", "--teacher", "--pag", "2", "--pag-layers",
                  "up.0,mid", "--out", str(first)])
    txt2img.main(["--replay", str(first), "--out", str(again)])
    with Image.open(first) as a, Image.open(again) as b:
        assert json.loads(b.text["ldm"])["pag_layers"] == "up.0,mid" and json.loads(b.text["ldm"])["pag"] == 2
        assert a.tobytes() == b.tobytes()


def test_img2img_and_inpaint_take_pag(model, tmp_path, capsys):
    from ldm import img2img, inpaint
    write_image_and_mask(tmp_path)
    img2img.main(["a blue square", "--image", str(tmp_path / "in.png"), "--strength", "0.5", "--steps", "4",
                  "--teacher", "--pag", "2", "--model", model, "--out", str(tmp_path / "i.png")])
    assert "2 steps" in (printed := capsys.readouterr().out) and "NFE 6," in printed    # 2 of 4 steps, 3 calls each
    inpaint.main(["a red circle", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                  "--steps", "2", "--teacher", "--pag", "2", "--guidance", "0", "--model", model,
                  "--out", str(tmp_path / "p.png")])
    assert "NFE 4," in capsys.readouterr().out                                   # PAG alone: 2 calls a step
    with Image.open(tmp_path / "i.png") as im:
        assert json.loads(im.text["ldm"])["pag"] == 2
