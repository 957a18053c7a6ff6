"""Stage 2 (stages/train_latent.py, net=mmdit) fine-tunes an imported tiny SD3 folder with a LoRA, as diffusers'
train_dreambooth_lora_sd3.py does: the MMDiT gets the pooled text (a dropped caption: the empty prompt's encoding,
SD3's unconditional), only the LoRA updates of both streams' attention train, the run resumes, and the LoRA file it
writes in diffusers' SD3 layout draws, through diffusers' load_lora_weights + fuse_lora and through our --lora,
what the written model folder draws."""
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from sd_layouts import sd3_images, write_sd3_pipeline
from stage_scripts import imported_model_config, load_stage, lora_run_outputs, record_losses

from ldm.models.from_diffusers import convert
from ldm.models.lora import METADATA_KEY
from ldm.models.mmdit import MMDiT
from ldm.pipeline import TextToImage

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")                    # diffusers' LoRA loader needs it

stage = load_stage("train_latent")
PROMPTS = ["a red circle", "a blue square at the bottom"]    # shapes-world captions (the folder says data: shapes)
# diffusers' names of the trained layers: both streams' q, k, v, out (the last block's text half has only k, v)
ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
             "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


def _sd3_stage_two_config(model: Path, out: Path, **sections) -> Path:
    """A stage-2 config that fine-tunes the imported tiny SD3 model: its MMDiT's own config, its frozen CLIPs and
    T5, SD3's rectified flow (shift 3, flow prediction, logit-normal times), a rank-4 LoRA, shapes at 32 px."""
    diffusion = {"schedule": "rectified_flow", "schedule_options": {"shift": 3.0}, "prediction": "flow",
                 "time": "logit_normal", "time_scale": 1000.0, "time_shift": 3.0}
    return imported_model_config(model, out, "mmdit", diffusion, **{
        "p_uncond": 0.5, "guidance": 3.0,
        "val": {"prompts": ["a red circle"], "guidance": [0.0, 3.0], "steps": 2, "seed": 0}, **sections})


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory):
    """(the diffusers SD3 pipeline folder, our model folder converted from it)."""
    folder = tmp_path_factory.mktemp("sd3_train")
    write_sd3_pipeline(folder, shift=3.0)
    convert(str(folder / "sd3"), str(folder / "model"), guidance=3.0)
    return folder / "sd3", folder / "model"


def test_latent_model_gives_the_mmdit_pooled_text_and_sd3s_unconditional(sd3_model):
    """The stage's forward is the pipeline's conditional model: tokens and pooled text, no mask, no size numbers;
    a dropped caption ("") is exactly what CFG's unconditional half gets at sampling."""
    _, model = sd3_model
    pipe = TextToImage.from_folder(str(model))
    net = stage.LatentModel(pipe.unet, pipe.text_encoder, train_text=False)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 16, 16, generator=g), torch.tensor([300.0, 800.0])
    prompts = ["", "a red circle"]
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, prompts), pipe.unet(x, t, **pipe.encode_prompts(prompts)), atol=0, rtol=0)


def test_stage_two_trains_an_sd3_lora_that_diffusers_loads(sd3_model, tmp_path, one_thread, monkeypatch):
    theirs_dir, model = sd3_model
    losses = record_losses(monkeypatch, stage)
    config = _sd3_stage_two_config(model, tmp_path / "run")
    stage.main(["--config", str(config), "train.max_steps=2"])
    out = stage.main(["--config", str(config), "--resume", "latest"])    # continues at step 2: one more update
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))), losses
    # The LoRA file: diffusers' SD3 names, every attention projection of both streams but the last block's text
    # query and output (our MMDiT has none: that half only gives keys and values).
    lora, tensors, modules = lora_run_outputs(tmp_path / "run")
    expected = {f"transformer.transformer_blocks.{i}.{name}" for i in range(2) for name in ATTENTION}
    assert modules == expected - {"transformer.transformer_blocks.1.attn.add_q_proj",
                                  "transformer.transformer_blocks.1.attn.to_add_out"}
    with safe_open(str(lora), "pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    assert meta == {"transformer.r": 4, "transformer.lora_alpha": 4,
                    "transformer.target_modules": sorted(m.removeprefix("transformer.") for m in modules)}
    assert len(tensors) == 2 * len(modules) and tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (4, 32)

    # Only the LoRA'd weights moved; the model folder holds them merged.
    base, tuned = (load_file(str(f / "unet" / "model.safetensors")) for f in (model, out))
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert base.keys() == tuned.keys() and len(changed) == len(modules)
    assert all(k.endswith(("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.out.weight")) and
               ".self_attn." not in k for k in changed)

    # The folder draws what diffusers draws with the file fused, and what our --lora on the source draws.
    pipe = TextToImage.from_folder(str(out), decoder_precision="fp32")
    assert isinstance(pipe.unet, MMDiT)
    images, _ = pipe.generate(PROMPTS, steps=3, seed=0, guidance=3.0)
    source = TextToImage.from_folder(str(model), decoder_precision="fp32")
    before, _ = source.generate(PROMPTS, steps=3, seed=0, guidance=3.0)
    assert source.add_lora(str(lora)) == len(modules)
    live, _ = source.generate(PROMPTS, steps=3, seed=0, guidance=3.0)
    torch.testing.assert_close(live, images, atol=1e-5, rtol=0)
    theirs = diffusers.StableDiffusion3Pipeline.from_pretrained(str(theirs_dir))
    theirs.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # peft finds every module the file names, and only those
        theirs.load_lora_weights(str(lora))
    theirs.fuse_lora()
    reference = sd3_images(theirs, pipe, PROMPTS, 3, 4.0)
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=3e-4, rtol=0)
    assert (images - before).abs().max() > 1e-2                             # the LoRA changed the picture


def test_mmdit_settings_are_checked_by_name(sd3_model, tmp_path, capsys):
    """LoRA targets outside the MMDiT's names, a pooled width that is not the text encoder's, and SD3's text on a
    U-Net are refused by name."""
    _, model = sd3_model
    config = _sd3_stage_two_config(model, tmp_path / "run")
    for override, message in (("lora.targets=[to_q,proj_in]", "lora.targets: ['proj_in'] are not layers of a "
                                                              "net=mmdit"),
                              ("mmdit.pooled_dim=16", "mmdit.pooled_dim=16 and mmdit.context_dim=96 must be the pooled width (80"),
                              ("net=unet", "text.kind=sd3 conditions SD3's transformer: set net=mmdit")):
        with pytest.raises((SystemExit, ValueError)) as err:
            stage.main(["--config", str(config), override, "lora.rank=0", "init_from="])
        said = capsys.readouterr().err if err.type is SystemExit else str(err.value)
        assert message in said, (override, said)
