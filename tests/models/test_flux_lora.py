"""FLUX.1 LoRA (ldm.models.lora + lora_flux): one random update of diffusers' FluxTransformer2DModel and CLIP-L,
written in each layout people share (diffusers/peft, kohya in BFL's and in diffusers' names, BFL/ComfyUI,
XLabs), merged with --lora FILE:0.7 into our imported -dev and -schnell folders, gives diffusers' weights and
images with the same LoRA fused (load_lora_weights + fuse_lora(0.7), through peft): from the peft file, or from
the file itself where diffusers reads it whole at this tiny size. The T5's parts, weight diffs, norm gains and
other models' files are refused by name; merge_lora bakes it into a copy of the folder."""
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ldm.models.convert_flux import diffusers_to_ours
from ldm.models.from_diffusers import convert
from ldm.models.lora import Update, kohya_to_dotted, merge_lora, parse_lora_arg, read_lora
from ldm.models.lora_flux import flux_updates
from ldm.pipeline import TextToImage
from sd_layouts import FLUX_TRANSFORMER, PROMPTS, flux_images, write_flux_pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")                    # diffusers' LoRA loader needs it

RANK, ALPHA, SCALE, STEPS = 4, 8.0, 0.7, 2
# every kind of linear layer of diffusers' FluxTransformer2DModel, as peft's suffixes
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
           "norm1_context.linear", "norm.linear", "proj_mlp", "proj_out", "norm_out.linear", "x_embedder",
           "context_embedder", "linear_1", "linear_2"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# FLUX.1's original (BFL) modules, written out here from BFL's model code: each is the diffusers module(s) stacked
# by rows in this order; final_layer.adaLN_modulation.1 holds (shift, scale) where diffusers holds (scale, shift).
BFL_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
           "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
           "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
           "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
           "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
           "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
BFL_DOUBLE = {"img_mod.lin": ["norm1.linear"], "txt_mod.lin": ["norm1_context.linear"],
              "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"], "img_attn.proj": ["attn.to_out.0"],
              "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
              "txt_attn.proj": ["attn.to_add_out"], "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"],
              "txt_mlp.0": ["ff_context.net.0.proj"], "txt_mlp.2": ["ff_context.net.2"]}
BFL_SINGLE = {"modulation.lin": ["norm.linear"], "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
              "linear2": ["proj_out"]}
DEPTH = (FLUX_TRANSFORMER["num_layers"], FLUX_TRANSFORMER["num_single_layers"])


def _linears(module):
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def _swap(up):
    return torch.cat(up.chunk(2)[::-1])


def _peft_lora(folder, seed: int = 0) -> tuple[dict, dict, dict, dict]:
    """(transformer lora_A / lora_B tensors in diffusers' names, its LoraConfig dict, the same for CLIP-L): peft
    on every TARGETS layer, B random (peft starts it at 0), and one A shared by the parts of each fused BFL module
    (a double block's q, k, v; a single block's q, k, v, MLP input), so that the update has a BFL layout too."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel
    transformer = diffusers.FluxTransformer2DModel.from_pretrained(str(folder / "flux" / "transformer"))
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    clip_config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=CLIP_TARGETS)
    clip = inject_adapter_in_model(clip_config, CLIPTextModel.from_pretrained(str(folder / "flux" / "text_encoder")))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (transformer, clip):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        fused = [(f"transformer_blocks.{i}", parts) for i in range(DEPTH[0])
                 for parts in (BFL_DOUBLE["img_attn.qkv"], BFL_DOUBLE["txt_attn.qkv"])]
        fused += [(f"single_transformer_blocks.{i}", BFL_SINGLE["linear1"]) for i in range(DEPTH[1])]
        for block, parts in fused:
            first = transformer.get_submodule(f"{block}.{parts[0]}").lora_A["default"].weight
            for part in parts[1:]:
                transformer.get_submodule(f"{block}.{part}").lora_A["default"].weight.copy_(first)
    return (get_peft_model_state_dict(transformer), transformer.peft_config["default"].to_dict(),
            get_peft_model_state_dict(clip), clip_config.to_dict())


def _modules(state: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} of a peft state dict."""
    return {k[:-len(".lora_A.weight")]: (v, state[k.replace("lora_A", "lora_B")])
            for k, v in state.items() if k.endswith(".lora_A.weight")}


def _stack(modules: dict, parts: list[str], swap: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One BFL module's (down, up) from its diffusers parts: their shared A, their B's rows stacked."""
    down = modules[parts[0]][0]
    assert all(torch.equal(modules[p][0], down) for p in parts)
    up = torch.cat([modules[p][1] for p in parts])
    return down, _swap(up) if swap else up


def _bfl(modules: dict, top: bool = True, linear1: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{BFL module: (down, up)} of the update; without the top-level modules / the single blocks' linear1 (the
    parts diffusers' kohya reader drops or cannot split at this width) if asked."""
    out = {}
    for bfl, theirs in BFL_TOP.items() if top else ():
        if theirs in modules:                                                   # schnell: no guidance_in
            out[bfl] = _stack(modules, [theirs], swap=bfl == "final_layer.adaLN_modulation.1")
    for kind, table, depth, theirs in (("double_blocks", BFL_DOUBLE, DEPTH[0], "transformer_blocks"),
                                       ("single_blocks", BFL_SINGLE, DEPTH[1], "single_transformer_blocks")):
        for i in range(depth):
            for bfl, parts in table.items():
                if linear1 or bfl != "linear1":
                    out[f"{kind}.{i}.{bfl}"] = _stack(modules, [f"{theirs}.{i}.{p}" for p in parts])
    return out


def _kohya(pairs: dict, prefix: str, dotted: bool = False) -> dict:
    """lora_down / lora_up / alpha under `prefix` + module (`_` for `.` unless dotted)."""
    out = {}
    for module, (down, up) in pairs.items():
        key = prefix + (module if dotted else module.replace(".", "_"))
        out |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)}
    return out


def _peft_named(pairs: dict, prefix: str) -> dict:
    """lora_A / lora_B under `prefix` + module, no alpha anywhere: alpha / r folded into B."""
    return {k: v for module, (down, up) in pairs.items()
            for k, v in ((f"{prefix}{module}.lora_A.weight", down), (f"{prefix}{module}.lora_B.weight", up * ALPHA / RANK))}


def _xlabs(modules: dict) -> dict:
    """XLabs' attention-only layout of the same update's attention parts (1: image stream, 2: text; no alpha)."""
    bfl = _bfl(modules, top=False)
    pairs = {}
    for i in range(DEPTH[0]):
        for lora, name in (("qkv_lora1", "img_attn.qkv"), ("proj_lora1", "img_attn.proj"),
                           ("qkv_lora2", "txt_attn.qkv"), ("proj_lora2", "txt_attn.proj")):
            pairs[f"double_blocks.{i}.processor.{lora}"] = bfl[f"double_blocks.{i}.{name}"]
    for i in range(DEPTH[1]):
        down, up = bfl[f"single_blocks.{i}.linear1"]
        pairs[f"single_blocks.{i}.processor.qkv_lora"] = (down, up[:3 * up.shape[0] // 7])   # q, k, v rows only
        pairs[f"single_blocks.{i}.processor.proj_lora"] = bfl[f"single_blocks.{i}.linear2"]
    return {f"{module}.{ud}.weight": t for module, (down, up) in pairs.items()
            for ud, t in (("down", down), ("up", up * ALPHA / RANK))}


# layout -> the file diffusers reads for the reference: "peft" (the whole update) or the layout's own file
LAYOUTS = {"peft": "peft", "kohya": "peft", "kohya-diffusers-names": "peft", "bfl": "peft", "comfyui": "peft",
           "kohya-blocks": "kohya-blocks", "xlabs": "xlabs"}


def _write_layouts(folder, state: dict, clip_state: dict) -> None:
    modules, clip = _modules(state), _modules(clip_state)
    files = {
        "kohya": _kohya(_bfl(modules), "lora_unet_") | _kohya(clip, "lora_te1_"),
        "kohya-diffusers-names": _kohya(modules, "lora_transformer_") | _kohya(clip, "lora_te_"),
        "bfl": _peft_named(_bfl(modules), "diffusion_model.") | _peft_named(clip, "text_encoder."),
        "comfyui": _kohya(_bfl(modules), "diffusion_model.", dotted=True) |
        _kohya(clip, "text_encoders.clip_l.transformer.", dotted=True),
        "kohya-blocks": _kohya(_bfl(modules, top=False, linear1=False), "lora_unet_") | _kohya(clip, "lora_te1_"),
        "xlabs": _xlabs(modules)}
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in files["kohya"]
    assert "diffusion_model.single_blocks.1.linear1.lora_A.weight" in files["bfl"]
    assert "double_blocks.0.processor.qkv_lora2.down.weight" in files["xlabs"]
    for name, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"{name}.safetensors"))


class Flux:
    """One variant's folder (flux/: diffusers', model/: ours, one LoRA file per layout) and diffusers' fused
    references, each computed once."""

    def __init__(self, folder, guidance: float):
        self.folder, self.guidance, self._references = folder, guidance, {}
        self.ours = lambda: TextToImage.from_folder(str(folder / "model"), decoder_precision="fp32")
        self.plain = self.ours().generate(PROMPTS, steps=STEPS, seed=0)[0] * 0.5 + 0.5

    def reference(self, name: str) -> tuple[dict, dict, torch.Tensor]:
        """diffusers' FluxPipeline with the file `name` fused at SCALE: (its transformer's weights in our names,
        CLIP-L's, its images from our noise)."""
        if name not in self._references:
            theirs = diffusers.FluxPipeline.from_pretrained(str(self.folder / "flux"))
            theirs.set_progress_bar_config(disable=True)
            theirs.load_lora_weights(str(self.folder / f"{name}.safetensors"))
            theirs.fuse_lora(components=["transformer", "text_encoder"], lora_scale=SCALE)  # Flux's default: transformer
            theirs.unload_lora_weights()                                                    # the fused weights stay
            images = flux_images(theirs, self.ours(), PROMPTS, STEPS, self.guidance)
            assert (images - self.plain).abs().max() > 0.02                                 # the LoRA shows
            self._references[name] = (diffusers_to_ours(theirs.transformer.state_dict()),
                                      theirs.text_encoder.state_dict(), images)
        return self._references[name]


@pytest.fixture(scope="module", params=["dev", "schnell"])
def flux(request, tmp_path_factory, one_thread_module) -> Flux:
    dev = request.param == "dev"
    folder = tmp_path_factory.mktemp(f"flux_lora_{request.param}")
    write_flux_pipeline(folder, guidance_embeds=dev, dynamic=dev)
    convert(str(folder / "flux"), str(folder / "model"))
    state, config, clip_state, clip_config = _peft_lora(folder)
    diffusers.FluxPipeline.save_lora_weights(str(folder / "peft"), transformer_lora_layers=state,
                                             text_encoder_lora_layers=clip_state,
                                             transformer_lora_adapter_metadata=config,
                                             text_encoder_lora_adapter_metadata=clip_config)
    (folder / "peft" / "pytorch_lora_weights.safetensors").rename(folder / "peft.safetensors")
    _write_layouts(folder, state, clip_state)
    return Flux(folder, 3.5 if dev else 0.0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_layout_merges_what_diffusers_fuses(flux, layout):
    """--lora FILE:0.7 on our folder: every transformer and CLIP-L weight as diffusers' after fuse_lora(0.7), and
    the same images from the same noise."""
    pipe = flux.ours()
    models = {"transformer": pipe.unet, "clip": pipe.text_encoder.clip_l}
    plain = {part: {k: v.clone() for k, v in m.state_dict().items()} for part, m in models.items()}
    changed = pipe.add_lora(*parse_lora_arg(f"{flux.folder / layout}.safetensors:{SCALE}"))
    weights, clip, reference = flux.reference(LAYOUTS[layout])
    moved = 0
    for part, expected in (("transformer", weights), ("clip", clip)):
        ours = models[part].state_dict()
        assert ours.keys() == expected.keys()
        moved += sum(not torch.equal(ours[k], plain[part][k]) for k in ours)
        for key, value in expected.items():
            torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=0, msg=lambda m: f"{layout} {key}: {m}")
    assert moved == changed                                         # one weight per layer, no bias
    images, _ = pipe.generate(PROMPTS, steps=STEPS, seed=0)
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_every_diffusers_and_bfl_layer_names_one_of_ours(guidance):
    """diffusers' linear layers map onto ours one to one, and so do the parts of FLUX.1's original modules; kohya's
    "_" for "." re-splits both; XLabs' processors land on the stream they name."""
    from ldm.models.convert_flux import flux_config_from_diffusers
    from ldm.models.flux import Flux
    theirs = diffusers.FluxTransformer2DModel(**{**FLUX_TRANSFORMER, "num_layers": 2}, guidance_embeds=guidance)
    ours = sorted(_linears(Flux(flux_config_from_diffusers(dict(theirs.config)))))
    bfl = [n for n in BFL_TOP if guidance or not n.startswith("guidance_in")]
    bfl += [f"double_blocks.{i}.{n}" for i in range(2) for n in BFL_DOUBLE]
    bfl += [f"single_blocks.{i}.{n}" for i in range(DEPTH[1]) for n in BFL_SINGLE]
    for names in (_linears(theirs), bfl):
        assert all(kohya_to_dotted(n.replace(".", "_")) == n for n in names)
        lora = {n: Update(torch.zeros(1, 1), torch.zeros(42, 1), 1.0) for n in names}   # 42 rows: any split
        assert sorted(mapped for _, mapped, _ in flux_updates(lora)) == ours
    xlabs = {"double_blocks.1.processor.qkv_lora1": ["image.attn.q", "image.attn.k", "image.attn.v"],
             "double_blocks.1.processor.qkv_lora2": ["text.attn.q", "text.attn.k", "text.attn.v"],
             "double_blocks.1.processor.proj_lora1": ["image.attn.out"],
             "double_blocks.1.processor.proj_lora2": ["text.attn.out"],
             "single_blocks.1.processor.qkv_lora": ["q", "k", "v"], "single_blocks.1.processor.proj_lora": ["out"]}
    for name, expected in xlabs.items():
        mapped = [m for _, m, _ in flux_updates({name: Update(torch.zeros(1, 1), torch.zeros(42, 1), 1.0)})]
        assert mapped == [f"{name.split('.processor')[0]}.{e}" for e in expected]


def _lora_file(path, modules: dict[str, tuple[int, int]]) -> str:
    """A LoRA file of ones: {key stem: (out rows, in columns)}, kohya's ends for lora_* stems, else peft's."""
    state = {}
    for stem, (rows, cols) in modules.items():
        down, up = ("lora_down", "lora_up") if stem.startswith("lora_") else ("lora_A", "lora_B")
        state |= {f"{stem}.{down}.weight": torch.ones(2, cols), f"{stem}.{up}.weight": torch.ones(rows, 2)}
    save_file(state, str(path))
    return str(path)


def test_what_is_not_read_is_refused_by_name_and_changes_nothing(flux, tmp_path):
    """FLUX.1's T5 in each naming, weight / bias diffs, norm gains, SD3's modules, other widths, blocks this model
    lacks and malformed fused rows: each refused with its name, the model untouched; a Flux file is refused by SD3's
    MMDiT the same way."""
    pipe = flux.ours()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    good = {"lora_unet_double_blocks_0_img_attn_qkv": (96, 32)}
    t5 = "encoder.block.0.layer.0.SelfAttention.q"
    cases = [({f"text_encoder_2.{t5}": (64, 96)}, "FLUX.1's T5 text encoder"),
             ({f"lora_te2_{t5.replace('.', '_')}": (64, 96)}, "FLUX.1's T5 text encoder"),
             ({f"lora_te3_{t5.replace('.', '_')}": (64, 96)}, "T5 text encoder or FLUX.1's"),        # sd-scripts'
             ({f"text_encoders.t5xxl.transformer.{t5}": (64, 96)}, "T5 text encoder or FLUX.1's"),  # ComfyUI's
             ({"lora_unet_joint_blocks_0_x_block_attn_qkv": (96, 32)},                              # SD3's original
              r"joint_blocks.0.x_block.attn.qkv.*is the LoRA for this base model\?"),
             ({"transformer.pos_embed.proj": (32, 64)}, "pos_embed.proj"),                           # SD3's diffusers
             ({"transformer.transformer_blocks.0.attn.to_q": (24, 24)},                             # another width
              r"do not fit a weight of shape \(32, 32\) \(is the LoRA for this base model\?\)"),
             ({"lora_unet_double_blocks_1_img_attn_qkv": (96, 32)}, "double_blocks.1.img_attn.qkv"),  # one block
             ({"lora_unet_single_blocks_0_linear1": (96, 32)}, "96 rows are not q, k, v and a 4x MLP input"),
             ({"lora_unet_final_layer_adaLN_modulation_1": (63, 32)}, "not \\(shift, scale\\) halves")]
    if flux.guidance == 0:                                                     # schnell: no guidance input
        cases.append(({"lora_unet_guidance_in_in_layer": (32, 256)}, "guidance_in.in_layer"))
    for i, (modules, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            pipe.add_lora(_lora_file(tmp_path / f"bad{i}.safetensors", good | modules))
    qkv = "double_blocks.0.img_attn.qkv"
    for i, (key, message) in enumerate(((f"diffusion_model.{qkv}.diff", "whole-weight differences"),
                                        (f"lora_unet_{qkv.replace('.', '_')}.diff_b", "bias differences"),
                                        ("double_blocks.0.img_attn.norm.query_norm.scale", "norm gains"),
                                        (f"diffusion_model.{qkv}.lora_B.bias", "biases \\(.bias\\)"))):
        path = _lora_file(tmp_path / f"extra{i}.safetensors", good)
        save_file(load_file(path) | {key: torch.ones(96)}, path)
        with pytest.raises(ValueError, match=message):
            pipe.add_lora(path)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    assert pipe.add_lora(_lora_file(tmp_path / "good.safetensors", good)) == 3         # q, k, v

    from ldm.models.convert_mmdit import mmdit_config_from_diffusers
    from ldm.models.mmdit import MMDiT
    from sd_layouts import SD3_TRANSFORMER
    sd3 = MMDiT(mmdit_config_from_diffusers(SD3_TRANSFORMER))
    for layout in ("kohya", "peft"):
        with pytest.raises(ValueError, match=r"is the LoRA for this base model\?"):
            merge_lora(read_lora(str(flux.folder / f"{layout}.safetensors")), [sd3], {})


def test_merge_lora_bakes_a_flux_lora_into_a_copy(flux, tmp_path, capsys):
    """python -m ldm.models.merge_lora with the kohya file (transformer + CLIP-L): the copy draws what --lora draws
    live, CLIP-L's weights baked too; the source folder is untouched."""
    from ldm.models.merge_lora import main
    model, lora = flux.folder / "model", f"{flux.folder / 'kohya.safetensors'}:{SCALE}"
    before = {p: p.read_bytes() for p in model.rglob("*.safetensors")}
    main([str(model), "--lora", lora, "--out", str(tmp_path / "baked")])
    assert "1 LoRA file(s) merged" in capsys.readouterr().out
    assert all(p.read_bytes() == data for p, data in before.items())
    live, baked = flux.ours(), TextToImage.from_folder(str(tmp_path / "baked"), decoder_precision="fp32")
    live.add_lora(*parse_lora_arg(lora))
    for part in ("unet", "text_encoder"):
        theirs, ours = getattr(baked, part).state_dict(), getattr(live, part).state_dict()
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours), part
    images = [p.generate(PROMPTS, steps=STEPS, seed=0)[0] * 0.5 + 0.5 for p in (live, baked)]
    torch.testing.assert_close(images[1], images[0], atol=1e-6, rtol=0)
    assert (images[1] - flux.plain).abs().max() > 0.02
