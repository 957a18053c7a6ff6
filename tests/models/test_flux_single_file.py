"""python -m ldm.models.from_single_file on FLUX.1 files as people download them: Black Forest Labs' transformer
alone (flux1-dev / flux1-schnell.safetensors: BFL's names at the top level) with the rest from a diffusers FLUX.1
pipeline folder (--text-encoders) or BFL's ae.safetensors (--vae), and ComfyUI's all-in-one checkpoints (the
transformer under `model.diffusion_model.`, the autoencoder under `vae.` in the CompVis names, CLIP-L and T5 under
`text_encoders.{clip_l,t5xxl}.transformer.`), in fp32, bf16 and fp8.

The files are written here from tiny random diffusers FLUX.1 pipelines (BFL's names by test_flux_original's
`_to_original`, pinned there against diffusers' own converter); our folder then draws what diffusers' FluxPipeline
draws from the same weights and noise. The transformers have FLUX.1's 128-channel heads, so their sizes are read off
the file as a released one's are."""
import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from sd_layouts import FLUX_TRANSFORMER, PROMPTS, flux_images, write_flux_pipeline

from ldm.models import from_diffusers
from ldm.models.from_single_file import check_layout, main
from ldm.pipeline import TextToImage
from tests.models.test_flux_original import _to_original
from tests.models.test_sd3_single_file import vae_original

diffusers = pytest.importorskip("diffusers")

TRANSFORMER = {**FLUX_TRANSFORMER, "num_attention_heads": 1, "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56)}
# black-forest-labs/FLUX.1-schnell's scheduler (dev's, write_flux_pipeline's, shifts by the token count)
SCHNELL_SCHEDULER = dict(shift=1.0, use_dynamic_shifting=False)
COMFY = "model.diffusion_model."


def _rounded(module, dtype):
    """`module` (a copy) holding its weights rounded to `dtype`, as a file in that dtype gives them."""
    module = copy.deepcopy(module)
    module.load_state_dict({k: v.to(dtype).float() for k, v in module.state_dict().items()})
    return module


def _save(state: dict, path) -> str:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(diffusers FluxPipelines {"dev", "schnell"}, folder): pipeline/ (dev, saved: the donor folder), schnell/
    (saved), parts/ (CLIP-L and T5 with their tokenizers, no vae/), vae.json (the tiny autoencoder's sizes only:
    the latent scale and shift come from FLUX.1's built-in config), ae.safetensors (BFL's autoencoder names)."""
    folder = tmp_path_factory.mktemp("fluxfile")
    base = write_flux_pipeline(folder)
    torch.manual_seed(1)
    theirs = {}
    for family, embeds, scheduler in (("dev", True, base.scheduler),
                                      ("schnell", False, diffusers.FlowMatchEulerDiscreteScheduler(**SCHNELL_SCHEDULER))):
        transformer = _rounded(diffusers.FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=embeds).eval(),
                               torch.bfloat16)               # bf16-exact weights: a bf16 file holds them all
        theirs[family] = diffusers.FluxPipeline(**{**base.components, "transformer": transformer,
                                                   "scheduler": scheduler})
        theirs[family].set_progress_bar_config(disable=True)
    theirs["dev"].save_pretrained(str(folder / "pipeline"))
    theirs["schnell"].save_pretrained(str(folder / "schnell"))
    vae = json.loads((folder / "pipeline" / "vae" / "config.json").read_text())
    (folder / "vae.json").write_text(json.dumps({k: v for k, v in vae.items()
                                                 if k not in ("scaling_factor", "shift_factor")}))
    _save({k.removeprefix("first_stage_model."): v for k, v in vae_original(base.vae).items()},
          folder / "ae.safetensors")
    return theirs, folder


def _check_images(theirs, model: str, steps: int, guidance_scale: float, sizes=(None,)) -> float:
    """Our folder's images against diffusers' from the same noise (within 2e-4); the largest difference."""
    pipe = TextToImage.from_folder(model, decoder_precision="fp32")
    worst = 0.0
    for size in sizes:
        images, info = pipe.generate(PROMPTS, steps=steps, seed=0, size=size)
        assert info["nfe"] == steps                                        # no CFG: guidance is the net's input
        reference = flux_images(theirs, pipe, PROMPTS, steps, guidance_scale, size=size)
        assert reference.std() > 0.05
        torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=2e-4, rtol=0)
        worst = max(worst, ((images * 0.5 + 0.5) - reference).abs().max().item())
    print(f"{model}: max |ours - diffusers| = {worst:.2e}")
    return worst


def _same_settings(model, pipeline_folder, tmp_path) -> None:
    """model_index.json and the text config equal what from_diffusers writes for the FLUX.1 pipeline folder."""
    from_diffusers.convert(str(pipeline_folder), str(tmp_path / "from-diffusers"))
    for name in ("model_index.json", "text_encoder/config.json"):
        assert json.loads((model / name).read_text()) == json.loads((tmp_path / "from-diffusers" / name).read_text())


# ----------------------------------------------------------------------------- BFL's transformer alone

def test_dev_transformer_with_the_pipelines_text_encoders(flux, tmp_path, one_thread, capsys):
    """flux1-dev.safetensors (fp32, BFL's names, no prefix) + --text-encoders a FLUX.1-dev pipeline folder: CLIP-L,
    T5 and the autoencoder copied; dev's shift by token count, w = 2.5 as the net's input; square and 48x32."""
    theirs, folder = flux
    file = _save(_to_original(theirs["dev"].transformer.state_dict()), tmp_path / "flux1-dev.safetensors")
    main([file, "--out", str(tmp_path / "model"), "--text-encoders", str(folder / "pipeline")])
    assert "resolution-dependent shift), prediction flow, w = 2.5" in capsys.readouterr().out
    _same_settings(tmp_path / "model", folder / "pipeline", tmp_path)
    _check_images(theirs["dev"], str(tmp_path / "model"), 4, 3.5, sizes=(None, (48, 32)))


def test_schnell_bf16_transformer_with_ae_file(flux, tmp_path, one_thread, capsys):
    """flux1-schnell.safetensors in bf16 + --vae ae.safetensors (BFL's autoencoder names; wins over the donor's
    vae/) + the dev pipeline's text encoders: schnell's fixed shift 1, w = 0; sampled through the txt2img CLI."""
    theirs, folder = flux
    state = {k: v.bfloat16() for k, v in _to_original(theirs["schnell"].transformer.state_dict()).items()}
    file = _save(state, tmp_path / "flux1-schnell.safetensors")
    model = tmp_path / "model"
    main([file, "--out", str(model), "--text-encoders", str(folder / "pipeline"), "--vae", str(folder / "ae.safetensors"),
          "--vae-config", str(folder / "vae.json")])
    assert "rectified flow (shift 1), prediction flow, w = 0; try: " in capsys.readouterr().out
    _same_settings(model, folder / "schnell", tmp_path)
    _check_images(theirs["schnell"], str(model), 2, 0.0)
    from ldm import txt2img
    txt2img.main(["a cat", "--model", str(model), "--steps", "2", "--out", str(tmp_path / "cat.png")])
    assert (tmp_path / "cat.png").stat().st_size > 0


# ----------------------------------------------------------------------------- ComfyUI's all-in-one

def comfy_file(pipe, path) -> str:
    """What ComfyUI saves for FLUX.1 (flux1-dev-fp8.safetensors style): the transformer and T5 in float8_e4m3fn, the
    q/k norm gains as `.weight` (newer ComfyUI), the autoencoder and CLIP-L (transformers 4's names, with the
    projection and logit scale FLUX.1 does not read, and the position ids) in fp32."""
    fp8 = torch.float8_e4m3fn
    state = {COMFY + k.replace("_norm.scale", "_norm.weight"): v.to(fp8)
             for k, v in _to_original(pipe.transformer.state_dict()).items()}
    state |= {"vae." + k.removeprefix("first_stage_model."): v for k, v in vae_original(pipe.vae).items()}
    clip = "text_encoders.clip_l.transformer."
    state |= {f"{clip}text_model.{k}": v for k, v in pipe.text_encoder.state_dict().items()}
    state |= {clip + "text_projection.weight": torch.randn(32, 32), clip + "logit_scale": torch.tensor(4.6),
              clip + "text_model.embeddings.position_ids": torch.arange(77)[None]}
    state |= {f"text_encoders.t5xxl.transformer.{k}": v.to(fp8) for k, v in pipe.text_encoder_2.state_dict().items()
              if k != "encoder.embed_tokens.weight"}                                       # tied to shared
    return _save(state, path)


def test_comfyui_all_in_one_fp8(flux, tmp_path, one_thread):
    """Everything from the file, T5's tokenizer given; fp8 tensors cast on load (the transformer to fp32, T5 to
    bf16), so our images are diffusers' from the fp8-rounded weights. T5's relative positions reach T5's default
    128 (the file does not say), the autoencoder's scale and shift are FLUX.1's built-in ones."""
    from transformers import T5Config, T5EncoderModel
    theirs, folder = flux
    t5 = theirs["dev"].text_encoder_2
    t5 = T5EncoderModel(T5Config(**{**t5.config.to_dict(), "relative_attention_max_distance": 128}))
    t5.load_state_dict(theirs["dev"].text_encoder_2.state_dict())
    rounded = diffusers.FluxPipeline(**{**theirs["dev"].components,
                                        "transformer": _rounded(theirs["dev"].transformer, torch.float8_e4m3fn),
                                        "text_encoder_2": _rounded(t5.eval(), torch.float8_e4m3fn)})
    rounded.set_progress_bar_config(disable=True)
    file = comfy_file(rounded, tmp_path / "flux1-dev-fp8.safetensors")
    main([file, "--out", str(tmp_path / "model"), "--t5-tokenizer", str(folder / "parts" / "tokenizer_2"),
          "--vae-config", str(folder / "vae.json"),
          "--text-config", str(folder / "pipeline" / "text_encoder" / "config.json")])
    assert not (tmp_path / "model" / "text_encoder" / "clip" / "text_encoder" / "text_projection.weight").exists()
    _check_images(rounded, str(tmp_path / "model"), 3, 3.5)


# ----------------------------------------------------------------------------- refusals

def test_layout_is_told_by_bfls_double_blocks():
    for prefix in ("", COMFY, "diffusion_model."):
        assert check_layout({prefix + "double_blocks.0.img_attn.qkv.weight": None}, "f") == "flux"
    assert check_layout({COMFY + "joint_blocks.0.x": None, "first_stage_model.x": None}, "sd3") == "sd3"


def test_refusals_name_the_problem(flux, tmp_path, capsys):
    theirs, folder = flux
    bfl = _to_original(theirs["dev"].transformer.state_dict())
    bare = _save(bfl, tmp_path / "flux1-dev.safetensors")
    wide = lambda n: {**bfl, "img_in.weight": torch.zeros(128, n)}                  # noqa: E731
    files = {name: _save(state, tmp_path / f"{name}.safetensors") for name, state in (
        ("odd", wide(200)),
        ("flux2", {**bfl, "single_stream_modulation.lin.weight": torch.zeros(1)}),
        ("scaled", {**bfl, "img_in.scale_weight": torch.ones(()), "scaled_fp8": torch.zeros(1)}),
        ("sd1", {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(1), "first_stage_model.x": torch.ones(1),
                 "cond_stage_model.transformer.x": torch.ones(1)}),
        ("t5-only", {**{COMFY + k: v for k, v in bfl.items()},
                     "text_encoders.t5xxl.transformer.shared.weight": torch.zeros(1)}))}
    pipeline, parts = str(folder / "pipeline"), str(folder / "parts")
    for args, message in (
            ([files["odd"], "--text-encoders", pipeline], "taking 50 latent channels (200 packed) is none of FLUX.1 (16), "
                                                          "Depth / Canny (32) or Fill (36)"),
            ([files["flux2"]], "a FLUX.2 transformer"),
            ([files["scaled"]], "scaled fp8"),
            ([bare], "without its text encoders (no ['text_encoders.clip_l.transformer.', 'text_encoders.t5xxl"),
            ([bare, "--text-encoders", parts], "without its autoencoder"),
            ([bare, "--text-encoders", str(folder / "schnell" / "vae")], "lacks ['text_encoder', 'tokenizer'"),
            ([bare, "--text-encoders", pipeline, "--prediction", "v"], "FLUX.1 predicts the flow velocity"),
            ([bare, "--text-encoders", pipeline, "--t5-tokenizer", parts], "holds no T5"),
            ([bare, "--text-encoders", pipeline, "--text-config", str(folder / "vae.json")],
             "CLIP-L comes from"),
            ([files["t5-only"]], "without its text encoders (no ['text_encoders.clip_l.transformer.'] weights)"),
            ([files["t5-only"], "--text-encoders", parts], "T5-XXL: the weights lack ['encoder.block.0."),
            ([files["sd1"], "--vae", str(folder / "ae.safetensors")], "--vae is for FLUX.1 files")):
        with pytest.raises(SystemExit):
            main([*args, "--out", str(tmp_path / "model")])
        assert message in capsys.readouterr().err, args
        assert not (tmp_path / "model").exists()
