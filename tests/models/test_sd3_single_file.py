"""python -m ldm.models.from_single_file on SD3 / SD 3.5 files in Stability AI's layout (sd3_medium*.safetensors,
sd3.5_*.safetensors): the MMDiT under `model.diffusion_model.` in SD3's original names, the VAE under
`first_stage_model.`, the text encoders under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`.

The files are written here from a tiny random diffusers SD3 pipeline with a test-side map of diffusers' names to
the original ones (`to_original`), itself checked against diffusers' own single-file converter; our folder then
draws what diffusers' StableDiffusion3Pipeline draws from the same weights. The pipeline's transformer has SD3's
64-channel heads and its bigG a 64-wide head, as the sizes are read off the file; its CLIP ViT-L projects
pooled text by the identity, as SD3 conditions on it (and diffusers' single-file loader builds it)."""
import dataclasses
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from sd_layouts import PROMPTS, SD3_TRANSFORMER, sd3_images, vae_key_to_compvis, write_sd3_pipeline

from ldm.bench_models import TINY
from ldm.models.convert_mmdit import (diffusers_to_ours, load_original_mmdit, mmdit_config_from_diffusers,
                                      mmdit_config_from_original)
from ldm.models.from_single_file import check_layout, main
from ldm.pipeline import TextToImage

diffusers = pytest.importorskip("diffusers")

# 64-channel heads as every SD3; pooled: CLIP ViT-L's 32 + the 64-wide bigG's 64; context: T5's 96
TRANSFORMER = {**SD3_TRANSFORMER, "num_attention_heads": 2, "attention_head_dim": 64, "caption_projection_dim": 128,
               "pooled_projection_dim": 96}
SD35 = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}            # SD 3.5 medium's additions


# ----------------------------------------------------------------------------- the test-side map

def _swap(t: torch.Tensor) -> torch.Tensor:
    """diffusers' (scale, shift) rows of an AdaLayerNormContinuous as SD3's (shift, scale), and back."""
    scale, shift = t.chunk(2)
    return torch.cat([shift, scale])


def to_original(state: dict) -> dict:
    """diffusers' SD3Transformer2DModel tensors as SD3's reference MMDiT names them (sd3_impls: joint_blocks with
    an image x_block and a text context_block, fused qkv, adaLN_modulation; the last context_block pre-only:
    qkv and a (shift, scale) modulation only), without `model.diffusion_model.`."""
    top = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
           "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
           "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
           "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear",
           "norm_out.linear": "final_layer.adaLN_modulation.1"}
    single = {"norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
              "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
              "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
              "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
              "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q",
              "attn2.norm_k": "x_block.attn2.ln_k", "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
              "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
    fused = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
             "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
    last = max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))
    out = {"pos_embed": state["pos_embed.pos_embed"]}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        if module in top:
            out[f"{top[module]}.{param}"] = _swap(value) if module == "norm_out.linear" else value
        elif m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
            i, name = int(m[1]), m[2]
            if name in single:
                swap = name == "norm1_context.linear" and i == last
                out[f"joint_blocks.{i}.{single[name]}.{param}"] = _swap(value) if swap else value
    for i in range(last + 1):
        for fused_name, parts in fused.items():
            names = [f"transformer_blocks.{i}.{p}.{{}}" for p in parts]
            if names[0].format("weight") in state:
                for param in ("weight", "bias"):
                    out[f"joint_blocks.{i}.{fused_name}.{param}"] = torch.cat([state[n.format(param)] for n in names])
    return out


def transformer_original(transformer) -> dict:
    """The transformer under `model.diffusion_model.` in the original names, checked against diffusers' own
    single-file converter, which must give every tensor back."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    state = transformer.state_dict()
    original = {f"model.diffusion_model.{k}": v for k, v in to_original(state).items()}
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    return original


def vae_original(vae) -> dict:
    """The autoencoder under `first_stage_model.` in the CompVis names (1x1-conv attention)."""
    out = {}
    for key, value in vae.state_dict().items():
        key = vae_key_to_compvis(key, len(vae.config.block_out_channels))
        out[key] = value[:, :, None, None] if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", key) else value
    return out


def sd3_file(pipe, path, clips: bool = True, t5: bool = False) -> None:
    """What Stability AI ships: the MMDiT and the VAE, with `clips` the CLIPs (transformers 4's names), with `t5`
    T5-XXL in half precision (the _t5xxlfp16 files)."""
    state = {**transformer_original(pipe.transformer), **vae_original(pipe.vae)}
    if clips:
        for name, model in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
            state |= {f"text_encoders.{name}.transformer.{k}": v for k, v in model.state_dict().items()}
        state["text_encoders.clip_l.transformer.text_projection.weight"] = torch.randn(32, 32)   # SD3 reads none
    if t5:
        state |= {f"text_encoders.t5xxl.transformer.{k}": v.half() for k, v in pipe.text_encoder_3.state_dict().items()
                  if k != "encoder.embed_tokens.weight"}                                        # tied to shared
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(diffusers SD 3.5-style pipeline with SD3's text-encoder conventions, folder): sd3.safetensors (clips
    and T5), sd3-bare.safetensors (neither), the pipeline saved in pipeline/, its T5 tokenizer in parts/."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    folder = tmp_path_factory.mktemp("sd3file")
    pipe = write_sd3_pipeline(folder, t5=True, **TRANSFORMER, **SD35)
    torch.manual_seed(1)
    bigg = CLIPTextModelWithProjection(CLIPTextConfig(**{**TINY.clip, "hidden_size": 64, "intermediate_size": 128,
                                                         "num_attention_heads": 1, "projection_dim": 64,
                                                         "hidden_act": "gelu"})).eval()
    with torch.no_grad():
        pipe.text_encoder.text_projection.weight.copy_(torch.eye(32))
    # T5's defaults for what its weights do not say (relative positions up to 128), weights fp16-exact
    t5 = T5EncoderModel(T5Config(vocab_size=pipe.text_encoder_3.config.vocab_size, d_model=96, d_kv=16, d_ff=128,
                                 num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    t5.load_state_dict({k: v.half().float() for k, v in t5.state_dict().items()})
    theirs = diffusers.StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_2": bigg, "text_encoder_3": t5})
    theirs.set_progress_bar_config(disable=True)
    theirs.save_pretrained(str(folder / "pipeline"))
    sd3_file(theirs, folder / "sd3.safetensors", t5=True)
    sd3_file(theirs, folder / "sd3-bare.safetensors", clips=False)
    return theirs, folder


def configs(folder) -> list[str]:
    """The tiny VAE's and CLIP ViT-L's configs (an SD3 file's built-in ones are the released sizes)."""
    return ["--vae-config", str(folder / "pipeline" / "vae" / "config.json"),
            "--text-config", str(folder / "pipeline" / "text_encoder" / "config.json")]


# ----------------------------------------------------------------------------- the transformer alone

@pytest.mark.parametrize("variant", [{}, SD35], ids=["sd3", "sd35"])
def test_original_transformer_loads_as_diffusers_does(variant):
    """Our MMDiT from the original names holds what it holds from diffusers' (fused qkv split, both (shift, scale)
    modulations swapped, the last block's text query dropped); the sizes are read off the tensors."""
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(**{**TRANSFORMER, **variant})
    original = {k.removeprefix("model.diffusion_model."): v for k, v in transformer_original(transformer).items()}
    expected = mmdit_config_from_diffusers(dict(transformer.config))
    assert mmdit_config_from_original(original) == dataclasses.replace(expected, sample_size=128)
    ours = load_original_mmdit(original).state_dict()
    reference = diffusers_to_ours(transformer.state_dict())
    assert ours.keys() == reference.keys()
    assert [k for k in ours if not torch.equal(ours[k], reference[k])] == []


RELEASED = {  # the transformer/config.json of stabilityai's diffusers repos
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
    "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
}


@pytest.mark.parametrize("name", RELEASED)
def test_released_sizes_are_read_off_the_weights(name):
    """At full size on the meta device: the released models' configs come back from their original tensors."""
    config = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                  joint_attention_dim=4096, pooled_projection_dim=2048, **RELEASED[name])
    with torch.device("meta"):
        transformer = diffusers.SD3Transformer2DModel(**config)
    original = to_original(transformer.state_dict())
    assert original["pos_embed"].shape[1] == {192: 36864, 384: 147456}[config["pos_embed_max_size"]]
    assert mmdit_config_from_original(original) == mmdit_config_from_diffusers(config)


# ----------------------------------------------------------------------------- whole files

def test_file_with_clips_and_t5_draws_what_diffusers_draws(sd3, tmp_path, one_thread, capsys):
    """sd3_medium_incl_clips_t5xxlfp16-style: CLIPs and T5 (its tokenizer given) from the file, T5 kept in half
    precision; SD 3.5's qk norm and dual attention; our images are diffusers' within 2e-4."""
    theirs, folder = sd3
    main([str(folder / "sd3.safetensors"), "--out", str(tmp_path / "model"), "--guidance", "3",
          "--t5-tokenizer", str(folder / "parts" / "tokenizer_3"), *configs(folder)])
    assert "rectified flow (shift 3), prediction flow, w = 3" in capsys.readouterr().out
    t5 = load_file(str(tmp_path / "model" / "text_encoder" / "clip" / "text_encoder_3" / "model.safetensors"))
    assert {v.dtype for v in t5.values()} == {torch.float16}
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    assert pipe.text_encoder.cfg.kind == "sd3" and pipe.text_encoder.t5 is not None
    images, _ = pipe.generate(PROMPTS, steps=3, seed=0)
    reference = sd3_images(theirs, pipe, PROMPTS, 3, 4.0)
    assert reference.std() > 0.05
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=2e-4, rtol=0)


def test_file_without_clips_takes_the_pipelines_text_encoders(sd3, tmp_path, one_thread):
    """sd3_medium-style (MMDiT and VAE only) with --text-encoders: the pipeline's CLIPs and T5 are copied."""
    theirs, folder = sd3
    main([str(folder / "sd3-bare.safetensors"), "--out", str(tmp_path / "model"), "--guidance", "2",
          "--text-encoders", str(folder / "pipeline"), "--vae-config", str(folder / "pipeline/vae/config.json")])
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    assert pipe.text_encoder.t5 is not None
    images, _ = pipe.generate(PROMPTS, steps=3, seed=1)
    torch.testing.assert_close(images * 0.5 + 0.5, sd3_images(theirs, pipe, PROMPTS, 3, 3.0, seed=1), atol=2e-4, rtol=0)


def test_t5_without_its_tokenizer_is_left_out_with_a_warning(sd3, tmp_path, one_thread):
    """No T5 tokenizer to be had: the folder runs without T5 (zeros in its place), as diffusers' pipeline does."""
    theirs, folder = sd3
    with pytest.warns(UserWarning, match="T5 is left out.*--t5-tokenizer"):
        main([str(folder / "sd3.safetensors"), "--out", str(tmp_path / "model"), *configs(folder)])
    assert not (tmp_path / "model" / "text_encoder" / "clip" / "text_encoder_3").exists()
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    images, _ = pipe.generate(PROMPTS, steps=3, seed=0)
    no_t5 = diffusers.StableDiffusion3Pipeline(**{**theirs.components, "text_encoder_3": None, "tokenizer_3": None})
    no_t5.set_progress_bar_config(disable=True)
    torch.testing.assert_close(images * 0.5 + 0.5, sd3_images(no_t5, pipe, PROMPTS, 3, 7.0), atol=2e-4, rtol=0)


def test_refusals_name_what_is_missing(sd3, tmp_path, capsys):
    _, folder = sd3
    out = str(tmp_path / "model")
    bare, full = str(folder / "sd3-bare.safetensors"), str(folder / "sd3.safetensors")
    one_clip = {k: v for k, v in load_file(full).items() if not k.startswith("text_encoders.clip_g.")}
    save_file(one_clip, str(tmp_path / "one.safetensors"))
    for args, message in (
            ([bare], "without its text encoders (no text_encoders.clip_l."),
            ([bare, "--text-encoders", str(folder / "sd3")], "do not fit its transformer: pooled 80"),   # 48-wide bigG
            ([bare, "--t5-tokenizer", str(folder / "parts" / "tokenizer_3")], "holds no T5"),
            ([str(tmp_path / "one.safetensors")], "one CLIP only: no text_encoders.clip_g."),
            ([full, "--prediction", "v"], "SD3 predicts the flow velocity"),
            ([full, "--text-encoders", str(tmp_path / "none")], "--text-encoders")):
        with pytest.raises(SystemExit):
            main([*args, "--out", out, "--vae-config", str(folder / "pipeline" / "vae" / "config.json")])
        assert message in capsys.readouterr().err, args
        assert not (tmp_path / "model").exists()


def test_sd_files_still_go_the_sd_way(tmp_path, capsys):
    """The layout is told by the MMDiT's joint blocks: an SD 1.x file is not SD3's, and SD3's options on it are
    refused by name."""
    sd1 = {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(1), "first_stage_model.x": torch.ones(1),
           "cond_stage_model.transformer.x": torch.ones(1)}
    assert check_layout(sd1, "sd1") == "sd1"
    assert check_layout({"model.diffusion_model.joint_blocks.0.x": torch.ones(1), "first_stage_model.x": torch.ones(1)},
                        "sd3") == "sd3"
    save_file(sd1, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "sd1.safetensors"), "--out", str(tmp_path / "model"), "--text-encoders", str(tmp_path)])
    assert "not an SD3 file (sd1)" in capsys.readouterr().err
