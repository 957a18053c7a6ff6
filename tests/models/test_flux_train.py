"""Stage 2 (stages/train_latent.py, net=flux) fine-tunes an imported tiny FLUX.1-dev folder as diffusers'
train_dreambooth_lora_flux.py does: the Flux net gets T5's tokens, CLIP-L's pooled text and a constant guidance
scale (flux_guidance; -dev is guidance-distilled), rectified flow with flow prediction, training times moved by the
folder's resolution-dependent shift (time_shift: dynamic); a LoRA on both streams' attention and the single blocks'
q, k, v starts as the base model, trains alone, resumes, and its file in diffusers' FLUX.1 layout draws, through
diffusers' load_lora_weights, what the written model folder draws. Full fine-tuning writes a folder that exports
back to a FluxPipeline drawing its images."""
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from sd_layouts import flux_images, write_flux_pipeline
from stage_scripts import imported_model_config, load_stage, lora_run_outputs

from ldm.diffusion.schedules import resolution_shift
from ldm.models.flux import Flux
from ldm.models.from_diffusers import convert
from ldm.models.lora import METADATA_KEY, LoRALinear
from ldm.pipeline import TextToImage, load_index
from ldm.training.config import load_config

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")                    # diffusers' LoRA loader needs it

stage = load_stage("train_latent")
PROMPTS = ["a red circle", "a blue square at the bottom"]    # shapes-world captions (the folder says data: shapes)
GUIDANCE = 4.0                                               # flux_guidance: not the 3.5 default, not 1 + w = 3.5
DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",         # diffusers' names of the trained layers
          "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v")


def _flux_stage_two_config(model: Path, out: Path, **sections) -> Path:
    """A stage-2 config that fine-tunes the imported tiny FLUX.1-dev folder: its Flux config, its frozen CLIP-L and
    T5, its rectified flow and dynamic shift (training times moved alike), a rank-4 LoRA, shapes at 32 px."""
    index = load_index(str(model))
    diffusion = {"schedule": "rectified_flow", "schedule_options": {"shift": index.schedule["shift"]},
                 "prediction": "flow", "time": "logit_normal", "time_scale": 1000.0, "time_shift": "dynamic",
                 "dynamic_shift": index.dynamic_shift}
    return imported_model_config(model, out, "flux", diffusion, **{
        "p_uncond": 0.0, "guidance": index.guidance, "flux_guidance": GUIDANCE,
        "val": {"prompts": ["a red circle"], "guidance": [2.5], "steps": 2, "seed": 0}, **sections})


@pytest.fixture(scope="module")
def flux_model(tmp_path_factory):
    """(the diffusers FLUX.1-dev pipeline folder, our model folder imported from it)."""
    folder = tmp_path_factory.mktemp("flux_train")
    write_flux_pipeline(folder)
    convert(str(folder / "flux"), str(folder / "model"))
    return folder / "flux", folder / "model"


def _recording(monkeypatch) -> tuple[list, list]:
    """(the (loss, training-time shift) of every DiffusionLoss call, the guidance of every Flux call with gradients
    on, i.e. in training)."""
    losses, guidance = [], []

    class Recording(stage.DiffusionLoss):
        def __call__(self, *args, **kwargs):
            loss = super().__call__(*args, **kwargs)
            losses.append((loss.item(), self.time_shift))
            return loss
    monkeypatch.setattr(stage, "DiffusionLoss", Recording)
    forward = Flux.forward

    def recorded(self, *args, **kwargs):
        if torch.is_grad_enabled():
            guidance.append(kwargs.get("guidance"))
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(Flux, "forward", recorded)
    return losses, guidance


def test_latent_model_feeds_flux_its_text_and_guidance_and_a_fresh_lora_changes_nothing(flux_model, tmp_path):
    """The stage's forward is the pipeline's -dev model at guidance scale flux_guidance: T5's tokens, CLIP-L's pooled
    text, no mask, the scale as an input (another scale gives another output). A fresh LoRA (B = 0) leaves that
    output exactly as it was and makes only its own A and B trainable, on the layers diffusers' script targets."""
    _, model = flux_model
    cfg = load_config(stage.LatentStageConfig, _flux_stage_two_config(model, tmp_path / "run"))
    assert cfg.guidance_input == GUIDANCE
    pipe = TextToImage.from_folder(str(model))
    net = stage.LatentModel(pipe.unet, pipe.text_encoder, train_text=False, guidance=cfg.guidance_input)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 16, 16, generator=g), torch.tensor([300.0, 800.0])
    prompts = ["", "a red circle"]
    with torch.no_grad():
        ours = net(x, t, prompts)
        torch.testing.assert_close(ours, pipe.unet(x, t, **pipe.encode_prompts(prompts), guidance=GUIDANCE),
                                   atol=0, rtol=0)
        assert (ours - pipe.unet(x, t, **pipe.encode_prompts(prompts), guidance=1.0)).abs().max() > 1e-3
        with pytest.raises(ValueError, match="needs `guidance`"):                 # -dev cannot run without it
            stage.LatentModel(pipe.unet, pipe.text_encoder, train_text=False)(x, t, prompts)
        stage.add_lora_updates(net, cfg)
        torch.testing.assert_close(net(x, t, prompts), ours, atol=0, rtol=0)
    wrapped = {n for n, m in net.unet.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {f"double_blocks.0.{s}.attn.{p}" for s in ("image", "text") for p in ("q", "k", "v", "out")} | \
        {f"single_blocks.{i}.{p}" for i in range(2) for p in ("q", "k", "v")}
    assert {n for n, p in net.named_parameters() if p.requires_grad} == \
        {f"unet.{m}.lora_{ab}" for m in wrapped for ab in "AB"}


def test_stage_two_trains_a_flux_lora_that_diffusers_loads(flux_model, tmp_path, one_thread, monkeypatch):
    theirs_dir, model = flux_model
    losses, guidance = _recording(monkeypatch)
    config = _flux_stage_two_config(model, tmp_path / "run")
    stage.main(["--config", str(config), "train.max_steps=2"])
    out = stage.main(["--config", str(config), "--resume", "latest"])    # continues at step 2: one more update
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor([loss for loss, _ in losses]))), losses
    shift = resolution_shift(64, **load_index(str(model)).dynamic_shift)   # 32 px: 16x16 latents, 8x8 tokens
    assert all(s == pytest.approx(shift) for _, s in losses) and shift != pytest.approx(1.0, abs=0.1)
    assert len(guidance) == 3 and all(g == GUIDANCE for g in guidance)      # fed in training, every step
    # The LoRA file: diffusers' FLUX.1 names, both streams' attention and the single blocks' q, k, v.
    lora, tensors, modules = lora_run_outputs(tmp_path / "run")
    assert modules == {f"transformer.transformer_blocks.0.{n}" for n in DOUBLE} | \
        {f"transformer.single_transformer_blocks.{i}.{n}" for i in range(2) for n in SINGLE}
    with safe_open(str(lora), "pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    assert meta == {"transformer.r": 4, "transformer.lora_alpha": 4,
                    "transformer.target_modules": sorted(m.removeprefix("transformer.") for m in modules)}
    assert len(tensors) == 2 * len(modules)
    assert tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (4, 32)

    # Only the LoRA'd weights moved; the model folder holds them merged and keeps FLUX.1-dev's sampling.
    base, tuned = (load_file(str(f / "unet" / "model.safetensors")) for f in (model, out))
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert base.keys() == tuned.keys() and len(changed) == len(modules)
    assert all(k.endswith((".q.weight", ".k.weight", ".v.weight", "attn.out.weight")) for k in changed), changed
    index, source_index = load_index(str(out)), load_index(str(model))
    assert (index.guidance_embed, index.guidance, index.prediction) == (True, 2.5, "flow")
    assert {k: float(v) for k, v in index.dynamic_shift.items()} == source_index.dynamic_shift

    # The folder draws what diffusers' FluxPipeline draws with the file loaded (peft's LoRA layers), at 3.5.
    pipe = TextToImage.from_folder(str(out), decoder_precision="fp32")
    images, _ = pipe.generate(PROMPTS, steps=3, seed=0)
    source = TextToImage.from_folder(str(model), decoder_precision="fp32")
    before, _ = source.generate(PROMPTS, steps=3, seed=0)
    assert source.add_lora(str(lora)) == len(modules)                     # our --lora reads the file back
    live, _ = source.generate(PROMPTS, steps=3, seed=0)
    torch.testing.assert_close(live, images, atol=1e-5, rtol=0)
    theirs = diffusers.FluxPipeline.from_pretrained(str(theirs_dir))
    theirs.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # peft finds every module the file names, and only those
        theirs.load_lora_weights(str(lora))
    reference = flux_images(theirs, pipe, PROMPTS, 3, 3.5)
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=1e-5, rtol=0)
    assert (images - before).abs().max() > 1e-2                             # the LoRA changed the picture


def test_stage_two_fine_tunes_a_whole_flux_and_the_folder_exports(flux_model, tmp_path, one_thread, monkeypatch):
    """lora.rank=0: every weight of the net trains (the text encoders stay frozen), at the guidance input; the
    folder it writes exports to a FluxPipeline that draws its images."""
    from ldm.models.to_diffusers import export
    _, model = flux_model
    losses, guidance = _recording(monkeypatch)
    config = _flux_stage_two_config(model, tmp_path / "run", lora={"rank": 0})
    out = stage.main(["--config", str(config), "train.max_steps=2", "train.lr=1e-3", "train.validate_every=0"])
    assert len(losses) == 2 and guidance == [GUIDANCE] * 2
    base, tuned = (load_file(str(f / "unet" / "model.safetensors")) for f in (model, out))
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert base.keys() == tuned.keys() and len(changed) == len(base)          # every tensor of the net moved
    assert not (out / "text_encoder" / "model.safetensors").exists()          # frozen: named, not copied
    export(str(out), str(tmp_path / "back"))
    pipe = TextToImage.from_folder(str(out), decoder_precision="fp32")
    images, _ = pipe.generate(PROMPTS, steps=2, seed=1)
    theirs = diffusers.FluxPipeline.from_pretrained(str(tmp_path / "back"))
    theirs.set_progress_bar_config(disable=True)
    torch.testing.assert_close(images * 0.5 + 0.5, flux_images(theirs, pipe, PROMPTS, 2, 3.5, seed=1),
                               atol=1e-5, rtol=0)


def test_flux_settings_are_checked_by_name(flux_model, tmp_path, capsys):
    """LoRA targets outside FLUX.1's names, widths that are not the text encoders', FLUX.1's text on a U-Net, and a
    dynamic time shift without the folder's numbers (or beside a fixed grid shift) are refused by name."""
    _, model = flux_model
    config = _flux_stage_two_config(model, tmp_path / "run")
    for overrides, message in (
            (["lora.targets=[to_q,proj_in]"], "lora.targets: ['proj_in'] are not layers of a net=flux"),
            (["flux.pooled_dim=16", "lora.rank=0", "init_from="],
             "flux.pooled_dim=16 and flux.context_dim=96 must be the pooled width (32"),
            (["net=unet", "lora.rank=0", "init_from="], "text.kind=flux conditions FLUX.1's transformer: set net=flux"),
            (["diffusion.dynamic_shift={}"], "time_shift 'dynamic' moves each batch's training times"),
            (["diffusion.schedule_options={shift: 3.0}"], "the dynamic shift replaces the fixed one"),
            (["flux_guidance=-1"], "flux_guidance must be a finite guidance scale >= 0")):
        with pytest.raises((SystemExit, ValueError)) as err:
            stage.main(["--config", str(config), *overrides])
        said = capsys.readouterr().err if err.type is SystemExit else str(err.value)
        assert message in said, (overrides, said)


def test_flux_lora_preset_is_flux1_dev():
    """configs/latent/flux-lora.yaml: FLUX.1-dev's shape with its guidance input (fed 3.5), the LoRA script's
    attention layers, the folder's dynamic shift (an imported FLUX.1-dev's numbers) moving the training times."""
    from ldm.models.flux import FluxConfig
    from ldm.models.lora import FLUX_TRAIN_TARGETS
    preset = Path(__file__).resolve().parents[2] / "configs" / "latent" / "flux-lora.yaml"
    cfg = load_config(stage.LatentStageConfig, preset)
    assert cfg.flux == FluxConfig(guidance_embeds=True) and cfg.guidance_input == 3.5 and cfg.guidance == 2.5
    assert cfg.lora.targets == list(FLUX_TRAIN_TARGETS) and cfg.text.kind == "flux" and cfg.text.t5_max_length == 512
    assert cfg.diffusion.time_shift == "dynamic" and cfg.diffusion.dynamic_shift == \
        {"base_seq_len": 256, "max_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    index = stage.model_index(cfg)
    assert index.guidance_embed and resolution_shift(4096, **index.dynamic_shift) == pytest.approx(3.1582, abs=1e-4)
