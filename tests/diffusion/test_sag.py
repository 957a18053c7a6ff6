"""Self-attention guidance (Hong et al. 2023) as a model wrapper, in the pipeline, the CLIs and the PNG settings: the
paper's eps-space formula worked by hand for a v-predicting U-Net, scale 0 as plain CFG, the calls a step, the
refusals, the replay. The comparison with diffusers' StableDiffusionSAGPipeline is in tests/models/test_sag.py."""
import json

import pytest
import torch
from PIL import Image

from ldm import txt2img
from ldm.diffusion.guidance import cfg
from ldm.diffusion.param import Denoiser
from ldm.diffusion.sag import attention_mask, gaussian_blur, sag
from ldm.diffusion.schedules import schedule_from_config
from ldm.models.mmdit import MMDiT, MMDiTConfig
from ldm.models.unet import UNet, recorded_attention, tiny_config
from ldm.pipeline import TextToImage

from tests.tiny_models import random_model_with_student, write_image_and_mask

B = 2


@pytest.fixture(scope="module")
def net(one_thread_module):
    torch.manual_seed(0)
    return UNet(tiny_config()).eval()


def by_hand(unet, schedule, x, t, ctx, null, w, s):
    """diffusers' recipe (pred_x0, pred_epsilon, sag_masking, add_noise) in eps space for a v net, then x0-hat:
    eps_cfg + s (eps_u - eps(x_deg)), x_deg = alpha blur_M(x0_u) + sigma eps_u, M from the uncond pass's map."""
    alpha, sigma = (c.float().reshape(-1, 1, 1, 1) for c in schedule.alpha_sigma(t))
    nt = t * 1000
    v_c = unet(x, nt, ctx)
    with recorded_attention(unet) as maps:
        v_u = unet(x, nt, null)
    eps = lambda xt, v: sigma * xt + alpha * v                      # noqa: E731  v = alpha eps - sigma x0
    eps_c, eps_u = eps(x, v_c), eps(x, v_u)
    x0_u = alpha * x - sigma * v_u
    mask = attention_mask(maps[0], x.shape[-2:])
    x0_deg = mask * gaussian_blur(x0_u) + (1 - mask) * x0_u
    x_deg = alpha * x0_deg + sigma * eps_u
    eps_deg = eps(x_deg, unet(x_deg, nt, null))
    guided = eps_u + (1 + w) * (eps_c - eps_u) + s * (eps_u - eps_deg)
    return (x - sigma * guided) / alpha, mask


@pytest.mark.parametrize("t", [torch.tensor(0.6), torch.tensor([0.3, 0.8])], ids=["shared-t", "per-sample-t"])
@pytest.mark.parametrize("w", [2.0, 0.0], ids=["cfg", "w0"])
def test_wrapper_is_the_papers_eps_formula_for_a_v_net(net, t, w):
    """At w = 0 the conditional prediction is the unguided one (its map, its eps, the cond prompt again)."""
    schedule = schedule_from_config({"name": "cosine_logsnr"})
    g = torch.Generator().manual_seed(1)
    x, ctx, null = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 5, 32, generator=g), \
        torch.randn(1, 5, 32, generator=g)
    model = Denoiser(net, schedule, "v", time_scale=1000.0)
    with torch.no_grad():
        out = sag(model, w, 0.75, {"context": null}, lambda: recorded_attention(net), schedule)(x, t, context=ctx)
        expected, mask = by_hand(net, schedule, x, t.expand(B), ctx, null.expand(B, -1, -1) if w else ctx, w, 0.75)
    assert 0 < mask.mean() < 1                                       # the mask picks some tokens, not all
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    plain = cfg(model, w, {"context": null})(x, t, context=ctx)
    assert (out - plain).abs().max() > 1e-3


def test_wrapper_scale_zero_is_cfg_and_calls(net):
    schedule = schedule_from_config({"name": "cosine_logsnr"})
    g = torch.Generator().manual_seed(2)
    x, ctx, null = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 5, 32, generator=g), \
        torch.randn(1, 5, 32, generator=g)
    calls = []
    model = Denoiser(net, schedule, "v", time_scale=1000.0)

    def counted(x, t, **kw):
        calls.append(x.shape[0])
        return model(x, t, **kw)
    with torch.no_grad():
        out = sag(counted, 2.0, 0.0, {"context": null}, lambda: recorded_attention(net), schedule)(
            x, torch.tensor(0.5), context=ctx)
        torch.testing.assert_close(out, cfg(model, 2.0, {"context": null})(x, torch.tensor(0.5), context=ctx),
                                   atol=1e-6, rtol=0)
    assert calls == [2 * B, B]                                      # [cond; uncond], then the degraded uncond


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread_module):
    return random_model_with_student(tmp_path_factory.mktemp("model"), w_features=16)


def test_pipeline_sag_counts_calls_and_scale_zero_is_exactly_cfg(model):
    pipe = TextToImage.from_folder(model, decoder_precision="fp32")
    prompts = ["a red circle", "a blue square"]
    plain, info = pipe.sample(prompts, steps=3, guidance=2.0, teacher=True)
    zero, info0 = pipe.sample(prompts, steps=3, guidance=2.0, teacher=True, sag_scale=0.0)
    assert torch.equal(zero, plain) and info0 == info and info["nfe"] == 6
    guided, info = pipe.sample(prompts, steps=3, guidance=2.0, teacher=True, sag_scale=0.75)
    assert info["nfe"] == 9 and (guided - plain).abs().max() > 1e-3
    _, info = pipe.sample(["a red circle"], steps=3, guidance=0.0, teacher=True, sag_scale=0.75, sampler="dpmpp_2m")
    assert info["nfe"] == 6
    assert not pipe.unet.mid.attn.blocks[0].attn1._forward_pre_hooks            # no hook left behind


@pytest.mark.parametrize("options,message", [
    (dict(steps=2), "--sag needs the teacher"),                                    # student-2 would run
    (dict(guidance_interval=(0.5, 5.0)), "not combined with --guidance-interval"),
    (dict(pag_scale=1.0), "not combined with --pag"),
    (dict(guidance_rescale=0.7), "not combined with --guidance-rescale"),
    (dict(sampler="euler_cfg_pp"), "CFG\\+\\+.*--sag"),
], ids=["student", "interval", "pag", "rescale", "cfgpp"])
def test_pipeline_refuses_sag_where_it_does_not_apply(model, options, message):
    pipe = TextToImage.from_folder(model)
    options = {"steps": 3, "teacher": "steps" not in options, **options}
    with pytest.raises(ValueError, match=message):
        pipe.sample(["a red circle"], sag_scale=0.75, **options)


def test_pipeline_refuses_sag_with_apg_deepcache_composition_and_mmdit(model):
    from ldm.diffusion.guidance import APG
    pipe = TextToImage.from_folder(model)
    with pytest.raises(ValueError, match="not combined with --apg"):
        pipe.sample(["a red circle"], steps=3, teacher=True, sag_scale=0.75, apg=APG(2.0))
    pipe.prompt_weights = True                                                   # reads "AND" (the CLI's default)
    with pytest.raises(ValueError, match="--sag does not combine with composable prompts"):
        pipe.sample(["a red circle AND a blue square"], steps=3, teacher=True, sag_scale=0.75)
    pipe.set_deepcache(2)
    with pytest.raises(ValueError, match="not combined with --deepcache"):
        pipe.sample(["a red circle"], steps=3, teacher=True, sag_scale=0.75)
    pipe.set_deepcache(None)
    pipe.unet = MMDiT(MMDiTConfig(in_channels=4, out_channels=4, depth=1, num_heads=2, head_dim=8, context_dim=32,
                                  caption_dim=16, pooled_dim=0, pos_embed_max_size=8, sample_size=8))
    with pytest.raises(ValueError, match=r"--sag .*U-Net's middle-block self-attention.*MMDiT"):
        pipe.sample(["a red circle"], steps=3, teacher=True, sag_scale=0.75)


def test_txt2img_sag_png_settings_and_replay(model, tmp_path, capsys):
    out, again = tmp_path / "sag.png", tmp_path / "again.png"
    txt2img.main(["a red circle", "--model", model, "--steps", "3", "--teacher", "--guidance", "1", "--sag", "0.75",
                  "--out", str(out)])
    assert "NFE 9," in capsys.readouterr().out
    with Image.open(out) as im:
        run, parameters = json.loads(im.text["ldm"]), im.text["parameters"]
    assert run["sag"] == 0.75
    assert "SAG Guidance Scale: 0.75, SAG Mask Threshold: 1" in parameters
    txt2img.main(["--replay", str(out), "--out", str(again)])
    with Image.open(out) as a, Image.open(again) as b:
        assert json.loads(b.text["ldm"])["sag"] == 0.75 and a.tobytes() == b.tobytes()
    plain = tmp_path / "plain.png"
    txt2img.main(["a red circle", "--model", model, "--steps", "3", "--teacher", "--guidance", "1", "--out", str(plain)])
    with Image.open(plain) as im:
        assert "sag" not in json.loads(im.text["ldm"]) and "SAG" not in im.text["parameters"]
        assert im.tobytes() != Image.open(out).tobytes()


@pytest.mark.parametrize("extra,message", [
    (["--sag", "1", "--steps", "2"], "--sag needs the teacher"),
    (["--sag", "1", "--teacher", "--pag", "1"], "not combined with --pag"),
    (["--sag", "1", "--teacher", "--deepcache", "2"], "not combined with --deepcache"),
    (["--sag", "1", "--teacher", "--sampler", "euler_cfg_pp"], "--sampler euler_cfg_pp (CFG++)"),
    (["--sag", "1", "--teacher", "--guidance-interval", "0.5:5"], "not combined with --guidance-interval"),
    (["--sag=-0.5", "--teacher"], "--sag (sag_scale) must be >= 0"),
], ids=["student", "pag", "deepcache", "cfgpp", "interval", "negative"])
def test_txt2img_sag_errors_are_usage_errors(model, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        txt2img.main(["a red circle", "--model", model, "--steps", "3", *extra, "--out", str(tmp_path / "x.png")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_txt2img_help_cites_the_paper(capsys):
    with pytest.raises(SystemExit):
        txt2img.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--sag S" in text and "arXiv 2210.00939" in text


def test_img2img_and_inpaint_take_sag(model, tmp_path, capsys):
    from ldm import img2img, inpaint
    write_image_and_mask(tmp_path)
    img2img.main(["a blue square", "--image", str(tmp_path / "in.png"), "--strength", "0.5", "--steps", "4",
                  "--teacher", "--sag", "0.5", "--model", model, "--out", str(tmp_path / "i.png")])
    assert "NFE 6," in capsys.readouterr().out                                  # 2 of 4 steps, 3 calls each
    inpaint.main(["a red circle", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                  "--steps", "2", "--teacher", "--sag", "0.5", "--guidance", "0", "--model", model,
                  "--out", str(tmp_path / "p.png")])
    assert "NFE 4," in capsys.readouterr().out                                  # SAG alone: 2 calls a step
    with Image.open(tmp_path / "i.png") as im:
        assert json.loads(im.text["ldm"])["sag"] == 0.5
