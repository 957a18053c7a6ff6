"""FLUX.1's text conditioning (ldm.models.text_flux) against diffusers' FluxPipeline.encode_prompt, on a tiny
random Flux text stack (sd_layouts.write_flux_text_parts: CLIP-L 32 wide, T5 96 wide)."""
import shutil
import warnings

import diffusers
import pytest
import torch
from sd_layouts import write_flux_text_parts

from ldm.models.text import TextEncoderConfig, build_text_encoder
from ldm.models.text_flux import PARTS, FluxTextEncoder

SHORT = "a red cube on a blue floor"
LONG = "a photo of a red cube and a green cat on the blue floor, " * 40   # > 77 CLIP tokens, > 512 T5 tokens
CASES = {"short": [SHORT], "empty": [""], "long": [LONG], "mixed": [SHORT, "", LONG, "a cat"]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    assert write_flux_text_parts(root) == {"pooled": 32, "t5": 96}
    return root


@pytest.fixture(scope="module")
def pipeline(folder):
    """diffusers' Flux pipeline on the text parts in `folder` as diffusers loads them (no transformer, no VAE)."""
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, transformer=None,
            text_encoder=CLIPTextModel.from_pretrained(str(folder / "text_encoder")),
            tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
            text_encoder_2=T5EncoderModel.from_pretrained(str(folder / "text_encoder_2")),
            tokenizer_2=T5TokenizerFast.from_pretrained(str(folder / "tokenizer_2")))


@pytest.fixture(scope="module")
def encoders(folder):
    """Our encoder reading t5_max_length T5 tokens, built once for each length."""
    built = {}

    def get(t5_max_length: int) -> FluxTextEncoder:
        if t5_max_length not in built:
            built[t5_max_length] = build_text_encoder(
                TextEncoderConfig(kind="flux", path=str(folder), t5_max_length=t5_max_length))
        return built[t5_max_length]
    return get


def test_long_prompt_is_cut_by_both_tokenizers(encoders):
    ours = encoders(512)
    assert len(ours.tokenizer_l(LONG).input_ids) > 77 and len(ours.tokenizer_t5(LONG).input_ids) > 512


@pytest.mark.parametrize("t5_max_length", [512, 32])
@pytest.mark.parametrize("case", CASES)
def test_matches_diffusers_encode_prompt(encoders, pipeline, case, t5_max_length):
    prompts = CASES[case]
    ours = encoders(t5_max_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        context, mask, pooled = ours.encode_pooled(prompts)
        theirs, their_pooled, _ = pipeline.encode_prompt(prompt=prompts, prompt_2=None,
                                                         max_sequence_length=t5_max_length)
    assert context.shape == (len(prompts), t5_max_length, 96) == theirs.shape
    assert pooled.shape == (len(prompts), 32) == their_pooled.shape
    torch.testing.assert_close(context, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, their_pooled, atol=1e-5, rtol=0)
    assert mask.shape == context.shape[:2] and mask.all()
    assert (ours.dim, ours.pooled_dim, ours.max_length, ours.t5_max_length) == (96, 32, 77, t5_max_length)
    assert torch.equal(ours(prompts)[0], context)


def test_clip_skip_is_refused(encoders):
    ours = encoders(32)
    assert ours.clip_skip is None
    ours.clip_skip = None                                            # "not set" stays allowed
    with pytest.raises(ValueError, match="pooled output"):
        ours.clip_skip = 2
    assert ours.clip_skip is None


def test_truncation_warns_once_for_clip_and_once_for_t5(folder):
    ours = build_text_encoder(TextEncoderConfig(kind="flux", path=str(folder), t5_max_length=32))
    with pytest.warns(UserWarning) as caught:
        ours([LONG, SHORT])
    messages = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(messages) == 2
    assert any("77 CLIP tokens" in m for m in messages) and any("32 T5 tokens" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours([LONG])                                                 # further truncations are silent
        build_text_encoder(TextEncoderConfig(kind="flux", path=str(folder), t5_max_length=32))([SHORT])


@pytest.mark.parametrize("gone", PARTS)
def test_missing_parts_are_refused_by_name(folder, tmp_path, gone):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns(gone))
    with pytest.raises(FileNotFoundError, match=rf"\['{gone}'\]"):
        build_text_encoder(TextEncoderConfig(kind="flux", path=str(broken)))


def test_config_needs_a_folder_and_the_encoder_is_frozen(folder, tmp_path):
    for path in (None, str(tmp_path / "nope")):
        with pytest.raises(ValueError, match="flux kind needs a folder"):
            build_text_encoder(TextEncoderConfig(kind="flux", path=path))
    with pytest.raises(ValueError, match="joint_dim 128"):
        build_text_encoder(TextEncoderConfig(kind="flux", path=str(folder), joint_dim=128))
    ours = build_text_encoder(TextEncoderConfig.from_dict({"kind": "flux", "path": str(folder), "t5_max_length": 8}))
    assert isinstance(ours, FluxTextEncoder)
    ours.train()
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    with pytest.raises(TypeError):
        ours(SHORT)                                                  # a list of prompts, not one str
    ids, mask = ours.tokenize([SHORT, ""])
    assert ids.shape == mask.shape == (2, 77) and mask.sum(1).tolist() == [len(ours.tokenizer_l(SHORT).input_ids), 2]
