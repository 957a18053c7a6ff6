"""ComfyUI's prompt emphasis on SD3's and FLUX.1's text encoders (prompt_weights.weigh_from_empty): each weighted
token's embedding moves from the empty prompt's, z_i <- e_i + w (z_i - e_i), on both CLIPs and T5 (SD3) or T5
(FLUX.1); the pooled vectors stay the plain text's. Tiny random stacks from sd_layouts (CLIPs 32 + 48, T5 96)."""
import warnings

import pytest
import torch
from sd_layouts import SD3_WIDTHS, write_flux_pipeline, write_flux_text_parts, write_sd3_text_parts

from ldm.models.prompt_weights import parse_weighted, tokenizer_weights
from ldm.models.text import TextEncoderConfig, build_text_encoder

LONG = "a photo of a red cube and a green cat on the blue floor, " * 8      # > 77 CLIP tokens, > 32 T5 tokens
PLAIN = [LONG, "", "a red cube", "(a red cube:1) on the (blue:1.0) floor", "a \\(red\\) cube"]
WEIGHTED = "a (red:1.5) cube, (on a blue:0.5) floor"
# Its plain text "a red cube, on a blue floor" token by token, written out by hand, with each token's weight
T5_TOKENS = ["▁a", "▁red", "▁cube", ",", "▁on", "▁a", "▁blue", "▁floor"]
CLIP_TOKENS = ["a</w>", "red</w>", "cube</w>", ",</w>", "on</w>", "a</w>", "blue</w>", "floor</w>"]
WEIGHTS = [1, 1.5, 1, 1, 0.5, 0.5, 0.5, 1]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """{"sd3": SD3's CLIPs + T5, "flux": FLUX.1's CLIP-L + T5}, T5 reading 32 tokens (LONG is cut)."""
    root = tmp_path_factory.mktemp("t5-weights")
    write_sd3_text_parts(root / "sd3")
    write_flux_text_parts(root / "flux")
    return {kind: build_text_encoder(TextEncoderConfig(kind=kind, path=str(root / kind), t5_max_length=32))
            for kind in ("sd3", "flux")}


def encode(encoder, prompts, weighted=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                              # LONG's truncation
        return encoder.encode_pooled(prompts, weighted=weighted)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_weight_one_is_the_plain_encoding_bit_for_bit(encoders, kind):
    plain = ["".join(text for text, _ in parse_weighted(p)) for p in PLAIN]
    assert plain[3] == "a red cube on the blue floor" and plain[4] == "a (red) cube"
    ours, theirs = encode(encoders[kind], PLAIN, weighted=True), encode(encoders[kind], plain)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def expected_moves(kind: str, z: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """z (the plain text's encoding) with WEIGHTS' tokens moved by hand: T5's rows 0-7 (FLUX.1) or 77-84 (SD3),
    and for SD3 the CLIPs' rows 1-8 (after the start token) in every column."""
    rows = [77 + i for i in range(len(WEIGHTS))] if kind == "sd3" else list(range(len(WEIGHTS)))
    if kind == "sd3":
        rows += [1 + i for i in range(len(WEIGHTS))]
    out = z.clone()
    for row, w in zip(rows, WEIGHTS * 2):
        if w != 1:
            out[row] = empty[row] + w * (z[row] - empty[row])
    return out


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_weighted_piece_moves_exactly_its_tokens_from_the_empty_prompt(encoders, kind):
    encoder = encoders[kind]
    plain = "a red cube, on a blue floor"
    assert encoder.tokenizer_t5.convert_ids_to_tokens(encoder.tokenizer_t5(plain).input_ids) == T5_TOKENS + ["</s>"]
    assert encoder.tokenizer_l.convert_ids_to_tokens(encoder.tokenizer_l(plain).input_ids)[1:-1] == CLIP_TOKENS
    if kind == "sd3":
        assert encoder.tokenizer_g(plain).input_ids == encoder.tokenizer_l(plain).input_ids
    context, mask, pooled = encode(encoder, [WEIGHTED, "a cat"], weighted=True)
    z, _, z_pooled = encode(encoder, [plain, "a cat"])
    empty = encode(encoder, [""])[0][0]
    expected = expected_moves(kind, z[0], empty)
    moved = (expected != z[0]).any(-1)
    assert moved.sum() == (8 if kind == "sd3" else 4)                # 4 T5 tokens (+ 4 CLIP tokens for SD3)
    torch.testing.assert_close(context[0], expected, atol=1e-6, rtol=0)
    assert torch.equal(context[0][~moved], z[0][~moved])             # every other token bit for bit
    assert torch.equal(context[1], z[1])                             # and the unweighted prompt
    assert torch.equal(pooled, z_pooled) and mask.all()
    if kind == "sd3":                                                # the zero columns up to T5's width stay 0
        assert not context[:, :77, SD3_WIDTHS["clip_l"] + SD3_WIDTHS["clip_g"]:].any()


@pytest.mark.parametrize("prompt, weights", [
    ("a (red) cube", [1, 1.1, 1]),
    ("(a red:1.2)   cube", [1.2, 1.2, 1]),
    ("a red (cube, on:0.8) the floor", [1, 1, 0.8, 0.8, 0.8, 1, 1]),
    ("(red), (blue)", [1.1, 1, 1.1]),                                # "," right after a group
    ("(red): (blue)", [1.1, 1, 1.1]),                                # T5 alone: ":" is 2 tokens, "▁" "<unk>"
])
def test_piece_tokens_are_the_whole_texts_tokens(encoders, prompt, weights):
    """Each piece's weight lands on the tokens the whole plain text has there; the ids stay the whole text's
    (T5 alone would give the ',' after '(red)' a word-start mark, '▁,', as ComfyUI's piece-by-piece ids have
    it; ':', which the toy vocabulary lacks, one token more, '▁' '<unk>')."""
    pieces = parse_weighted(prompt)
    for tokenizer, start in ((encoders["flux"].tokenizer_t5, 0), (encoders["sd3"].tokenizer_l, 1)):
        n = len(tokenizer("".join(t for t, _ in pieces), add_special_tokens=False).input_ids)
        assert n == len(weights)
        row = tokenizer_weights(tokenizer, pieces, 20)
        assert row.tolist() == pytest.approx([1.0] * start + weights + [1.0] * (20 - start - n))
    t5 = encoders["flux"].tokenizer_t5
    assert t5(",", add_special_tokens=False).input_ids != t5("red,", add_special_tokens=False).input_ids[1:]
    assert len(t5(":", add_special_tokens=False).input_ids) == 2 == len(t5("red:", add_special_tokens=False).input_ids)


def test_weights_follow_the_cut_and_a_group_inside_a_token_is_refused(encoders):
    t5 = encoders["flux"].tokenizer_t5
    cut = tokenizer_weights(t5, parse_weighted("a red cube (on the floor:2)"), 4)   # 3 tokens, then </s>
    assert cut.tolist() == [1, 1, 1, 1]
    cut = tokenizer_weights(t5, parse_weighted("a (red cube on:2) the floor"), 4)
    assert cut.tolist() == [1, 2, 2, 1]
    context, _, _ = encode(encoders["sd3"], ["(red:1.5) " + LONG + " (cat:2)"], weighted=True)   # (cat:2) is cut
    assert context.shape == (1, 77 + 32, SD3_WIDTHS["t5"])
    with pytest.raises(ValueError, match="whole words.*'be'"):
        tokenizer_weights(t5, parse_weighted("a (cu:1.5)be"), 8)    # "▁cube" is one token
    with pytest.raises(ValueError, match="whole words"):
        encode(encoders["sd3"], ["a (red)dish cube"], weighted=True)   # CLIP: "reddish</w>" is not "red" + ...


def test_txt2img_draws_flux_with_emphasis(tmp_path, one_thread):
    """`python -m ldm.txt2img "(red:1.5) circle" --model <FLUX.1 folder>`: drawn, without a warning, and not
    the image of "red circle"; --prompt-weights off keeps the brackets as text."""
    import numpy as np
    from PIL import Image

    from ldm import txt2img
    from ldm.models.from_diffusers import convert
    write_flux_pipeline(tmp_path)
    convert(str(tmp_path / "flux"), str(tmp_path / "model"))
    images = {}
    for name, args in (("weighted", ["(red:1.5) circle"]), ("plain", ["red circle"]),
                       ("again", ["(red:1.5) circle"]), ("off", ["(red:1.5) circle", "--prompt-weights", "off"])):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            txt2img.main([*args, "--model", str(tmp_path / "model"), "--steps", "2",
                          "--out", str(tmp_path / f"{name}.png")])
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16)
    assert np.array_equal(images["weighted"], images["again"])
    assert np.abs(images["weighted"] - images["plain"]).max() > 0
    assert np.abs(images["off"] - images["weighted"]).max() > 0
    # a weight boundary inside a token is the parser's error, before any model runs
    with pytest.raises(SystemExit) as exit_:
        txt2img.main(["a (cu:1.2)be", "--model", str(tmp_path / "model"), "--steps", "2",
                      "--out", str(tmp_path / "bad.png")])
    assert exit_.value.code == 2 and not (tmp_path / "bad.png").exists()
