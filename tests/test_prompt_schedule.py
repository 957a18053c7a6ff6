"""Prompt editing "[from:to:when]" and alternation "[a|b]" (ldm.models.prompt_schedule): the parser against the
A1111 web UI's documented cases (its wiki's Features page and its parser's doctests), and sampling on a tiny random
model against the plain prompts and against hand-run samplers that switch the context themselves, counting calls."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import txt2img
from ldm.diffusion.guidance import cfg
from ldm.diffusion.param import Denoiser
from ldm.diffusion.samplers import initial_noise, sample_ddim
from ldm.models.prompt_schedule import prompt_schedule, step_index, step_texts
from ldm.models.prompt_weights import EMPHASIS, parse_weighted
from ldm.pipeline import TextToImage

from tests.tiny_models import random_model_with_student

# ---------------------------------------------------------------------------------------------------- the parser

WIKI = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
        "[ in background:0.25] [shoddy:masterful:0.5]")


@pytest.mark.parametrize("prompt, steps, schedule", [
    # the wiki's example with several edits, 100 steps, worked by hand from its description
    (WIKI, 100, [(25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
                 (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
                 (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
                 (75, "fantasy landscape with a lake and an oak in background masterful"),
                 (100, "fantasy landscape with a lake and a christmas tree in background masterful")]),
    ("a [fantasy:cyberpunk:16] landscape", 30, [(16, "a fantasy landscape"), (30, "a cyberpunk landscape")]),
    ("a [b:3]", 10, [(3, "a "), (10, "a b")]),                          # [to:when] adds
    ("a [b: 3 ] c", 10, [(3, "a  c"), (10, "a b c")]),                  # spaces around WHEN
    ("a [b::3] c", 10, [(3, "a b c"), (10, "a  c")]),                   # [from::when] removes
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),          # from / to keep their spaces
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),     # nested in `to`
    ("a[[b:c:2]:d:3]e", 10, [(2, "abe"), (3, "ace"), (10, "ade")]),     # nested in `from`
    ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),                   # fraction: int(0.5 x 10)
    ("a [b:c:0.25] d", 10, [(2, "a b d"), (10, "a c d")]),              # int(2.5): truncated
    ("a [b:c:1] d", 4, [(1, "a b d"), (4, "a c d")]),                   # integer 1: step 1
    ("a [b:c:1.0] d", 4, [(4, "a b d")]),                               # 1.0: a fraction, all the steps
    ("[a:b:0]", 4, [(4, "b")]),                                         # 0: `to` throughout
    ("[a:b:-2]", 4, [(4, "b")]),
    ("[a:b:4]", 4, [(4, "a")]),                                         # >= steps: `from` throughout
    ("[a:b:99]", 4, [(4, "a")]),
    ("[cow|horse] in a field", 4, [(1, "cow in a field"), (2, "horse in a field"), (3, "cow in a field"),
                                   (4, "horse in a field")]),
    ("[fe|]male", 3, [(1, "female"), (2, "male"), (3, "female")]),     # an empty option
    ("[fe|||]male", 6, [(1, "female"), (4, "male"), (5, "female"), (6, "male")]),   # equal neighbours merge
])
def test_schedules_of_documented_prompts(prompt, steps, schedule):
    assert prompt_schedule(prompt, steps) == schedule


@pytest.mark.parametrize("prompt, schedule", [        # hires fix's second pass of 10 steps after a first of 10
    ("a [b:.5] c", [(10, "a b c")]),                       # the first pass's fractions are over
    ("a [b:1.5] c", [(5, "a  c"), (10, "a b c")]),         # half-way through this one
    ("[a:b:14]", [(4, "a"), (10, "b")]),                   # step 14 of both: this one's 4th
    ("[a:b:7]", [(10, "b")]),
])
def test_second_pass_timeline(prompt, schedule):
    assert prompt_schedule(prompt, 10, first_pass=10) == schedule


def test_alternation_cycles_through_its_words_every_step():
    """The wiki's example: one word a step, from the first, around and around."""
    words = ["cow", "cow", "horse", "man", "siberian tiger", "ox", "man"]
    texts = step_texts("[cow|cow|horse|man|siberian tiger|ox|man] in a field", 10)
    assert texts == [f"{words[i % 7]} in a field" for i in range(10)]
    # inside an edit: alternation only while the edit shows it
    assert step_texts("[[a|b]:c:3]", 5) == ["a", "b", "a", "c", "c"]


def test_emphasis_stays_the_emphasis_parsers():
    """'[word]' (no ':' or '|') is emphasis 1/1.1, kept for the emphasis parser; weights inside an edit are read in
    the texts that hold them; an edit inside emphasis takes the group's weight."""
    assert prompt_schedule("a [red] circle", 7) == [(7, "a [red] circle")]
    assert parse_weighted(prompt_schedule("a [red] circle", 7)[0][1]) == [("a ", 1.0), ("red", 1 / EMPHASIS),
                                                                            (" circle", 1.0)]
    schedule = prompt_schedule("a [(red:1.5):blue:0.5] circle", 4)
    assert schedule == [(2, "a (red:1.5) circle"), (4, "a blue circle")]
    assert [parse_weighted(text) for _, text in schedule] == [[("a ", 1.0), ("red", 1.5), (" circle", 1.0)],
                                                              [("a blue circle", 1.0)]]
    assert prompt_schedule("a ([red:blue:2]:1.3) circle", 4) == [(2, "a (red:1.3) circle"), (4, "a (blue:1.3) circle")]
    assert prompt_schedule("[(a:2):3]", 10) == [(3, ""), (10, "(a:2)")]
    assert prompt_schedule("a [[[b]]:2]", 10) == [(2, "a "), (10, "a [[b]]")]
    assert prompt_schedule("a: b | c (d:1.2)", 3) == [(3, "a: b | c (d:1.2)")]    # ':' and '|' outside '[...]'


def test_escapes():
    r"""'\[' and '\(' stay escaped for the emphasis parser (literal brackets); '\:' and '\|' are literal characters."""
    assert prompt_schedule(r"a \[b:c:2\] d", 4) == [(4, r"a \[b:c:2\] d")]
    assert parse_weighted(prompt_schedule(r"a \[b:c:2\] d", 4)[0][1]) == [("a [b:c:2] d", 1.0)]
    assert prompt_schedule(r"[a\:b:c:2]", 4) == [(2, "a:b"), (4, "c")]
    assert prompt_schedule(r"[a\|b:c:2]", 4) == [(2, "a|b"), (4, "c")]
    assert prompt_schedule(r"[\(a\):b:2]", 4) == [(2, r"\(a\)"), (4, "b")]


@pytest.mark.parametrize("prompt, message", [
    ("a [b", "'[' at position 2 is never closed"),
    ("a (b [c:d:1]", "'(' at position 2 is never closed"),
    ("a (b]", "unmatched ']' at position 4"),
    ("a [b:c:d] e", "the group ending at position 8 is neither"),      # WHEN not a number
    ("a [b:c]", "the group ending at position 6 is neither"),
    ("[a|b:2]", "the group ending at position 6 is neither"),          # ':' and '|' mixed
    ("[a:b:c:2]", "the group ending at position 8 is neither"),
    ("[a:b:[2]]", "the group ending at position 8 is neither"),
])
def test_malformed_groups_are_refused_with_their_position(prompt, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        prompt_schedule(prompt, 4)


def test_step_index_on_a_grid():
    """A time belongs to the step whose [grid[i], grid[i + 1]) holds it: Heun's second evaluation, at the next
    step's time, to the next step; times between grid points (TCD's) to the step they fall in."""
    grid = [1.0, 0.75, 0.5, 0.25]
    assert [step_index(grid, torch.tensor([t], dtype=torch.float32)) for t in grid] == [0, 1, 2, 3]
    assert step_index(grid, torch.tensor([0.6])) == 1 and step_index(grid, 0.1) == 3 and step_index(grid, 1.5) == 0
    assert step_index([0.999], 0.999) == 0


# ------------------------------------------------------------------------------------------------- sampling

RES = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread_module):
    return random_model_with_student(tmp_path_factory.mktemp("model"), resolution=RES, w_features=16)


@pytest.fixture(scope="module")
def pipe(model):
    pipe = TextToImage.from_folder(model, decoder_precision="fp32")
    pipe.prompt_weights = True
    return pipe


@pytest.mark.parametrize("teacher", [True, False], ids=["teacher", "student"])
def test_edits_at_the_ends_equal_the_plain_prompts(pipe, teacher):
    """'[a:b:0]' is b throughout and '[a:b:WHEN]' with WHEN >= steps is a throughout: bit for bit the plain prompts'
    latents (a student's 2 steps as the teacher's 2 with CFG and a negative prompt)."""
    options = dict(steps=2, seed=3, teacher=teacher, guidance=2.0, negative="a green square" if teacher else "")
    draw = lambda prompt: pipe.sample([prompt, "a blue square"], **options)[0]   # noqa: E731
    red, blue = draw("a red circle"), draw("a blue circle")
    assert (red - blue).abs().max() > 1e-2                           # the prompts draw apart: the test can fail
    for prompt, plain in (("a [red:blue:0] circle", blue), ("a [red:blue:0.0] circle", blue),
                          ("a [red:blue:2] circle", red), ("a [red:blue:1.0] circle", red),
                          ("a [red:blue:7] circle", red), ("a [red:[blue:green:2]:0.0] circle", blue)):
        assert torch.equal(draw(prompt), plain), prompt


def hand_run(pipe, texts_by_step, *, steps, seed, teacher, guidance=2.0, negative=""):
    """DDIM latents where the model function itself switches the context: call k (DDIM calls once a step) takes the
    encoding of texts_by_step[k]; built from Denoiser, cfg and the sampler, as sample() draws the same run."""
    ts = pipe.schedule.timesteps(steps, spacing="trailing")
    contexts = [pipe.encode_prompts(texts) for texts in texts_by_step]
    if teacher:
        net, prediction = pipe.unet, pipe.index.prediction
    else:
        net, prediction = pipe.student(steps), pipe.index.student_prediction
    model = Denoiser(net, pipe.schedule, prediction, time_scale=pipe.index.time_scale)
    if teacher:
        model = cfg(model, guidance, pipe.encode_prompts([negative]))
    calls = []

    def switching(x, t, **extra_args):
        cond = contexts[len(calls)]
        calls.append(float(t[0]))
        return model(x, t, **{**extra_args, **cond} if teacher else {**extra_args, **cond, "w": guidance})
    shape = pipe.latent_shape(len(texts_by_step[0]))
    x = initial_noise(pipe.schedule, ts, shape, generator=torch.Generator().manual_seed(seed))
    z = sample_ddim(switching, x, ts, pipe.schedule, extra_args=dict(contexts[0]), disable=True)
    assert len(calls) == steps
    return z


@pytest.mark.parametrize("teacher, prompt, steps, switch", [
    (True, "a [red:blue:0.5] circle", 4, 2),         # teacher, CFG against a negative prompt: 'red' on steps 1-2
    (True, "a [red:blue:3] circle", 4, 3),
    (True, "a [red|blue] circle", 2, 1),             # alternation: 'red' on step 1, 'blue' on step 2
    (False, "a [red:blue:0.5] circle", 2, 1),        # the 2-step student: a fraction of its 2 steps
])
def test_a_switch_mid_way_equals_a_hand_run_switching_at_that_step(pipe, teacher, prompt, steps, switch):
    """A batch of two (the second prompt plain) through sample() equals DDIM run by hand with the context of
    'a red circle' for the first `switch` calls and 'a blue circle' after; one step off, it does not."""
    negative = "a green square" if teacher else ""
    z, _ = pipe.sample([prompt, "a blue square"], steps=steps, seed=5, teacher=teacher, guidance=2.0,
                       negative=negative)
    red, blue = ["a red circle", "a blue square"], ["a blue circle", "a blue square"]
    runs = {k: hand_run(pipe, [red] * k + [blue] * (steps - k), steps=steps, seed=5, teacher=teacher,
                        negative=negative) for k in range(steps + 1)}
    err = (z - runs[switch]).abs().max().item()
    assert err < 1e-5, err
    for k, other in runs.items():                    # every other switching step draws visibly apart
        if k != switch:
            assert (z - other).abs().max() > 100 * max(err, 1e-6), k


def test_negative_prompt_editing_is_refused(pipe):
    with pytest.raises(ValueError, match="not in the negative prompt"):
        pipe.sample(["a red circle"], steps=2, teacher=True, negative="[a:b:1]")


def test_prompt_weights_off_reads_the_brackets_as_text(pipe):
    """Without the web UI's syntax the prompt goes as typed: no schedule, the same as the literal text."""
    pipe.prompt_weights = False
    try:
        z, _ = pipe.sample(["a [red:blue:1] circle"], steps=2, seed=1)
        literal, _ = pipe.sample(["a [red:blue:1] circle"], steps=2, seed=1)
        assert torch.equal(z, literal)
        pipe.prompt_weights = True
        edited, _ = pipe.sample(["a [red:blue:1] circle"], steps=2, seed=1)
        assert not torch.equal(z, edited)
    finally:
        pipe.prompt_weights = True


# ----------------------------------------------------------------------------------------------------- the CLI

def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.int16)


def test_cli_draws_edits_keeps_the_prompt_and_replays(model, tmp_path, capsys):
    """txt2img with an edit in a grid of --n 2: the PNG holds the prompt as typed (as the web UI's), --replay draws
    the same pixels, and it differs from both plain prompts."""
    common = ["--model", model, "--steps", "4", "--teacher", "--guidance", "2", "--n", "2", "--negative", "a green square"]
    txt2img.main(["a [red:blue:0.5] circle", *common, "--out", str(tmp_path / "edit.png")])
    with Image.open(tmp_path / "edit.png") as im:
        text = dict(im.text)
    assert text["parameters"].startswith("a [red:blue:0.5] circle\n")
    assert json.loads(text["ldm"])["prompt"] == "a [red:blue:0.5] circle"
    txt2img.main(["--replay", str(tmp_path / "edit.png"), "--out", str(tmp_path / "replay.png")])
    assert np.array_equal(pixels(tmp_path / "edit.png"), pixels(tmp_path / "replay.png"))
    for plain in ("a red circle", "a blue circle"):
        txt2img.main([plain, *common, "--out", str(tmp_path / "plain.png")])
        assert np.abs(pixels(tmp_path / "plain.png") - pixels(tmp_path / "edit.png")).max() > 8
    capsys.readouterr()


def test_cli_refuses_bad_edits_as_usage_errors(model, tmp_path, capsys):
    for args, message in ((["a [red:blue] circle"], "the group ending at position 11 is neither"),
                          (["a red circle", "--teacher", "--negative", "[blue|green]"], "not in the negative prompt"),
                          (["a [blue:(red)dish:1] circle"], "must cover whole words")):
        with pytest.raises(SystemExit) as e:
            txt2img.main([*args, "--model", model, "--steps", "2", "--out", str(tmp_path / "x.png")])
        assert e.value.code == 2 and message in capsys.readouterr().err, args


def test_hires_second_pass_continues_the_timeline(pipe):
    """hires fix as the web UI's: '[a:b:0.5]' is b throughout the second pass, '[a:b:1.5]' a throughout the first and
    switching half-way through the second; against the two passes run by hand with the texts each should see."""
    import torch.nn.functional as F
    options = dict(steps=4, scale=2.0, strength=0.5, seed=1, teacher=True, guidance=2.0)

    def by_hand(first: str, second: str) -> torch.Tensor:
        z, _ = pipe.sample([first], steps=4, seed=1, teacher=True, guidance=2.0)
        z = F.interpolate(z, scale_factor=2.0, mode="bilinear", align_corners=False)
        z, _ = pipe.sample([second], steps=4, seed=1, teacher=True, guidance=2.0, init=z, strength=0.5)
        return pipe.decode(z)
    for edit, first, second in (("a [red:blue:0.5] circle", "a [red:blue:0.5] circle", "a blue circle"),
                                ("a [red:blue:1.5] circle", "a red circle", "a [red:blue:0.5] circle"),
                                ("a [red:blue:5] circle", "a red circle", "a [red:blue:1] circle")):
        images, _ = pipe.hires([edit], **options)
        assert torch.equal(images, by_hand(first, second)), edit
    assert not torch.equal(by_hand("a red circle", "a [red:blue:0.5] circle"), by_hand("a red circle", "a red circle"))
