"""SD3's text conditioning (ldm.models.text_sd3) against diffusers' StableDiffusion3Pipeline.encode_prompt,
on a tiny random SD3 text stack (sd_layouts.write_sd3_text_parts: CLIPs 32 + 48 wide, T5 96 wide)."""
import shutil
import warnings

import diffusers
import pytest
import torch
from sd_layouts import SD3_WIDTHS, write_sd3_text_parts

from ldm.models.text import TextEncoderConfig, build_text_encoder
from ldm.models.text_sd3 import Sd3TextEncoder

SHORT = "a red cube on a blue floor"
LONG = "a photo of a red cube and a green cat on the blue floor, " * 8   # > 77 CLIP tokens, > 32 T5 tokens
CASES = {"short": [SHORT], "empty": [""], "long": [LONG], "mixed": [SHORT, "", LONG, "a cat"]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"t5": the full text stack plus a tiny transformer/, "no_t5": the same without text_encoder_3/, tokenizer_3/}."""
    root = tmp_path_factory.mktemp("sd3")
    write_sd3_text_parts(root / "t5")
    torch.manual_seed(1)
    diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=SD3_WIDTHS["t5"], caption_projection_dim=16,
        pooled_projection_dim=SD3_WIDTHS["clip_l"] + SD3_WIDTHS["clip_g"], pos_embed_max_size=8,
    ).save_pretrained(str(root / "t5" / "transformer"))
    shutil.copytree(root / "t5", root / "no_t5", ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    return {"t5": root / "t5", "no_t5": root / "no_t5"}


def diffusers_pipeline(folder, t5: bool):
    """diffusers' SD3 pipeline on the parts in `folder` as diffusers itself loads them (no VAE)."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffusers.StableDiffusion3Pipeline(
            transformer=diffusers.SD3Transformer2DModel.from_pretrained(str(folder / "transformer")),
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
            text_encoder=CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder")),
            tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2")),
            tokenizer_2=CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2")),
            text_encoder_3=T5EncoderModel.from_pretrained(str(folder / "text_encoder_3")) if t5 else None,
            tokenizer_3=T5TokenizerFast.from_pretrained(str(folder / "tokenizer_3")) if t5 else None)


@pytest.fixture(scope="module")
def pipelines(folders):
    return {name: diffusers_pipeline(folders[name], name == "t5") for name in folders}


@pytest.fixture(scope="module")
def encoders(folders):
    """Our encoder on folders[variant] reading t5_max_length T5 tokens, built once for each pair."""
    built = {}

    def get(variant: str, t5_max_length: int = 256) -> Sd3TextEncoder:
        if (variant, t5_max_length) not in built:
            built[variant, t5_max_length] = build_text_encoder(
                TextEncoderConfig(kind="sd3", path=str(folders[variant]), t5_max_length=t5_max_length))
        return built[variant, t5_max_length]
    return get


@pytest.mark.parametrize("t5_max_length", [256, 32])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", ["t5", "no_t5"])
def test_matches_diffusers_encode_prompt(encoders, pipelines, variant, case, t5_max_length):
    prompts = CASES[case]
    ours = encoders(variant, t5_max_length)
    assert isinstance(ours, Sd3TextEncoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        context, mask, pooled = ours.encode_pooled(prompts)
        theirs, _, their_pooled, _ = pipelines[variant].encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=t5_max_length)
    assert context.shape == (len(prompts), 77 + t5_max_length, SD3_WIDTHS["t5"]) == theirs.shape
    assert pooled.shape == (len(prompts), SD3_WIDTHS["clip_l"] + SD3_WIDTHS["clip_g"]) == their_pooled.shape
    torch.testing.assert_close(context, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, their_pooled, atol=1e-5, rtol=0)
    assert mask.shape == context.shape[:2] and mask.all()
    assert ours.dim == SD3_WIDTHS["t5"] and ours.pooled_dim == pooled.shape[1] and ours.max_length == 77
    if variant == "no_t5":
        assert not context[:, 77:].any()                             # T5's tokens are zeros without T5
    assert not context[:, :77, SD3_WIDTHS["clip_l"] + SD3_WIDTHS["clip_g"]:].any()   # CLIP's zero padding
    assert torch.equal(ours(prompts)[0], context)


def test_clip_skip_matches_diffusers(folders, pipelines):
    ours = build_text_encoder(TextEncoderConfig(kind="sd3", path=str(folders["t5"])))
    ours.clip_skip = 3                                               # diffusers' clip_skip 1: layer -3
    context, _, pooled = ours.encode_pooled([SHORT])
    default = pipelines["t5"].encode_prompt(SHORT, None, None, do_classifier_free_guidance=False)[0]
    assert not torch.allclose(context, default)                      # the layer matters
    theirs, _, their_pooled, _ = pipelines["t5"].encode_prompt(SHORT, None, None, do_classifier_free_guidance=False,
                                                               clip_skip=1)
    torch.testing.assert_close(context, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, their_pooled, atol=1e-5, rtol=0)


def test_truncation_warns_once_for_clip_and_once_for_t5(folders):
    ours = build_text_encoder(TextEncoderConfig(kind="sd3", path=str(folders["t5"]), t5_max_length=32))
    with pytest.warns(UserWarning) as caught:
        ours([LONG, SHORT])
    messages = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(messages) == 2
    assert any("77 CLIP tokens" in m for m in messages) and any("32 T5 tokens" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours([LONG])                                                 # further truncations are silent
        build_text_encoder(TextEncoderConfig(kind="sd3", path=str(folders["t5"])))([SHORT])   # nothing cut


def test_width_without_t5_from_config_or_transformer(folders, tmp_path):
    folder = tmp_path / "text-only"
    shutil.copytree(folders["no_t5"], folder, ignore=shutil.ignore_patterns("transformer"))
    with pytest.raises(ValueError, match="joint_dim"):
        Sd3TextEncoder(TextEncoderConfig(kind="sd3", path=str(folder)))
    ours = Sd3TextEncoder(TextEncoderConfig(kind="sd3", path=str(folder), joint_dim=128, t5_max_length=8))
    context, _, _ = ours.encode_pooled([SHORT])
    assert ours.dim == 128 and context.shape == (1, 77 + 8, 128)
    with pytest.raises(ValueError, match="wider"):
        Sd3TextEncoder(TextEncoderConfig(kind="sd3", path=str(folder), joint_dim=64))
    with pytest.raises(ValueError, match="joint_dim 128"):
        Sd3TextEncoder(TextEncoderConfig(kind="sd3", path=str(folders["t5"]), joint_dim=128))


@pytest.mark.parametrize("gone", ["text_encoder_2", "tokenizer", "tokenizer_3"])
def test_missing_parts_are_refused_by_name(folders, tmp_path, gone):
    folder = tmp_path / "broken"
    shutil.copytree(folders["t5"], folder, ignore=shutil.ignore_patterns(gone))
    with pytest.raises(FileNotFoundError, match=gone):
        build_text_encoder(TextEncoderConfig(kind="sd3", path=str(folder)))


def test_config_needs_a_folder_and_the_encoder_is_frozen(folders, tmp_path):
    with pytest.raises(ValueError, match="sd3 kind needs a folder"):
        build_text_encoder(TextEncoderConfig(kind="sd3"))
    with pytest.raises(ValueError, match="sd3 kind needs a folder"):
        build_text_encoder(TextEncoderConfig(kind="sd3", path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="t5_max_length"):
        TextEncoderConfig(kind="sd3", path=str(folders["t5"]), t5_max_length=0)
    ours = build_text_encoder(TextEncoderConfig.from_dict({"kind": "sd3", "path": str(folders["t5"])}))
    ours.train()
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    with pytest.raises(TypeError):
        ours(SHORT)                                                  # a list of prompts, not one str
    ids, mask = ours.tokenize([SHORT, ""])
    assert ids.shape == mask.shape == (2, 77) and mask.sum(1).tolist() == [len(ours.tokenizer_l(SHORT).input_ids), 2]
