"""SD3 LoRA (ldm.models.lora): a diffusers/peft file merged into our MMDiT draws what diffusers draws with it
(load_lora_weights + fuse_lora, through peft); the same update in kohya's names and in sd-scripts' original
SD3 layout (fused qkv, (shift, scale) modulations) merges to the same weights, W + scale * alpha / r * up @ down
on diffusers' side renamed by convert_mmdit; the CLIPs' parts merge in closed form; unknown modules and T5 are
refused by name; merge_lora bakes it all into a copy of the folder."""
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from ldm.models.convert_mmdit import diffusers_to_ours, mmdit_config_from_diffusers
from ldm.models.from_diffusers import convert
from ldm.models.lora import METADATA_KEY, Update, kohya_to_dotted, mmdit_module, mmdit_updates, parse_lora_arg
from ldm.models.mmdit import MMDiT
from ldm.pipeline import TextToImage
from sd_layouts import PROMPTS, SD3_TRANSFORMER, sd3_images, write_sd3_pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")                    # diffusers' LoRA loader needs it

RANK, ALPHA = 4, 8.0
# every kind of linear/conv layer of diffusers' SD3Transformer2DModel, as peft's suffixes
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
           "norm1_context.linear", "norm_out.linear", "proj_out", "context_embedder", "pos_embed.proj",
           "linear_1", "linear_2"]


def _layers(module):
    return [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _peft_lora(transformer_dir, seed: int = 0) -> tuple[dict, dict]:
    """(lora_A / lora_B tensors in diffusers' names, the peft LoraConfig as a dict) on every TARGETS layer."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    transformer = diffusers.SD3Transformer2DModel.from_pretrained(str(transformer_dir))
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:                                   # peft starts B at zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return get_peft_model_state_dict(transformer), transformer.peft_config["default"].to_dict()


def _modules(state: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{diffusers module: (A, B)} of a peft state dict."""
    return {k[:-len(".lora_A.weight")]: (v, state[k.replace("lora_A", "lora_B")])
            for k, v in state.items() if k.endswith(".lora_A.weight")}


def _kohya(modules: dict, prefix: str) -> dict:
    out = {}
    for module, (down, up) in modules.items():
        key = prefix + module.replace(".", "_")
        out |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)}
    return out


def _swap(up):
    return torch.cat(up.chunk(2)[::-1])                 # diffusers' (scale, shift) rows <-> SD3's (shift, scale)


def _sd3_original(modules: dict, depth: int) -> dict:
    """The same update as sd-scripts writes SD3's (original names, lora_unet_): q, k, v fused into one qkv
    layer, whose LoRA is the three stacked (down: rank 3r; up: block-diagonal, so alpha 3 * ALPHA keeps alpha/r)."""
    top = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
           "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
           "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
           "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
           "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
    block = {"attn.to_out.0": "x_block.attn.proj", "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
             "norm1.linear": "x_block.adaLN_modulation.1", "attn.to_add_out": "context_block.attn.proj",
             "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
             "norm1_context.linear": "context_block.adaLN_modulation.1"}
    original, alphas = {}, {}
    for theirs, ours in top.items():
        down, up = modules[theirs]
        original[ours] = (down, _swap(up) if ours == "final_layer.adaLN_modulation.1" else up)
    for i in range(depth):
        for theirs, ours in block.items():
            if f"transformer_blocks.{i}.{theirs}" in modules:
                down, up = modules[f"transformer_blocks.{i}.{theirs}"]
                last_mod = theirs == "norm1_context.linear" and i == depth - 1
                original[f"joint_blocks.{i}.{ours}"] = (down, _swap(up) if last_mod else up)
        for stream, names in (("x_block", ("to_q", "to_k", "to_v")),
                              ("context_block", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            downs, ups = zip(*(modules[f"transformer_blocks.{i}.attn.{n}"] for n in names))
            original[f"joint_blocks.{i}.{stream}.attn.qkv"] = (torch.cat(downs), torch.block_diag(*ups))
            alphas[f"joint_blocks.{i}.{stream}.attn.qkv"] = 3 * ALPHA
    out = _kohya(original, "lora_unet_")
    for module, alpha in alphas.items():
        out[f"lora_unet_{module.replace('.', '_')}.alpha"] = torch.tensor(alpha)
    return out


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(folder with sd3/ (diffusers), model/ (ours), peft/pytorch_lora_weights.safetensors; the LoRA tensors)."""
    folder = tmp_path_factory.mktemp("sd3_lora")
    write_sd3_pipeline(folder)
    convert(str(folder / "sd3"), str(folder / "model"), guidance=3.0)
    state, config = _peft_lora(folder / "sd3" / "transformer")
    diffusers.StableDiffusion3Pipeline.save_lora_weights(str(folder / "peft"), transformer_lora_layers=state,
                                                         transformer_lora_adapter_metadata=config)
    return folder, state


def test_every_diffusers_and_original_sd3_layer_names_one_of_ours():
    """Over SD 3.5 medium's kinds of block (dual attention, QK norm): diffusers' layers map onto ours one to one
    but the last block's text query (no effect: None); SD3's original names reach every layer of ours; kohya's
    "_" for "." re-splits both."""
    theirs = diffusers.SD3Transformer2DModel(**{**SD3_TRANSFORMER, "num_layers": 3, "dual_attention_layers": (0, 1),
                                                "qk_norm": "rms_norm"})
    net = MMDiT(mmdit_config_from_diffusers(dict(theirs.config)))
    ours, names = set(_layers(net)), _layers(theirs)
    assert len(names) == len(ours) + 1
    for name in names:
        assert kohya_to_dotted(name.replace(".", "_")) == name
        (_, mapped, _), = mmdit_updates({name: Update(torch.zeros(1, 1), torch.zeros(6, 1), 1.0)}, net)
        if name == "transformer_blocks.2.attn.add_q_proj":
            assert mapped is None and mmdit_module(name) == "blocks.2.text.attn.q"
        else:
            assert mapped in ours, name
    original = ["x_embedder.proj", "context_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0",
                "y_embedder.mlp.2", "final_layer.linear", "final_layer.adaLN_modulation.1"]
    for i in range(3):                                  # dual attention in blocks 0, 1; block 2 is the last
        image = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1") + \
            (("attn2.qkv", "attn2.proj") if i < 2 else ())
        text = ("attn.qkv", "adaLN_modulation.1") + (("attn.proj", "mlp.fc1", "mlp.fc2") if i < 2 else ())
        original += [f"joint_blocks.{i}.x_block.{n}" for n in image]
        original += [f"joint_blocks.{i}.context_block.{n}" for n in text]
    assert all(kohya_to_dotted(n.replace(".", "_")) == n for n in original)
    lora = {n: Update(torch.zeros(1, 1), torch.zeros(6, 1), 1.0) for n in original}
    mapped = [ours_name for _, ours_name, _ in mmdit_updates(lora, net)]
    assert mapped.count(None) == 1 and sorted(m for m in mapped if m) == sorted(ours)


def test_peft_lora_draws_what_diffusers_draws(sd3, one_thread):
    """--lora FILE:0.7 (diffusers' save_lora_weights: alpha 8 in its metadata) on our SD3 folder: diffusers'
    images after load_lora_weights + fuse_lora(0.7), from our noise on our grid. Diffusers also applies the
    last block's text-query update, which we skip: it cannot reach the image."""
    folder, state = sd3
    path = folder / "peft" / "pytorch_lora_weights.safetensors"
    pipe = TextToImage.from_folder(str(folder / "model"), decoder_precision="fp32")
    assert pipe.add_lora(*parse_lora_arg(f"{path}:0.7")) == len(state) // 2 - 1
    images, _ = pipe.generate(PROMPTS, steps=3, seed=0)
    theirs = diffusers.StableDiffusion3Pipeline.from_pretrained(str(folder / "sd3"))
    theirs.set_progress_bar_config(disable=True)
    before = sd3_images(theirs, pipe, PROMPTS, 3, 4.0)
    theirs.load_lora_weights(str(path))
    theirs.fuse_lora(lora_scale=0.7)
    reference = sd3_images(theirs, pipe, PROMPTS, 3, 4.0)
    assert (reference - before).abs().max() > 0.05                  # the LoRA changes the picture
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=3e-4, rtol=0)


def test_kohya_and_original_layouts_merge_the_closed_form(sd3, tmp_path):
    """The peft file, its kohya twin (lora_transformer_<diffusers module>, alpha 8) and sd-scripts' original
    SD3 layout of the same update: every weight of ours equals diffusers' W + 0.7 * alpha / r * B @ A renamed by
    convert_mmdit (its last-block text query dropped)."""
    folder, state = sd3
    modules = _modules(state)
    depth = SD3_TRANSFORMER["num_layers"]
    save_file(_kohya(modules, "lora_transformer_"), str(tmp_path / "kohya.safetensors"))
    original = _sd3_original(modules, depth)
    assert "lora_unet_joint_blocks_1_context_block_attn_qkv.lora_down.weight" in original
    save_file(original, str(tmp_path / "original.safetensors"))

    theirs = diffusers.SD3Transformer2DModel.from_pretrained(str(folder / "sd3" / "transformer")).state_dict()
    for module, (down, up) in modules.items():
        w = theirs[f"{module}.weight"]
        theirs[f"{module}.weight"] = w + 0.7 * ALPHA / RANK * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    expected = diffusers_to_ours(theirs)
    base = TextToImage.from_folder(str(folder / "model")).unet.state_dict()
    changed = {k for k in expected if not torch.equal(expected[k], base[k])}
    assert len(changed) == len(modules) - 1                            # all but the last block's text query
    for path in (folder / "peft" / "pytorch_lora_weights.safetensors", tmp_path / "kohya.safetensors",
                 tmp_path / "original.safetensors"):
        pipe = TextToImage.from_folder(str(folder / "model"))
        assert pipe.add_lora(str(path), 0.7) == len(modules) - 1, path.name
        merged = pipe.unet.state_dict()
        assert merged.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(merged[k], expected[k], atol=1e-6, rtol=0, msg=lambda m: f"{path.name} {k}: {m}")


def test_clip_parts_merge_in_the_closed_form(sd3, tmp_path):
    """text_encoder. / text_encoder_2. (peft, alpha from the metadata) and lora_te1_ / lora_te2_ (kohya): each
    CLIP weight becomes W + scale * alpha / r * up @ down, the rest stay; T5's parts are refused."""
    folder, _ = sd3
    pipe = TextToImage.from_folder(str(folder / "model"))
    clips = {"text_encoder": pipe.text_encoder.clip_l, "text_encoder_2": pipe.text_encoder.clip_g}
    g = torch.Generator().manual_seed(1)
    updates = {}
    for part, model in clips.items():
        for name, m in model.named_modules():
            if name.endswith(("q_proj", "v_proj", "fc1")):
                updates[part, name] = (torch.randn(RANK, m.in_features, generator=g) * 0.3,
                                       torch.randn(m.out_features, RANK, generator=g) * 0.3)
    assert {part for part, _ in updates} == set(clips) and all(n.startswith("text_model.") for _, n in updates)
    peft = {f"{part}.{name}.lora_{ab}.weight": t for (part, name), pair in updates.items() for ab, t in zip("AB", pair)}
    meta = {f"{part}.{key}": value for part in clips for key, value in (("r", RANK), ("lora_alpha", ALPHA))}
    save_file(peft, str(tmp_path / "peft.safetensors"), metadata={METADATA_KEY: json.dumps(meta)})
    kohya = {}
    for prefix, part in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        kohya |= _kohya({name: pair for (p, name), pair in updates.items() if p == part}, prefix)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))

    base = {part: {k: v.clone() for k, v in model.state_dict().items()} for part, model in clips.items()}
    for path, scale in ((tmp_path / "peft.safetensors", 0.5), (tmp_path / "kohya.safetensors", 0.5)):
        pipe = TextToImage.from_folder(str(folder / "model"))
        assert pipe.add_lora(str(path), scale) == len(updates)
        for part, model in pipe.clip_models().items():
            for key, weight in model.state_dict().items():
                pair = updates.get((part, key.removesuffix(".weight")))
                expected = base[part][key] if pair is None else \
                    base[part][key] + scale * ALPHA / RANK * pair[1] @ pair[0]
                torch.testing.assert_close(weight, expected, atol=1e-6, rtol=0, msg=lambda m: f"{path.name} {key}: {m}")

    t5 = "encoder.block.0.layer.0.SelfAttention.q"
    for name, state in (("t5", {f"text_encoder_3.{t5}.lora_A.weight": torch.ones(2, 96),
                                f"text_encoder_3.{t5}.lora_B.weight": torch.ones(64, 2)}),
                        ("te3", {f"lora_te3_{t5.replace('.', '_')}.lora_down.weight": torch.ones(2, 96),
                                 f"lora_te3_{t5.replace('.', '_')}.lora_up.weight": torch.ones(64, 2)})):
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ValueError, match="LoRA weights for SD3's T5 text encoder"):
            pipe.add_lora(str(tmp_path / f"{name}.safetensors"))


def test_unknown_sd3_modules_are_refused_by_name_and_change_nothing(sd3, tmp_path):
    folder, _ = sd3
    pipe = TextToImage.from_folder(str(folder / "model"))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    q = "transformer.transformer_blocks.0.attn.to_q"
    good = {f"{q}.lora_A.weight": torch.ones(2, 32), f"{q}.lora_B.weight": torch.ones(32, 2)}
    for module, rows, message in (
            ("transformer.transformer_blocks.0.attn2.to_q", 32, "transformer_blocks.0.attn2.to_q"),  # no dual attention
            ("transformer.transformer_blocks.2.attn.to_k", 32, "transformer_blocks.2.attn.to_k"),    # 2 blocks
            ("transformer.transformer_blocks.1.ff_context.net.2", 32, "transformer_blocks.1.ff_context.net.2"),  # last
            ("transformer.single_transformer_blocks.0.attn.to_q", 32, "single_transformer_blocks.0"),  # Flux's
            ("lora_unet_joint_blocks_0_x_block_attn2_qkv", 96, "joint_blocks.0.x_block.attn2.qkv"),
            ("lora_unet_joint_blocks_0_x_block_attn_qkv", 95, "up has 95 rows, not 3 equal parts")):
        kind = ("lora_down", "lora_up") if module.startswith("lora_") else ("lora_A", "lora_B")
        down, up = (f"{module}.{k}.weight" for k in kind)
        state = good | {down: torch.ones(2, 32), up: torch.ones(rows, 2)}
        save_file(state, str(tmp_path / "bad.safetensors"))
        with pytest.raises(ValueError, match=message):
            pipe.add_lora(str(tmp_path / "bad.safetensors"))
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    save_file(good, str(tmp_path / "good.safetensors"))
    assert pipe.add_lora(str(tmp_path / "good.safetensors")) == 1


def test_merge_lora_bakes_an_sd3_lora_into_a_copy(sd3, tmp_path, one_thread, capsys):
    """python -m ldm.models.merge_lora with a transformer file and a CLIP file: the copy draws what --lora draws
    live; the source folder is untouched."""
    from ldm.models.merge_lora import main
    folder, _ = sd3
    model = folder / "model"
    clip_l = TextToImage.from_folder(str(model)).text_encoder.clip_l
    name = "text_model.encoder.layers.0.self_attn.q_proj"
    width = clip_l.get_submodule(name).in_features
    g = torch.Generator().manual_seed(2)
    save_file({f"text_encoder.{name}.lora_A.weight": torch.randn(RANK, width, generator=g),
               f"text_encoder.{name}.lora_B.weight": torch.randn(width, RANK, generator=g)},
              str(tmp_path / "clip.safetensors"))
    loras = [f"{folder / 'peft' / 'pytorch_lora_weights.safetensors'}:0.7", f"{tmp_path / 'clip.safetensors'}:0.5"]
    before = {p: p.read_bytes() for p in model.rglob("*.safetensors")}
    main([str(model), *(a for lora in loras for a in ("--lora", lora)), "--out", str(tmp_path / "baked")])
    assert "2 LoRA file(s) merged" in capsys.readouterr().out
    assert all(p.read_bytes() == data for p, data in before.items())
    live = TextToImage.from_folder(str(model), decoder_precision="fp32")
    for lora in loras:
        live.add_lora(*parse_lora_arg(lora))
    baked = TextToImage.from_folder(str(tmp_path / "baked"), decoder_precision="fp32")
    plain = TextToImage.from_folder(str(model), decoder_precision="fp32")
    images = [p.generate(PROMPTS, steps=2, seed=0)[0] for p in (live, baked, plain)]
    torch.testing.assert_close(images[1], images[0], atol=1e-5, rtol=0)
    assert (images[1] - images[2]).abs().max() > 0.1
    assert not torch.equal(baked.text_encoder.clip_l.get_submodule(name).weight, clip_l.get_submodule(name).weight)
