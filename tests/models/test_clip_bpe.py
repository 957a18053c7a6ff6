"""Our CLIP BPE tokenizer gives open_clip's SimpleTokenizer ids (the reference), and the scratch text encoder
uses it only where open_clip would build that same tokenizer."""
import random

import numpy as np
import pytest

from ldm.data import captions, shapes
from ldm.models.clip_bpe import ClipBPE, clip_bpe_for

open_clip = pytest.importorskip("open_clip")

HAND_PICKED = [
    "a red circle above a blue square", "A  Large RED Circle.", "don't WE'LL they've I'm you'd", "café naïve über",
    "日本語のテキスト", "emoji 🐶🐕 corgi!!", "12345 3.14 1,000", "&amp; &lt;b&gt; &amp;amp; html", "  tabs\tand\nnewlines ",
    "photograph, 4k, trending on artstation", "supercalifragilisticexpialidocious", "x" * 300, "", "   ",
    "<start_of_text>hi<end_of_text>", "<START_OF_TEXT>", "mojibake: SchÃ¶n", "a---b___c...d", "Ωμέγα ∑ ∞ ≠ √",
]


def corpus() -> list[str]:
    rng = np.random.default_rng(0)
    texts = list(HAND_PICKED)
    for i in range(200):                                          # every caption form of the shapes world
        texts.append(captions.caption(shapes.sample_scene(rng), rng)[0])
    pick = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,!?'-&;:()éüßøçñ漢字かなДжΩ🙂\t"
    texts += ["".join(pick.choice(alphabet) for _ in range(pick.randint(1, 60))) for _ in range(300)]
    return texts


@pytest.fixture(scope="module")
def ours():
    return ClipBPE()


def test_ids_equal_open_clips(ours):
    reference = open_clip.get_tokenizer("ViT-B-32")
    assert (ours.sot_token_id, ours.eot_token_id, ours.vocab_size) == (49406, 49407, 49408)
    assert (reference.sot_token_id, reference.eot_token_id, reference.vocab_size) == (49406, 49407, 49408)
    for text in corpus():
        assert ours.encode(text) == reference.encode(text), text


@pytest.mark.parametrize("name,plain", [("ViT-B-32", True), ("ViT-L-14", True), ("ViT-H-14", True), ("RN50", True),
                                        ("ViT-B-16-SigLIP", False), ("ViT-H-14-CLIPA", False),
                                        ("hf-hub:org/name", False), ("no-such-model", False)])
def test_ours_only_where_open_clip_builds_the_plain_bpe(ours, name, plain):
    tok = clip_bpe_for(name)
    assert (tok is not None) == plain
    if plain:                                  # open_clip's choice for the name, on a few texts
        reference = open_clip.get_tokenizer(name)
        assert type(reference).__name__ == "SimpleTokenizer"
        for text in HAND_PICKED[:6]:
            assert tok.encode(text) == reference.encode(text)


def test_scratch_encoder_tokenizes_as_before(ours):
    """The scratch encoder's ids (what the shipped model was trained on) through ours and through open_clip."""
    from ldm.models.text import ScratchTextEncoder, TextEncoderConfig, _BPETokenize
    encoder = ScratchTextEncoder(TextEncoderConfig(width=16, depth=1, heads=2, max_length=32))
    assert isinstance(encoder._tokenize.tok, ClipBPE)
    prompts = corpus()[:60]
    reference = _BPETokenize(open_clip.get_tokenizer("ViT-B-32"), 32)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                          # long texts warn about truncation
        ids, mask = encoder.tokenize(prompts)
        ref_ids, ref_mask = reference(encoder, prompts)
    assert ids.equal(ref_ids) and mask.equal(ref_mask)


def test_transformers_tokenizer_files_give_the_same_ids(ours, tmp_path):
    """The CLIPTokenizer written for imported SD 1.x models (and the benchmark's CLIP) tokenizes as we do."""
    from transformers import CLIPTokenizer

    from ldm.models.clip_bpe import write_clip_tokenizer
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok"))
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token == "<|endoftext|>"
    for text in corpus():
        # open_clip's spelling of the specials; transformers neither undoes HTML escapes nor repairs mojibake
        if "_of_text>" in text.lower() or "&" in text or "Ã" in text:
            continue
        expected = [ours.sot_token_id, *ours.encode(text), ours.eot_token_id]
        assert tokenizer(text)["input_ids"] == expected, text
