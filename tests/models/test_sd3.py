"""Stable Diffusion 3 (Esser et al. 2024) imported from a tiny random diffusers pipeline: our model folder draws
what diffusers' StableDiffusion3Pipeline draws from the same noise on the same flow-matching grid."""
import json

import diffusers
import pytest
import torch

from ldm.models.from_diffusers import convert
from ldm.models.to_diffusers import export
from ldm.models.to_diffusers import main as export_main
from ldm.pipeline import TextToImage
from sd_layouts import sd3_images as their_images
from sd_layouts import write_sd3_pipeline

PROMPTS = ["a red cube on a blue floor", "a cat"]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3")
    return write_sd3_pipeline(folder), folder


def test_sd3_pipeline_draws_what_diffusers_draws(sd3, tmp_path, one_thread):
    """Converted (sharded transformer, T5, shift 3): Euler = DDIM on the flow path draws diffusers' images, with
    CFG (w = 3 is their scale 4) and a negative prompt; the folder records rectified flow, shift 3, flow."""
    theirs, folder = sd3
    index = convert(str(folder / "sd3"), str(tmp_path / "model"), guidance=3.0)
    assert index.schedule == {"name": "rectified_flow", "shift": 3.0} and index.prediction == "flow"
    assert json.loads((tmp_path / "model" / "unet" / "config.json").read_text())["kind"] == "mmdit"
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    for sampler in ("ddim", "euler"):
        images, info = pipe.generate(PROMPTS, steps=4, seed=0, sampler=sampler, negative="blurry")
        assert info["nfe"] == 8
        reference = their_images(theirs, pipe, PROMPTS, 4, 4.0, negative_prompt="blurry")
        torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=2e-4, rtol=0)
    half = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32", dtype=torch.bfloat16)
    bf16, _ = half.generate(PROMPTS, steps=4, seed=0, sampler="euler", negative="blurry")   # close, not equal
    assert 0 < ((bf16 * 0.5 + 0.5) - reference).abs().mean() < 2e-2
    plain, _ = pipe.generate(PROMPTS, steps=4, seed=0, guidance=0.0)
    assert ((plain * 0.5 + 0.5) - reference).abs().max() > 0.05            # guidance mattered


def test_sd3_without_t5_and_a_grid_shift(tmp_path, one_thread):
    """No T5 (SD3 runs on zeros in its place) and another shift: still diffusers' images; --shift at sampling
    time equals a folder written with that shift."""
    theirs = write_sd3_pipeline(tmp_path, t5=False, shift=1.0)
    convert(str(tmp_path / "sd3"), str(tmp_path / "model"), guidance=2.0)
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    images, _ = pipe.generate(PROMPTS, steps=3, seed=1)
    torch.testing.assert_close(images * 0.5 + 0.5, their_images(theirs, pipe, PROMPTS, 3, 3.0, seed=1), atol=2e-4, rtol=0)
    theirs.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=2.5)
    shifted, _ = pipe.generate(PROMPTS, steps=3, seed=1, shift=2.5, teacher=True)
    torch.testing.assert_close(shifted * 0.5 + 0.5, their_images(theirs, pipe, PROMPTS, 3, 3.0, seed=1),
                               atol=2e-4, rtol=0)


def test_sd3_refusals_name_what_is_missing(sd3, tmp_path):
    theirs, folder = sd3
    convert(str(folder / "sd3"), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"))
    for call, message in ((lambda: pipe.set_freeu((1.1, 1.2, 0.9, 0.2)), "FreeU works on U-Nets"),
                          (lambda: pipe.add_embedding("x.pt"), "not read for SD3")):
        with pytest.raises(ValueError, match=message):
            call()
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(folder / "sd3", broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        convert(str(broken), str(tmp_path / "other"))


@pytest.mark.parametrize("t5,shift", [(True, 3.0), (False, 1.5)])
def test_export_back_to_diffusers_draws_our_images(tmp_path, one_thread, capsys, t5, shift):
    """ldm.models.to_diffusers on an SD3 folder: the transformer's and the VAE's tensors come back under diffusers'
    names, the scheduler keeps the shift, and StableDiffusion3Pipeline.from_pretrained on the export draws our
    images (on our grid, from our noise)."""
    from safetensors.torch import load_file
    write_sd3_pipeline(tmp_path, t5=t5, shift=shift)
    convert(str(tmp_path / "sd3"), str(tmp_path / "model"), guidance=2.0)
    export_main([str(tmp_path / "model"), "--out", str(tmp_path / "back")])
    assert "a diffusers StableDiffusion3Pipeline folder" in capsys.readouterr().out
    for part, cls in (("transformer", diffusers.SD3Transformer2DModel), ("vae", diffusers.AutoencoderKL)):
        original = cls.from_pretrained(str(tmp_path / "sd3" / part)).state_dict()     # sharded, as released
        exported = load_file(str(tmp_path / "back" / part / "diffusion_pytorch_model.safetensors"))
        assert exported.keys() == original.keys(), part
        dead = [k for k in original if k.startswith("transformer_blocks.1.attn.add_q_proj.")]  # the last block's
        assert part == "vae" or len(dead) == 2 and all(not exported[k].any() for k in dead)   # unused text query
        assert all(torch.equal(exported[k], original[k]) for k in original if k not in dead), part
    scheduler = json.loads((tmp_path / "back" / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["_class_name"], scheduler["shift"], scheduler["num_train_timesteps"]) == \
        ("FlowMatchEulerDiscreteScheduler", shift, 1000)
    pipeline = json.loads((tmp_path / "back" / "model_index.json").read_text())
    assert (pipeline["text_encoder_3"][0] is not None, (tmp_path / "back" / "text_encoder_3").is_dir()) == (t5, t5)

    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    ours, _ = pipe.generate(PROMPTS, steps=3, seed=0)
    no_t5 = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}   # diffusers asks for them so, by name
    theirs = diffusers.StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "back"), **no_t5)
    theirs.set_progress_bar_config(disable=True)
    torch.testing.assert_close(ours * 0.5 + 0.5, their_images(theirs, pipe, PROMPTS, 3, 3.0), atol=2e-4, rtol=0)


def test_export_refuses_what_the_sd3_pipeline_runs_otherwise(sd3, tmp_path):
    """An MMDiT folder off SD3's flow schedule, or reading other token counts than diffusers' call: refused by name,
    nothing written."""
    _, folder = sd3
    convert(str(folder / "sd3"), str(tmp_path / "model"))
    index_path, text_path = tmp_path / "model" / "model_index.json", tmp_path / "model" / "text_encoder" / "config.json"
    index, text = json.loads(index_path.read_text()), json.loads(text_path.read_text())
    for index_change, text_change, message in (
            ({"prediction": "v"}, {}, "an MMDiT exports to diffusers' SD3 pipeline only with rectified flow"),
            ({"schedule": {"name": "cosine_logsnr"}}, {}, "only with rectified flow"),
            ({}, {"t5_max_length": 128}, "unless called with max_sequence_length"),
            ({}, {"max_length": 60}, "the CLIPs read 60 tokens")):
        index_path.write_text(json.dumps({**index, **index_change}))
        text_path.write_text(json.dumps({**text, **text_change}))
        with pytest.raises(ValueError, match=message):
            export(str(tmp_path / "model"), str(tmp_path / "out"))
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
