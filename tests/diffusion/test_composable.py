"""Composable prompts "a AND b :0.8" (ldm.models.prompt_compose) and their guidance (ldm.diffusion.composable): the
parser against the A1111 web UI's documented reading, the wrapper against the conjunction of Liu et al. 2022 computed
here from separate net calls, plain CFG as its one-prompt case, and the pipeline and CLI on a tiny random model."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import img2img, txt2img
from ldm.diffusion.composable import composable_cfg
from ldm.diffusion.guidance import cfg
from ldm.diffusion.param import Denoiser
from ldm.diffusion.samplers import initial_noise, sample_ddim
from ldm.models.prompt_compose import flatten, is_composed, parse_composable
from ldm.pipeline import TextToImage

from tests.tiny_models import random_model_with_student

# ---------------------------------------------------------------------------------------------------- the parser


@pytest.mark.parametrize("prompt, parts", [
    ("a red circle AND a blue square", [("a red circle", 1.0), ("a blue square", 1.0)]),
    ("a cat :1.2 AND a dog AND a penguin :2.2", [("a cat", 1.2), ("a dog", 1.0), ("a penguin", 2.2)]),  # the wiki's
    ("a red circle:0.8AND a blue square : -0.5 ", [("a red circle:0.8AND a blue square : -0.5 ", 1.0)]),  # no \bAND\b
    ("a red circle :0.8 AND a blue square : -0.5 ", [("a red circle", 0.8), ("a blue square", -0.5)]),
    ("a red circle,AND a blue square", [("a red circle,", 1.0), ("a blue square", 1.0)]),   # \bAND\b, as the web UI
    ("  a red circle   AND   a blue square  ", [("a red circle", 1.0), ("a blue square", 1.0)]),
    ("a :1 AND b :1. AND c :.5 AND d :+2 AND e:0", [("a", 1.0), ("b", 1.0), ("c", 0.5), ("d", 2.0), ("e", 0.0)]),
    ("a red circle and a blue square", [("a red circle and a blue square", 1.0)]),        # lowercase: plain text
    ("a red circle And a blue square", [("a red circle And a blue square", 1.0)]),
    ("a SANDY circle AND ANDROID", [("a SANDY circle", 1.0), ("ANDROID", 1.0)]),            # whole words only
    ("a (red:1.3) circle AND a [blue] square", [("a (red:1.3) circle", 1.0), ("a [blue] square", 1.0)]),  # emphasis
    ("a [red:blue:0.5] circle AND a [cow|horse] :0.7", [("a [red:blue:0.5] circle", 1.0), ("a [cow|horse]", 0.7)]),
    ("a red circle :0.5", [("a red circle :0.5", 1.0)]),          # no AND: text (the web UI would weigh it)
    ("a clock at 10:30", [("a clock at 10:30", 1.0)]),              # ... which made this "a clock at 10" at weight 30
    ("a red circle", [("a red circle", 1.0)]),
    (" a red circle ", [(" a red circle ", 1.0)]),                 # no AND, no weight: as written
    ("", [("", 1.0)]),                                             # the unconditional prompt stays itself
    ("a cat: big", [("a cat: big", 1.0)]),                         # ':' then words is text, as the web UI reads it
    (r"at 10\:30", [(r"at 10\:30", 1.0)]),                         # an escaped ':' is no weight
])
def test_parser_reads_the_web_uis_syntax(prompt, parts):
    assert parse_composable(prompt) == parts


@pytest.mark.parametrize("prompt, message", [
    ("AND a blue square", "empty sub-prompt at position 0"),
    ("a red circle AND", "empty sub-prompt at position 16"),
    ("a AND  AND b", "empty sub-prompt at position 5"),
    ("a AND :0.5", "empty sub-prompt at position 5"),
    ("a red circle :1.2.3 AND b", "weight after ':' at position 13 is '1.2.3'"),
    ("a AND b :1,5", "weight after ':' at position 8 is '1,5'"),
    ("a AND b :", "weight after ':' at position 8 is ''"),
    ("a AND b :-", "weight after ':' at position 8 is '-'"),
    ("a red circle: AND b", "weight after ':' at position 12 is ''"),
    ("(a red circle AND a blue square)", "AND at position 14 is inside a bracket"),
    ("[a AND b:c:2]", "AND at position 3 is inside a bracket"),
])
def test_parser_refuses_malformed_input_with_its_position(prompt, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[").replace(".", r"\.")):
        parse_composable(prompt)


def test_flatten_and_is_composed():
    assert flatten(["a AND b :0.5", "c", "d :2 AND e AND f"]) == (
        ["a", "b", "c", "d", "e", "f"], [0, 0, 1, 2, 2, 2], [1.0, 0.5, 1.0, 2.0, 1.0, 1.0])
    assert is_composed("a AND b") and not is_composed("a :0.5") and not is_composed("a :1") and not is_composed("a and b")


# ------------------------------------------------------------------------------------------- the guidance wrapper

class ToyNet(torch.nn.Module):
    """A net whose output is nonlinear in x, t and the context, one row at a time; counts its calls and rows."""
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(3, 4, generator=g))
        self.calls, self.rows = 0, []

    def forward(self, x, t, context, context_mask=None, pooled=None):
        self.calls += 1
        self.rows.append(x.shape[0])
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
        c = torch.tanh(context.mean(1) @ self.a)[:, :, None, None]                   # (rows, 4, 1, 1)
        extra = 0 if pooled is None else pooled[:, :4, None, None]
        return torch.sin(x * c + t) + x * extra


def closed_form(net, x, t, contexts, weights, negative, w, pooled=None, pooled_u=None):
    """Liu et al. 2022's conjunction with CFG, D(u) + sum_i W_i (1 + w) (D(c_i) - D(u)), from one net call a row
    (float64)."""
    def call(i, context, p):                                       # t: per sample (B,)
        return net(x[i:i + 1], t[i:i + 1], context, pooled=p).squeeze(0)
    out = []
    for b in range(x.shape[0]):
        u = call(b, negative, pooled_u)
        guided = u.clone()
        for k, (context, weight) in enumerate(zip(contexts[b], weights[b])):
            guided += weight * (1 + w) * (call(b, context, None if pooled is None else pooled[b][k]) - u)
        out.append(guided)
    return torch.stack(out)


def test_wrapper_equals_the_conjunction_from_separate_calls():
    """Three samples of 2, 1 and 3 sub-prompts (weights incl. a negative one, NOT) against the closed form; one net
    call a step of N + B = 6 + 3 rows; per-sample t and a per-row pooled vector (SDXL's) ride along."""
    torch.manual_seed(1)
    net = ToyNet().double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    t = torch.tensor([0.3, 0.5, 0.9], dtype=torch.float64)
    ctx = torch.randn(6, 7, 3, dtype=torch.float64)
    pooled = torch.randn(6, 4, dtype=torch.float64)
    owner, weights = [0, 0, 1, 2, 2, 2], [1.0, 0.8, 1.3, 0.5, -0.4, 1.0]
    uncond = {"context": torch.randn(1, 7, 3, dtype=torch.float64), "pooled": torch.randn(1, 4, dtype=torch.float64)}
    model = composable_cfg(net, 2.0, uncond, owner, weights)
    out = model(x, t, context=ctx, pooled=pooled)
    assert net.calls == 1 and net.rows == [9]
    groups = [[0, 1], [2], [3, 4, 5]]
    want = closed_form(net, x, t, [[ctx[i:i + 1] for i in g] for g in groups], [[weights[i] for i in g] for g in groups],
                       uncond["context"], 2.0, pooled=[[pooled[i:i + 1] for i in g] for g in groups],
                       pooled_u=uncond["pooled"])
    err = (out - want).abs().max().item()
    assert err < 1e-12, err
    # in float32 the same up to rounding; and the closed form moves when a weight does (the test can fail)
    out32 = composable_cfg(net.float(), 2.0, {k: v.float() for k, v in uncond.items()}, owner, weights)(
        x.float(), t.float(), context=ctx.float(), pooled=pooled.float())
    assert (out32.double() - want).abs().max() < 1e-5
    other = composable_cfg(net.double(), 2.0, uncond, owner, [1.0, 0.7, 1.3, 0.5, -0.4, 1.0])(x, t, context=ctx,
                                                                                              pooled=pooled)
    assert (other - out)[0].abs().max() > 1e-3 and torch.equal(other[1:], out[1:])


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread_module):
    return random_model_with_student(tmp_path_factory.mktemp("model"), resolution=32, w_features=16)


@pytest.fixture(scope="module")
def pipe(model):
    pipe = TextToImage.from_folder(model, decoder_precision="fp32")
    pipe.prompt_weights = True
    return pipe


@pytest.mark.parametrize("w", [2.0, 0.5, torch.tensor([1.5, 3.0])], ids=["w2", "w0.5", "per-sample"])
def test_one_sub_prompt_of_weight_one_is_plain_cfg_bit_for_bit(pipe, w):
    """On the tiny U-Net (through its Denoiser): a sub-prompt a sample with weight 1 gives cfg's tensor exactly."""
    model = Denoiser(pipe.unet, pipe.schedule, pipe.index.prediction, time_scale=pipe.index.time_scale)
    cond = pipe.encode_prompts(["a red circle", "a blue square"])
    uncond = pipe.encode_prompts(["a green triangle"])
    x = torch.randn(2, *pipe.latent_shape(1)[1:], generator=torch.Generator().manual_seed(0))
    t = torch.tensor(0.6)
    plain = cfg(model, w, uncond)(x, t, **cond)
    composed = composable_cfg(model, w, uncond, [0, 1], [1.0, 1.0])(x, t, **cond)
    assert torch.equal(composed, plain)
    half = composable_cfg(model, w, uncond, [0, 1], [1.0, 0.9])(x, t, **cond)      # the test can fail
    assert torch.equal(half[0], plain[0]) and (half[1] - plain[1]).abs().max() > 1e-4


def test_a_prompt_twice_at_half_weight_is_plain_cfg(pipe):
    """'a AND a' with weights 0.5 / 0.5: sum_i W_i = 1, so the closed form is CFG's; equal up to float rounding."""
    model = Denoiser(pipe.unet, pipe.schedule, pipe.index.prediction, time_scale=pipe.index.time_scale)
    cond = pipe.encode_prompts(["a red circle"])
    uncond = pipe.encode_prompts([""])
    x = torch.randn(1, *pipe.latent_shape(1)[1:], generator=torch.Generator().manual_seed(1))
    plain = cfg(model, 2.0, uncond)(x, torch.tensor(0.4), **cond)
    twice = {k: torch.cat([v, v]) for k, v in cond.items()}
    composed = composable_cfg(model, 2.0, uncond, [0, 0], [0.5, 0.5])(x, torch.tensor(0.4), **twice)
    assert (composed - plain).abs().max() < 1e-5
    z, info = pipe.sample(["a red circle :0.5 AND a red circle :0.5"], steps=3, seed=2, teacher=True, guidance=2.0)
    ref, _ = pipe.sample(["a red circle"], steps=3, seed=2, teacher=True, guidance=2.0)
    assert (z - ref).abs().max() < 1e-4 and info["nfe"] == 3 * 3


# ----------------------------------------------------------------------------------------------------- the pipeline

def hand_run(pipe, parts_by_sample, *, steps, seed, guidance=2.0, negative=""):
    """DDIM latents whose model function is the closed form from separate net calls: for each sample and call, the
    teacher's x0-hat for its negative and each of its sub-prompts, one net call each."""
    ts = pipe.schedule.timesteps(steps, spacing="trailing")
    net = Denoiser(pipe.unet, pipe.schedule, pipe.index.prediction, time_scale=pipe.index.time_scale)
    u = pipe.encode_prompts([negative])

    def model(x, t, **_):
        out = []
        for b, parts in enumerate(parts_by_sample):
            tb = t[b:b + 1] if torch.as_tensor(t).ndim else t
            d_u = net(x[b:b + 1], tb, **u)
            guided = d_u.clone()
            for text, weight in parts:
                guided += weight * (1 + guidance) * (net(x[b:b + 1], tb, **pipe.encode_prompts([text])) - d_u)
            out.append(guided)
        return torch.cat(out)
    x = initial_noise(pipe.schedule, ts, pipe.latent_shape(len(parts_by_sample)),
                      generator=torch.Generator().manual_seed(seed))
    return sample_ddim(model, x, ts, pipe.schedule, disable=True)


def test_pipeline_samples_the_conjunction_and_counts_its_calls(pipe):
    """A batch of a 2-part, a 2-part with a zero weight and a 3-part prompt against the hand-run closed form; NFE counts
    K + 1 = 4 rows a call (the batch's most sub-prompts), a plain prompt's run stays CFG's 2."""
    prompts = ["a red circle AND a blue square :0.8", "a green triangle :1.5 AND a green triangle :0",
               "a red circle :0.6 AND a blue square AND a green triangle :-0.3"]
    z, info = pipe.sample(prompts, steps=3, seed=4, teacher=True, guidance=2.0, negative="a yellow square")
    want = hand_run(pipe, [parse_composable(p) for p in prompts], steps=3, seed=4, negative="a yellow square")
    err = (z - want).abs().max().item()
    assert err < 1e-5, err
    assert info["nfe"] == 3 * 4
    plain = hand_run(pipe, [[("a red circle", 1.0)], [("a green triangle", 1.0)], [("a blue square", 1.0)]],
                     steps=3, seed=4, negative="a yellow square")
    assert (z - plain).abs().max() > 1e-2                             # the composition draws apart from plain prompts


def test_sub_prompts_take_prompt_editing(pipe):
    """Each sub-prompt is its own schedule: an edit at its ends equals the plain sub-prompt bit for bit."""
    draw = lambda prompt: pipe.sample([prompt], steps=3, seed=6, teacher=True, guidance=2.0)[0]   # noqa: E731
    edited = draw("a [red:blue:0] circle AND a (green:1.2) square :0.7")
    assert torch.equal(edited, draw("a blue circle AND a (green:1.2) square :0.7"))
    assert not torch.equal(edited, draw("a red circle AND a (green:1.2) square :0.7"))


def test_a_colon_number_without_and_is_text_for_a_student(pipe):
    """'10:30' in a prompt is no weight: a student draws it (a composition would be refused) as plain text."""
    z, info = pipe.sample(["a red circle at 10:30"], steps=2, seed=1)
    assert info["model"] == "student-2" and info["nfe"] == 2


def test_pipeline_refusals(pipe):
    with pytest.raises(ValueError, match="need the teacher.*student-2"):
        pipe.sample(["a red circle AND a blue square"], steps=2)
    with pytest.raises(ValueError, match="--guidance-rescale does not combine with composable prompts"):
        pipe.sample(["a red circle AND a blue square"], steps=2, teacher=True, guidance_rescale=0.7)
    with pytest.raises(ValueError, match="AND composes prompts"):
        pipe.sample(["a red circle"], steps=2, teacher=True, negative="a AND b")
    with pytest.raises(ValueError, match="empty sub-prompt at position 0"):
        pipe.sample(["AND a red circle"], steps=2, teacher=True)
    pipe.prompt_weights = False                     # the web UI's syntax off: AND is a word of the prompt
    try:
        z, info = pipe.sample(["a red circle AND a blue square"], steps=2, teacher=True, guidance=2.0)
        assert info["nfe"] == 4
    finally:
        pipe.prompt_weights = True


# ----------------------------------------------------------------------------------------------------- the CLI

def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.int16)


def test_cli_draws_keeps_the_prompt_and_replays(model, tmp_path, capsys):
    prompt = "a red circle AND a blue square :0.8"
    common = ["--model", model, "--steps", "3", "--teacher", "--guidance", "2", "--n", "2"]
    txt2img.main([prompt, *common, "--out", str(tmp_path / "and.png")])
    assert "teacher, 3 steps, ddim, w=2, NFE 9," in capsys.readouterr().out         # (2 + 1) a step
    with Image.open(tmp_path / "and.png") as im:
        text = dict(im.text)
    assert text["parameters"].startswith(prompt + "\n") and json.loads(text["ldm"])["prompt"] == prompt
    txt2img.main(["--replay", str(tmp_path / "and.png"), "--out", str(tmp_path / "replay.png")])
    assert np.array_equal(pixels(tmp_path / "and.png"), pixels(tmp_path / "replay.png"))
    txt2img.main(["a red circle and a blue square", *common, "--out", str(tmp_path / "p.png")])
    assert np.abs(pixels(tmp_path / "p.png") - pixels(tmp_path / "and.png")).max() > 8
    capsys.readouterr()


def test_cli_refuses_as_usage_errors(model, tmp_path, capsys):
    for args, message in ((["a red circle AND"], "empty sub-prompt at position 16"),
                          (["a red circle :1.2.3 AND b", "--teacher"], "weight after ':' at position 13"),
                          (["a red circle AND a blue square"], "need the teacher"),            # student-2
                          (["a red circle AND b", "--teacher", "--apg", "2"], "--apg does not combine"),
                          (["a red circle", "--teacher", "--negative", "x AND y"], "AND composes prompts")):
        with pytest.raises(SystemExit) as e:
            txt2img.main([*args, "--model", model, "--steps", "2", "--out", str(tmp_path / "x.png")])
        assert e.value.code == 2 and message in capsys.readouterr().err, args


def test_img2img_cli_composes_on_the_steps_it_runs(model, tmp_path, capsys):
    """SDEdit at strength 0.5 of 4 steps runs 2, each of K + 1 = 3 net evaluations."""
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(tmp_path / "in.png")
    img2img.main(["a red circle AND a blue square :0.8", "--image", str(tmp_path / "in.png"), "--strength", "0.5",
                  "--steps", "4", "--teacher", "--guidance", "2", "--model", model, "--out", str(tmp_path / "o.png")])
    assert "2 steps, ddim, w=2, NFE 6," in capsys.readouterr().out
