"""LoRA (ldm.models.lora): the files people share for SD 1.x merge into our models and draw what diffusers
draws with the same file (diffusers' own loader, through peft, is the reference); the names map both ways
over every layer of a diffusers U-Net and CLIP; the training wrapper merges exactly."""
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from sd_layouts import PROMPTS, on_our_grid, write_sd_pipeline

from ldm.bench_models import TINY
from ldm.diffusion.samplers import initial_noise
from ldm.models.convert_unet import diffusers_to_ours, unet_config_from_diffusers
from ldm.models.from_diffusers import convert
from ldm.models.lora import (METADATA_KEY, LoRALinear, Update, add_lora, kohya_to_dotted, lora_file_state,
                             merged_state_dict, ours_to_diffusers, parse_lora_arg, read_lora)
from ldm.models.unet import UNet
from ldm.pipeline import TextToImage

from tests.tiny_models import random_model_with_student

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")                    # diffusers' LoRA loader needs it

# The SD 1.x block layout (4 levels, 2 layers, mid attention, skip convs) at toy widths.
SD_LIKE = dict(sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
               attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8)


def _layers(module):
    return [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def test_names_map_both_ways_over_every_layer():
    from transformers import CLIPTextConfig, CLIPTextModel
    theirs = diffusers.UNet2DConditionModel(**SD_LIKE)
    ours = UNet(unet_config_from_diffusers(dict(theirs.config)))
    our_layers, levels = set(_layers(ours)), len(SD_LIKE["block_out_channels"])
    names = _layers(theirs)
    assert len(names) == len(our_layers) > 100
    for name in names:
        mapped = next(iter(diffusers_to_ours({f"{name}.weight": None}, levels)))[:-len(".weight")]
        assert mapped in our_layers, name
        assert ours_to_diffusers(mapped, levels) == name
        assert kohya_to_dotted(name.replace(".", "_")) == name      # kohya's "_" for "." re-split
    for name in _layers(CLIPTextModel(CLIPTextConfig(**TINY.clip))):
        assert kohya_to_dotted(name.replace(".", "_")) == name


def test_conv_update_is_the_two_convs_it_stands_for():
    """LoCon: a 3x3 'down' conv to r channels, then a 1x1 'up' conv; merged, one 3x3 conv."""
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 6, 3, 3, generator=g), torch.randn(5, 4, 1, 1, generator=g)
    x = torch.randn(2, 6, 9, 9, generator=g)
    two = F.conv2d(F.conv2d(x, down, padding=1), up) * 0.5
    one = F.conv2d(x, Update(down, up, 0.5).delta(torch.Size((5, 6, 3, 3))), padding=1)
    torch.testing.assert_close(one, two, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="do not fit a weight of shape"):
        Update(down, up, 1.0).delta(torch.Size((5, 6, 1, 1)))


def test_training_wrapper_starts_as_the_base_and_merges_exactly(one_thread):
    torch.manual_seed(0)
    cfg = unet_config_from_diffusers(dict(diffusers.UNet2DConditionModel(**SD_LIKE).config))
    base = UNet(cfg).eval()
    unet = UNet(cfg).eval()
    unet.load_state_dict(base.state_dict())
    names = add_lora(unet, rank=4, alpha=8)
    assert len(names) == 16 * 2 * 4  # 16 transformer blocks (as in SD 1.x), 2 attentions, 4 projections
    assert all(isinstance(unet.get_submodule(n), LoRALinear) for n in names)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, ctx), base(x, t, ctx))          # B = 0: the base model
        for n in names:
            unet.get_submodule(n).lora_B.normal_(0, 0.05)
        wrapped = unet(x, t, ctx)
        plain = UNet(cfg).eval()
        plain.load_state_dict(merged_state_dict(unet))                         # strict: the plain names
        torch.testing.assert_close(plain(x, t, ctx), wrapped, atol=1e-5, rtol=1e-5)
        assert (wrapped - base(x, t, ctx)).abs().max() > 1e-3


def _random_lora(unet, text, layout: str, rank: int = 4, seed: int = 0) -> tuple[dict, dict]:
    """A LoRA for the diffusers modules of `unet` (attention; for kohya also LoCon convs) and `text` (if given)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    modules = {f"unet.{n}": m for n, m in unet.named_modules()
               if n.endswith(("to_q", "to_k", "to_v", "to_out.0")) or (layout == "kohya" and n.endswith(("conv1", "proj_in")))}
    if text is not None:
        modules.update({f"text_encoder.{n}": m for n, m in text.named_modules() if n.endswith(("q_proj", "v_proj", "fc1"))})
    for name, m in modules.items():
        down = torch.randn(rank, *m.weight.shape[1:], generator=g) * 0.3
        up = torch.randn(m.weight.shape[0], rank, *([1, 1] if m.weight.dim() == 4 else []), generator=g) * 0.3
        if layout == "kohya":
            part, _, module = name.partition(".")
            key = ("lora_unet_" if part == "unet" else "lora_te_") + module.replace(".", "_")
            state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
        else:
            state |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    meta = {}
    if layout == "peft+alpha":
        meta = {METADATA_KEY: json.dumps({  # as diffusers' save_lora_weights writes a peft LoraConfig
            "unet.r": rank, "unet.lora_alpha": 8, "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
            "text_encoder.r": rank, "text_encoder.lora_alpha": 8, "text_encoder.target_modules": ["q_proj", "v_proj", "fc1"]})}
    return state, meta


def _diffusers_images(theirs, noise, steps, w):
    on_our_grid(theirs)
    with torch.no_grad():
        return theirs(PROMPTS, num_inference_steps=steps, guidance_scale=1 + w, latents=noise, output_type="pt").images


@pytest.mark.parametrize("layout,scale", [("peft", 1.0), ("peft+alpha", 0.6), ("kohya", 1.0)])
def test_lora_file_draws_what_diffusers_draws(tmp_path, one_thread, layout, scale):
    theirs = write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"), guidance=3.0)
    # diffusers 0.42 converts a kohya text-encoder LoRA to transformers 4's names ("text_model.encoder..."),
    # which transformers 5's CLIPTextModel lacks and drops (its load report says UNEXPECTED): the kohya text
    # part is checked against its peft twin below instead.
    state, meta = _random_lora(theirs.unet, None if layout == "kohya" else theirs.text_encoder, layout)
    save_file(state, str(tmp_path / "lora.safetensors"), metadata=meta or None)
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    steps, w = 3, 3.0
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(steps), pipe.latent_shape(len(PROMPTS)),
                          generator=torch.Generator().manual_seed(0))
    before = _diffusers_images(theirs, noise, steps, w)
    assert pipe.add_lora(str(tmp_path / "lora.safetensors"), scale) == len(state) // (3 if layout == "kohya" else 2)
    images, _ = pipe.generate(PROMPTS, steps=steps, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.load_lora_weights(str(tmp_path / "lora.safetensors"))
        theirs.fuse_lora(lora_scale=scale)
    reference = _diffusers_images(theirs, noise, steps, w)
    assert (reference - before).abs().max() > 0.05                 # the LoRA changes the picture
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=3e-4, rtol=0)


def test_kohya_and_peft_files_of_one_update_merge_alike(tmp_path):
    write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    pipes = [TextToImage.from_folder(str(tmp_path / "model")) for _ in range(3)]
    text = pipes[0].text_encoder.model
    kohya, _ = _random_lora(nn.Module(), text, "kohya")                 # text-encoder layers only
    # the names kohya and diffusers wrote under transformers 4 ("text_model.encoder..."), whichever is installed
    kohya = {"lora_te_text_model_" + k.removeprefix("lora_te_").removeprefix("text_model_"): v for k, v in kohya.items()}
    peft, meta = {}, {METADATA_KEY: json.dumps({"text_encoder.r": 4, "text_encoder.lora_alpha": 2})}
    for key, value in kohya.items():
        module, _, kind = key.partition(".")
        name = "text_encoder." + kohya_to_dotted(module[len("lora_te_"):])
        if kind != "alpha":
            peft[f"{name}.lora_{'A' if kind == 'lora_down.weight' else 'B'}.weight"] = value
    assert all(k.startswith("text_encoder.text_model.encoder.") for k in peft)
    flat = {k.replace("text_model.", "", 1): v for k, v in peft.items()}    # transformers 5's names
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    save_file(peft, str(tmp_path / "peft.safetensors"), metadata=meta)
    save_file(flat, str(tmp_path / "flat.safetensors"), metadata=meta)
    before = {k: v.clone() for k, v in text.state_dict().items()}
    counts = [p.add_lora(str(tmp_path / f"{name}.safetensors")) for p, name in zip(pipes, ("kohya", "peft", "flat"))]
    assert counts == [6, 6, 6]
    after = [p.text_encoder.model.state_dict() for p in pipes]
    assert sum(not torch.equal(after[0][k], before[k]) for k in before) == 6
    for k in before:
        torch.testing.assert_close(after[0][k], after[1][k], atol=1e-6, rtol=0)
        torch.testing.assert_close(after[2][k], after[1][k], atol=0, rtol=0)


def test_our_trained_lora_file_loads_in_diffusers(tmp_path, one_thread):
    """Stage 2 writes its LoRA in diffusers' layout: diffusers' U-Net with our file = our wrapped U-Net."""
    theirs = diffusers.UNet2DConditionModel(**SD_LIKE).eval()
    levels = len(SD_LIKE["block_out_channels"])
    ours = UNet(unet_config_from_diffusers(dict(theirs.config))).eval()
    ours.load_state_dict(diffusers_to_ours(theirs.state_dict(), levels))
    add_lora(ours, rank=4, alpha=2, targets=("to_q", "to_k", "to_v", "to_out", "proj", "out"))  # + feed-forward
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)
    tensors, meta = lora_file_state(ours)
    assert json.loads(meta[METADATA_KEY])["unet.target_modules"] == ["net.2", "proj", "to_k", "to_out.0", "to_q",
                                                                           "to_v"]
    save_file(tensors, str(tmp_path / "lora.safetensors"), metadata=meta)
    pipe = diffusers.StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=theirs, scheduler=None,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t.float(), ctx), theirs(x, t, encoder_hidden_states=ctx).sample,
                                   atol=1e-4, rtol=1e-4)
    back = read_lora(str(tmp_path / "lora.safetensors"))["unet"]   # and our reader reads it back
    assert len(back) == len(tensors) // 2 and {u.scale for u in back.values()} == {1.0}


def test_bad_files_are_refused_and_change_nothing(tmp_path):
    write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    good = {f"{q}.lora_A.weight": torch.ones(2, 64), f"{q}.lora_B.weight": torch.ones(64, 2)}
    cases = {
        "dora": ({f"{q}.lora_magnitude_vector": torch.ones(64)}, "a peft DoRA file"),  # LyCORIS': test_lycoris.py
        "sgm": (good | {"lora_unet_input_blocks_40_1_proj_in.lora_down.weight": torch.ones(2, 64),   # CompVis
                        "lora_unet_input_blocks_40_1_proj_in.lora_up.weight": torch.ones(64, 2)},  # names too
                "have no linear/conv layer in this model"),
        "sdxl": (good | {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 32),
                         "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(32, 2)},
                 r"text_encoder_2 weights, but this model's text encoders are only \['text_encoder'\]"),
        "missing": (good | {"unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": torch.ones(2, 64),
                            "unet.down_blocks.7.attentions.0.proj_in.lora_B.weight": torch.ones(64, 2)},
                    "have no linear/conv layer in this model"),
        "shape": (good | {f"{q}.lora_B.weight": torch.ones(32, 2)}, "do not fit a weight of shape"),
        "half": ({f"{q}.lora_A.weight": torch.ones(2, 64)}, "has no up/lora_B weight"),
        "other": (good | {"unet.conv_in.weight": torch.ones(1)}, "not LoRA weights in a layout we read"),
    }
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable LoRA file"):
        pipe.add_lora(str(tmp_path / "junk.safetensors"))
    torch.save({"state_dict": {"a": torch.ones(1)}}, tmp_path / "nested.ckpt")
    with pytest.raises(ValueError, match="expected a flat dict of tensors"):
        pipe.add_lora(str(tmp_path / "nested.ckpt"))
    for name, (state, message) in cases.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ValueError, match=message):
            pipe.add_lora(str(tmp_path / f"{name}.safetensors"))
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    save_file(good, str(tmp_path / "good.safetensors"))
    assert pipe.add_lora(str(tmp_path / "good.safetensors"), 0.5) == 1


def test_scratch_text_encoder_refuses_text_lora(tmp_path):
    from ldm.pipeline import save_random_model
    save_random_model(str(tmp_path / "ours"))
    pipe = TextToImage.from_folder(str(tmp_path / "ours"))
    save_file({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 8),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(8, 2)},
              str(tmp_path / "te.safetensors"))
    with pytest.raises(ValueError, match="no transformers CLIP model"):
        pipe.add_lora(str(tmp_path / "te.safetensors"))


def test_older_and_peft_key_forms_name_the_same_update():
    from ldm.models.lora import _split_key
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
    for key in (f"unet.{module}.lora_A.weight", f"unet.base_model.model.{module}.lora_A.default.weight",
                f"{module}.lora.down.weight", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor."
                "to_out_lora.down.weight", "lora_unet_" + module.replace(".", "_") + ".lora_down.weight"):
        assert _split_key(key) == ("unet", module, "down"), key


def test_lora_argument():
    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_arg("runs/a:b/style.safetensors:0.75") == ("runs/a:b/style.safetensors", 0.75)
    assert parse_lora_arg("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", 1.0)


def test_merge_lora_bakes_into_a_copy_what_add_lora_does(tmp_path, one_thread, capsys):
    from ldm.models.merge_lora import main
    theirs = write_sd_pipeline(tmp_path)
    convert(str(tmp_path / "sd"), str(tmp_path / "model"))
    state, meta = _random_lora(theirs.unet, theirs.text_encoder, "peft")
    save_file(state, str(tmp_path / "lora.safetensors"))
    before = (tmp_path / "model" / "unet" / "model.safetensors").read_bytes()
    main([str(tmp_path / "model"), "--lora", f"{tmp_path / 'lora.safetensors'}:0.5", "--out", str(tmp_path / "baked")])
    assert "1 LoRA file(s) merged" in capsys.readouterr().out
    assert (tmp_path / "model" / "unet" / "model.safetensors").read_bytes() == before     # the source is untouched
    live = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    live.add_lora(str(tmp_path / "lora.safetensors"), 0.5)
    baked = TextToImage.from_folder(str(tmp_path / "baked"), decoder_precision="fp32")
    images = [p.generate(PROMPTS, steps=2, seed=0)[0] for p in (live, baked)]
    torch.testing.assert_close(images[1], images[0], atol=1e-5, rtol=0)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "model"), "--lora", str(tmp_path / "lora.safetensors"), "--out", str(tmp_path / "baked")])
    assert "already holds a model folder" in capsys.readouterr().err


def test_merge_lora_reaches_the_students_and_keeps_their_dtype(tmp_path, one_thread):
    from safetensors import safe_open

    from ldm.distill.student import GuidedStudent
    from ldm.models.merge_lora import merge
    random_model_with_student(tmp_path / "model", w_features=16, dtype=torch.float16)
    unet = UNet.from_pretrained(str(tmp_path / "model" / "unet"))
    add_lora(unet, rank=2)
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.3)
    tensors, meta = lora_file_state(unet)
    save_file(tensors, str(tmp_path / "lora.safetensors"), metadata=meta)
    assert merge(str(tmp_path / "model"), [(str(tmp_path / "lora.safetensors"), 1.0)], str(tmp_path / "baked")) \
        == 2 * len(tensors) // 2                                           # teacher and student-2
    with safe_open(str(tmp_path / "baked" / "student-2" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    live = TextToImage.from_folder(str(tmp_path / "model"))
    live.add_lora(str(tmp_path / "lora.safetensors"))
    baked = TextToImage.from_folder(str(tmp_path / "baked"))
    images = [p.generate(["a red circle"], steps=3, seed=0)[0] for p in (live, baked)]   # the teacher
    torch.testing.assert_close(images[1], images[0], atol=1e-5, rtol=0)
    merged = {k: v.half() for k, v in live.student(2).state_dict().items()}           # student-2: its merged
    stored = baked.student(2).state_dict()                                            # weights, in fp16
    assert all(torch.equal(stored[k].half(), merged[k]) for k in merged)
    assert not all(torch.equal(stored[k], GuidedStudent.from_pretrained(str(tmp_path / "model" / "student-2"))
                               .state_dict()[k]) for k in stored)
