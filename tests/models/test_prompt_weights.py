"""Prompt emphasis "(word:1.3)": the parser against hand-worked cases, the token layout against the
tokenizer itself, the weighting against its closed form, on the shipped scratch encoder and a CLIP one."""
import pytest
import torch

from ldm.bench_models import TINY, write_clip_folder
from ldm.models.prompt_weights import EMPHASIS, encode_weighted, parse_weighted, plain_text, token_weights
from ldm.models.text import TextEncoderConfig, build_text_encoder
from ldm.pipeline import DEFAULT_MODEL, TextToImage

CASES = [
    ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
    ("a ((red)) circle", [("a ", 1.0), ("red", EMPHASIS ** 2), (" circle", 1.0)]),
    ("a [red] circle", [("a ", 1.0), ("red", 1 / EMPHASIS), (" circle", 1.0)]),
    ("(a (b:2) c)", [("a ", EMPHASIS), ("b", 2 * EMPHASIS), (" c", EMPHASIS)]),
    ("(x : 0.25) [(y)]", [("x ", 0.25), (" y", 1.0)]),                 # [(y)]: 1.1 / 1.1, merged
    (r"a \(b\) \[c\] \\ d", [(r"a (b) [c] \ d", 1.0)]),
    ("a time: 12 o'clock", [("a time: 12 o'clock", 1.0)]),           # a colon outside a group is text
    ("", []), ("()", []),
]


@pytest.mark.parametrize("prompt,expected", CASES)
def test_parse(prompt, expected):
    got = parse_weighted(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.mark.parametrize("prompt,message", [("a (red circle", r"'\(' at position 2 is never closed"),
                                            ("a red) circle", r"unmatched '\)' at position 5"),
                                            ("(a]", r"unmatched '\]' at position 2")])
def test_unbalanced_brackets_are_named(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse_weighted(prompt)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    clip = write_clip_folder(TINY, str(tmp_path_factory.mktemp("clip")))
    return {"scratch": TextToImage.from_folder(DEFAULT_MODEL).text_encoder,
            "clip": build_text_encoder(TextEncoderConfig(kind="clip", path=clip, max_length=77))}


@pytest.mark.parametrize("kind", ["scratch", "clip"])
def test_weights_sit_on_the_words_tokens(encoders, kind):
    encoder = encoders[kind]
    pieces = parse_weighted("a large (bright red:1.5) circle [on the left]")
    weights = token_weights(encoder, pieces)
    ids, mask = encoder.tokenize([plain_text(pieces), "bright red", "on the left"])
    n = int(mask[0].sum())
    assert weights.shape == (mask.shape[1],) and bool((weights[n:] == 1).all()) and weights[0] == weights[n - 1] == 1
    for row, w in ((1, 1.5), (2, 1 / EMPHASIS)):                # where the weight is, the words' own tokens are
        words = ids[row, 1:int(mask[row].sum()) - 1].tolist()
        at = (weights == w).nonzero().squeeze(1).tolist()
        assert len(at) == len(words) and ids[0, at].tolist() == words
    with pytest.raises(ValueError, match="must cover whole words"):
        token_weights(encoder, parse_weighted("a (red)dish circle"))


@pytest.mark.parametrize("kind", ["scratch", "clip"])
def test_weighting_is_the_scaled_embedding_at_the_same_rms(encoders, kind):
    encoder = encoders[kind]
    prompts = ["a (red:1.5) circle", "a blue square", "[a] green (triangle:0.5)"]
    with torch.no_grad():
        context, mask = encode_weighted(encoder, prompts)
        plain, plain_mask = encoder(["a red circle", "a blue square", "a green triangle"])
    assert torch.equal(mask, plain_mask) and torch.equal(context[1], plain[1])    # no weights: exactly the encoder's
    for i, prompt in ((0, prompts[0]), (2, prompts[2])):
        w = token_weights(encoder, parse_weighted(prompt))[:, None]
        scaled = plain[i] * w
        expected = scaled * torch.linalg.norm(plain[i]) / torch.linalg.norm(scaled)
        torch.testing.assert_close(context[i], expected, rtol=1e-5, atol=1e-6)
        assert (context[i] - plain[i]).abs().max() > 1e-2


def test_pipeline_reads_weights_only_when_asked(tmp_path):
    pipe = TextToImage.from_folder(DEFAULT_MODEL)
    literal = pipe.encode_prompts(["a (red:1.0) circle"])["context"]
    pipe.prompt_weights = True
    assert torch.equal(pipe.encode_prompts(["a (red:1.0) circle"])["context"],
                       pipe.encode_prompts(["a red circle"])["context"])
    assert not torch.equal(literal, pipe.encode_prompts(["a red circle"])["context"])
    with pytest.warns(UserWarning) as record:                     # the shapes check reads the plain text
        pipe.check_prompts(["a (red:1.3) circle", "a (corgi:1.3)"])
    assert [str(r.message)[:8] for r in record] == ["'a (corg"]
