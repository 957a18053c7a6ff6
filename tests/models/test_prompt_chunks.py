"""Long prompts in 77-token chunks (ldm.models.prompt_chunks) against CLIPTextModel run by hand on the
token rows the A1111 web UI builds; short prompts exactly as before; chunks through the pipeline's CFG."""
import pytest
import torch
from sd_layouts import write_sd_pipeline

from ldm.bench_models import TINY, write_clip_folder
from ldm.models.from_diffusers import convert
from ldm.models.prompt_chunks import chunk_count, encode_chunked
from ldm.models.prompt_weights import apply_weights
from ldm.models.text import TextEncoderConfig, build_text_encoder
from ldm.pipeline import TextToImage

LONG = ", ".join(f"a red cube number {i}" for i in range(15))          # 98 tokens: two chunks


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip_folder(TINY, str(tmp_path_factory.mktemp("clip")))


def by_hand(encoder, ids: list[int]) -> torch.Tensor:
    """CLIPTextModel on [start] + ids + [end] + padding to 77, straight from transformers."""
    tok = encoder.tokenizer
    row = [tok.bos_token_id, *ids, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(ids))
    with torch.no_grad():
        return encoder.model(input_ids=torch.tensor([row])).last_hidden_state[0]


@pytest.mark.parametrize("mask_padding", [False, True])
def test_short_prompts_are_the_encoders_own_output(clip, mask_padding):
    encoder = build_text_encoder(TextEncoderConfig(kind="clip", path=clip, max_length=77, mask_padding=mask_padding))
    prompts = ["a red cube", "", "a cat on a mat"]
    context, mask = encode_chunked(encoder, prompts)
    plain, plain_mask = encoder(prompts)
    assert torch.equal(context, plain) and torch.equal(mask, plain_mask)


def test_a_long_prompt_is_cut_into_chunks_of_75_tokens(clip):
    encoder = build_text_encoder(TextEncoderConfig(kind="clip", path=clip, max_length=77, mask_padding=True))
    ids = encoder.tokenizer(LONG, add_special_tokens=False)["input_ids"]
    assert 75 < len(ids) <= 150 and chunk_count(encoder, [LONG, "a cat"]) == 2
    context, mask = encode_chunked(encoder, [LONG, "a cat"])
    assert context.shape == (2, 154, TINY.clip["hidden_size"])
    torch.testing.assert_close(context[0, :77], by_hand(encoder, ids[:75]))
    torch.testing.assert_close(context[0, 77:], by_hand(encoder, ids[75:]))
    torch.testing.assert_close(context[1, 77:], by_hand(encoder, []))          # the short one: an empty chunk
    assert mask[0].sum() == len(ids) + 4 and mask[1, 77:].sum() == 2
    assert encode_chunked(encoder, ["a cat"], chunks=3)[0].shape[1] == 3 * 77  # as many as asked for


def test_emphasis_follows_its_tokens_across_the_chunk_boundary(clip):
    encoder = build_text_encoder(TextEncoderConfig(kind="clip", path=clip, max_length=77))
    ids = encoder.tokenizer(LONG, add_special_tokens=False)["input_ids"]
    cut = LONG.rindex(" number 10")                                         # weight the rest of the prompt
    weighted, _ = encode_chunked(encoder, [LONG[:cut] + " (" + LONG[cut + 1:] + ":1.5)"], weighted=True)
    plain, _ = encode_chunked(encoder, [LONG])
    first = len(encoder.tokenizer(LONG[:cut], add_special_tokens=False)["input_ids"])
    expected = torch.ones(1, 154)
    positions = [1 + i if i < 75 else 77 + 1 + i - 75 for i in range(first, len(ids))]   # skip each start token
    expected[0, positions] = 1.5
    assert first < 75 < len(ids)                                            # the weighted words straddle the cut
    torch.testing.assert_close(weighted, apply_weights(plain, expected))


def test_pipeline_encodes_prompt_and_negative_with_the_same_chunks(tmp_path, one_thread):
    write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    assert pipe.prompt_chunks(["a cat", LONG]) == 2 and pipe.prompt_chunks(["a cat", ""]) == 1
    full, info = pipe.generate([LONG], steps=2, seed=0, negative="blurry")
    assert info["nfe"] == 4
    head = pipe.text_encoder.tokenizer.decode(pipe.text_encoder.token_ids(LONG)[:75])   # what truncation keeps
    assert pipe.prompt_chunks([head]) == 1
    truncated, _ = pipe.generate([head], steps=2, seed=0, negative="blurry")
    assert (full - truncated).abs().max() > 1e-3                            # the prompt's tail counts
    short, _ = pipe.generate(["a cat"], steps=2, seed=0, negative=LONG)     # a long negative: two chunks too
    assert bool(torch.isfinite(short).all())
