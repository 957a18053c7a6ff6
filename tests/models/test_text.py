"""Text encoders: each kind from a small random model saved to disk, checked against its library."""
import json
import warnings

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.models.text import ScratchTextEncoder, TextEncoderConfig, build_text_encoder

LONG = "a red circle to the left of a blue square " * 12  # ~110 BPE tokens
PROMPTS = ["a red circle", "", "a small green triangle at the top on a black background"]


def _reference_ids(prompts):
    """open_clip's own tokenizer output: the independent reference for the BPE ids."""
    return open_clip.get_tokenizer("ViT-B-32")(prompts)


def _check_truncation_warns_once(encoder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, mask = encoder.tokenize([LONG, LONG])
        encoder.tokenize([LONG])
    assert len([w for w in caught if "truncated" in str(w.message)]) == 1
    assert mask.all() and ids.shape == (2, encoder.max_length)
    return ids


# ---- scratch ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scratch():
    torch.manual_seed(0)
    return ScratchTextEncoder(TextEncoderConfig(kind="scratch", width=32, depth=2, heads=2)).eval()


def test_scratch_tokenize_matches_open_clip(scratch):
    ids, mask = scratch.tokenize(PROMPTS)
    ref = _reference_ids(PROMPTS)
    torch.testing.assert_close(ids, ref)
    assert mask.sum(1).tolist() == [int((r != 0).sum()) for r in ref]
    assert mask[1].sum() == 2  # empty prompt: start and end tokens only
    long_ids = _check_truncation_warns_once(scratch)
    torch.testing.assert_close(long_ids, _reference_ids([LONG, LONG]))


def test_scratch_shapes_and_padding_independence(scratch):
    context, mask = scratch(PROMPTS)
    assert context.shape == (3, 77, 32) and mask.shape == (3, 77) and mask.dtype == torch.bool
    # a prompt's real-token features must not depend on what else is in the batch (padding is masked)
    alone, _ = scratch(PROMPTS[:1])
    n = int(mask[0].sum())
    torch.testing.assert_close(alone[0, :n], context[0, :n], atol=1e-5, rtol=1e-5)


def test_scratch_save_load_roundtrip(scratch, tmp_path):
    scratch.save_pretrained(tmp_path)
    loaded = build_text_encoder(TextEncoderConfig(kind="scratch", path=str(tmp_path))).eval()
    assert loaded.dim == 32 and loaded.max_length == 77
    torch.testing.assert_close(loaded(PROMPTS)[0], scratch(PROMPTS)[0], atol=0, rtol=0)


def test_scratch_gets_gradients(scratch):
    context, _ = scratch(["a blue square"])
    context.sum().backward()
    assert scratch.token_embedding.weight.grad is not None
    scratch.zero_grad()


@pytest.mark.parametrize("embed_std,keeps_words", [(0.02, False), (1.0, True)])
def test_frozen_random_scratch_keeps_each_word_only_at_unit_scale(embed_std, keeps_words):
    # A frozen random encoder is only useful if "left" vs "right" changes the "left" token and
    # little else; at CLIP's 0.02 every token becomes the same bag-of-words mixture.
    torch.manual_seed(0)
    enc = ScratchTextEncoder(TextEncoderConfig(kind="scratch", width=64, depth=2, heads=4,
                                               max_length=16, embed_std=embed_std)).eval()
    with torch.no_grad():
        c, mask = enc(["a large red circle on the left", "a large red circle on the right"])
    diff = (c[1] - c[0])[mask[0]].norm(dim=-1)  # per token; the changed word is token 7 (after <start>)
    others = torch.cat([diff[:7], diff[8:]])
    ratio = float(diff[7] / others.max())
    assert (ratio > 5) == keeps_words, (embed_std, diff.tolist())


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="bert"):
        TextEncoderConfig(kind="bert")
    with pytest.raises(ValueError, match="wdth"):
        TextEncoderConfig.from_dict({"kind": "scratch", "wdth": 3})
    with pytest.raises(ValueError, match="embed_std"):
        TextEncoderConfig(embed_std=0.0)
    with pytest.raises(TypeError, match="single str"):
        ScratchTextEncoder(TextEncoderConfig(width=32, depth=1, heads=2)).tokenize("a red circle")


# ---- transformers CLIP -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random small CLIPTextModel plus a CLIPTokenizer built from open_clip's BPE files."""
    root = tmp_path_factory.mktemp("clip")
    bpe = open_clip.get_tokenizer("ViT-B-32")
    # transformers names CLIP's special tokens <|startoftext|> / <|endoftext|>
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (root / "vocab.json").write_text(json.dumps({rename.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (root / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(bpe.encoder), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=bpe.sot_token_id,
                            eos_token_id=bpe.eot_token_id, pad_token_id=bpe.eot_token_id)
    model = CLIPTextModel(config).eval()
    model.save_pretrained(root)
    return root, model


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_clip_encoder_matches_transformers(clip_dir, layer):
    root, model = clip_dir
    enc = build_text_encoder(TextEncoderConfig(kind="clip", path=str(root), layer=layer))
    assert enc.dim == 32 and enc.max_length == 77
    ids, mask = enc.tokenize(PROMPTS)
    ref_ids = _reference_ids(PROMPTS)
    assert torch.equal(ids[mask], ref_ids[mask]) and mask.sum(1).tolist() == (ref_ids != 0).sum(1).tolist()
    context, _ = enc(PROMPTS)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    final_norm = getattr(model, "text_model", model).final_layer_norm  # transformers 4 nests it in .text_model
    ref = out.last_hidden_state if layer == "last" else final_norm(out.hidden_states[-2])
    torch.testing.assert_close(context, ref)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training


def test_clip_truncation(clip_dir):
    enc = build_text_encoder(TextEncoderConfig(kind="clip", path=str(clip_dir[0])))
    ids = _check_truncation_warns_once(enc)
    assert ids[0, -1] == open_clip.get_tokenizer("ViT-B-32").eot_token_id


# ---- OpenCLIP ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def openclip_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("openclip")
    model_cfg = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3}}
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{root}", load_weights=False).eval()
    ckpt = root.parent / "openclip_weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    return f"local-dir:{root}", str(ckpt), model


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_openclip_encoder_matches_open_clip(openclip_files, layer):
    arch, ckpt, model = openclip_files
    enc = build_text_encoder(TextEncoderConfig(kind="openclip", arch=arch, path=ckpt, layer=layer))
    assert enc.dim == 32 and enc.max_length == 77
    context, mask = enc(PROMPTS)
    ids = _reference_ids(PROMPTS)
    assert mask.sum(1).tolist() == (ids != 0).sum(1).tolist()
    index = 2 if layer == "last" else 1
    with torch.no_grad():
        ref = model.forward_intermediates(text=ids, text_indices=[index], normalize_intermediates=True,
                                          intermediates_only=True)["text_intermediates"][0]
    torch.testing.assert_close(context, ref)
    _check_truncation_warns_once(enc)


def test_openclip_missing_checkpoint_is_named(openclip_files, tmp_path):
    arch = openclip_files[0]
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_text_encoder(TextEncoderConfig(kind="openclip", arch=arch, path=str(tmp_path / "nope.safetensors")))
