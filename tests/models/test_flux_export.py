"""python -m ldm.models.to_diffusers on FLUX.1 folders: a tiny random diffusers FluxPipeline (sd_layouts), imported
(from_diffusers) and exported again, loads in diffusers' own FluxPipeline.from_pretrained with the original tensors
under the original names, and draws the original pipeline's images from the same noise. The schedulers carry
non-default shifts, so an export that dropped or defaulted any of them would draw other images."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from sd_layouts import flux_images, write_flux_pipeline

from ldm.models.from_diffusers import convert
from ldm.models.to_diffusers import export, main
from ldm.pipeline import TextToImage

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red cube on a blue floor", "a cat"]
WEIGHTS = "diffusion_pytorch_model.safetensors"
# FLUX.1-dev's resolution-dependent shift with other numbers than diffusers' defaults (256, 4096, 0.5, 1.15):
# at the test's 64 and 96 tokens each number moves mu, so each must reach the export
DYNAMIC = {"base_image_seq_len": 16, "max_image_seq_len": 512, "base_shift": 0.3, "max_shift": 1.6}


def _reschedule(pipeline_dir, **changes) -> dict:
    """The pipeline folder's scheduler_config.json with `changes`; returns the new config."""
    path = pipeline_dir / "scheduler" / "scheduler_config.json"
    config = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps(config))
    return config


def _pipeline(folder):
    pipe = diffusers.FluxPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """(the diffusers FLUX.1-dev folder, our model folder imported from it, its export), DYNAMIC shift."""
    root = tmp_path_factory.mktemp("flux-export")
    write_flux_pipeline(root)
    _reschedule(root / "flux", **DYNAMIC)
    convert(str(root / "flux"), str(root / "model"))
    export(str(root / "model"), str(root / "back"))
    return root / "flux", root / "model", root / "back"


def test_flux_dev_export_is_the_original_pipeline(dev, one_thread):
    """The transformer's and the VAE's tensors and configs, the scheduler's shift settings and the pipeline's classes
    come back as diffusers wrote them; the export draws the original's images (square and 48x32: two token counts,
    two shifts) and ours."""
    theirs_dir, model, back = dev
    for part in ("transformer", "vae"):
        a, b = (load_file(str(folder / part / WEIGHTS)) for folder in (theirs_dir, back))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
        original = json.loads((theirs_dir / part / "config.json").read_text())
        if part == "transformer":                      # diffusers' null out_channels means in_channels
            original["out_channels"] = original["out_channels"] or original["in_channels"]
        exported = json.loads((back / part / "config.json").read_text())
        assert all(original[k] == v for k, v in exported.items() if not k.startswith("_")), part
    assert json.loads((back / "transformer" / "config.json").read_text())["guidance_embeds"] is True
    scheduler = json.loads((back / "scheduler" / "scheduler_config.json").read_text())
    assert {k: scheduler[k] for k in DYNAMIC} == DYNAMIC and scheduler["use_dynamic_shifting"] is True
    index = {k: v for k, v in json.loads((back / "model_index.json").read_text()).items() if not k.startswith("_")}
    assert index == {k: v for k, v in json.loads((theirs_dir / "model_index.json").read_text()).items()
                     if not k.startswith("_")}
    for part in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):   # file for file
        files = sorted(p.name for p in (theirs_dir / part).iterdir())
        assert files == sorted(p.name for p in (back / part).iterdir()), part

    pipe = TextToImage.from_folder(str(model), decoder_precision="fp32")
    original, exported = _pipeline(theirs_dir), _pipeline(back)
    for size in (None, (48, 32)):
        reference = flux_images(original, pipe, PROMPTS, 4, 3.5, size=size)
        torch.testing.assert_close(flux_images(exported, pipe, PROMPTS, 4, 3.5, size=size), reference,
                                   atol=1e-6, rtol=0)
        ours, _ = pipe.generate(PROMPTS, steps=4, seed=0, size=size)        # w = 2.5: guidance_scale 3.5
        torch.testing.assert_close(ours * 0.5 + 0.5, reference, atol=1e-5, rtol=0)
    defaulted = _pipeline(back)                                               # the shift's numbers matter here
    defaulted.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
        {**defaulted.scheduler.config, "base_shift": 0.5, "max_shift": 1.15})
    reference = flux_images(original, pipe, PROMPTS, 4, 3.5)
    assert (flux_images(defaulted, pipe, PROMPTS, 4, 3.5) - reference).abs().max() > 1e-3   # measured 0.010


def test_flux_schnell_export_keeps_its_fixed_shift(tmp_path, one_thread):
    """-schnell: no guidance input, a fixed shift (2 here, not diffusers' default 1) and no dynamic shifting."""
    write_flux_pipeline(tmp_path, guidance_embeds=False, dynamic=False)
    _reschedule(tmp_path / "flux", shift=2.0)
    convert(str(tmp_path / "flux"), str(tmp_path / "model"))
    export(str(tmp_path / "model"), str(tmp_path / "back"), dtype="float32")
    scheduler = json.loads((tmp_path / "back" / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["shift"], scheduler["use_dynamic_shifting"]) == (2.0, False)
    assert json.loads((tmp_path / "back" / "transformer" / "config.json").read_text())["guidance_embeds"] is False
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    reference = flux_images(_pipeline(tmp_path / "flux"), pipe, PROMPTS, 2, 0.0, seed=3)
    torch.testing.assert_close(flux_images(_pipeline(tmp_path / "back"), pipe, PROMPTS, 2, 0.0, seed=3), reference,
                               atol=1e-6, rtol=0)
    ours, _ = pipe.generate(PROMPTS, steps=2, seed=3)
    torch.testing.assert_close(ours * 0.5 + 0.5, reference, atol=1e-5, rtol=0)


def test_what_fluxpipeline_cannot_run_as_we_do_is_refused(dev, tmp_path, capsys):
    """T5 reading other than the pipeline's 512 tokens, a guidance input the index does not record, or a schedule
    other than FLUX.1's are refused by name and leave nothing behind; the CLI names the class to load the export
    with."""
    _, model, _ = dev
    mine = tmp_path / "model"
    shutil.copytree(model, mine)
    text = mine / "text_encoder" / "config.json"
    original = text.read_text()
    text.write_text(json.dumps({**json.loads(original), "t5_max_length": 256}))
    with pytest.raises(ValueError, match="T5 reads 256 tokens"):
        export(str(mine), str(tmp_path / "out"))
    text.write_text(original)
    index = mine / "model_index.json"
    saved = json.loads(index.read_text())
    for change, message in (
            ({"guidance_embed": False}, "guidance_embeds=True but model_index.json guidance_embed=False"),
            ({"prediction": "v"}, "a Flux transformer exports to diffusers' FluxPipeline only with rectified flow")):
        index.write_text(json.dumps({**saved, **change}))
        with pytest.raises(ValueError, match=message):
            export(str(mine), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
    main([str(model), "--out", str(tmp_path / "cli")])
    assert "a diffusers FluxPipeline folder" in capsys.readouterr().out
