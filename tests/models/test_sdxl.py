"""SDXL base (Podell et al. 2023): a diffusers StableDiffusionXLPipeline becomes our model folder, and our
TextToImage on it draws what diffusers draws from the same weights and noise: two CLIP encoders side by
side (penultimate layers, no final LayerNorm), the pooled text and the size numbers in the U-Net's added
embedding, zeroed embeddings for the empty negative prompt.

The pipeline is tiny and random, built here from diffusers' and transformers' own classes (the SDXL block
structure at toy widths; both tokenizers with the real CLIP vocabulary, the second padding with "!")."""
from pathlib import Path

import pytest
import torch
from sd_layouts import PROMPTS, diffusers_images, on_our_grid, write_sdxl_pipeline

from ldm.diffusion.samplers import initial_noise
from ldm.models.from_diffusers import convert, main
from ldm.pipeline import TextToImage

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(diffusers SDXL pipeline, the folder it was saved to)."""
    folder = tmp_path_factory.mktemp("sdxl")
    return write_sdxl_pipeline(folder), folder


def test_sdxl_pipeline_draws_what_diffusers_draws(sdxl, tmp_path, one_thread, capsys):
    theirs, folder = sdxl
    main([str(folder / "sdxl"), "--out", str(tmp_path / "model"), "--guidance", "3"])
    assert "prediction eps, w = 3" in capsys.readouterr().out
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    assert pipe.text_encoder.cfg.kind == "sdxl" and pipe.text_encoder.dim == 80
    ids_2 = pipe.text_encoder._ids(pipe.text_encoder.tokenizers[1], PROMPTS)[0]
    assert ids_2[1, -1] == 0 and pipe.text_encoder.tokenize(PROMPTS)[0][1, -1] == 49407   # each pads its own way

    images, info = pipe.generate(PROMPTS, steps=4, seed=0)
    assert (info["model"], info["nfe"]) == ("teacher", 8)
    reference = diffusers_images(theirs, pipe, PROMPTS, 4, 1 + 3.0)
    assert reference.std() > 0.05
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=2e-4, rtol=0)

    # not square: the size numbers go in as (height, width), as diffusers' original_size / target_size
    assert pipe.size_ids(pipe.latent_shape(1, (48, 32))).tolist() == [[32, 48, 0, 0, 32, 48]]
    images, _ = pipe.generate(PROMPTS[:1], steps=2, seed=1, size=(48, 32))
    reference = diffusers_images(theirs, pipe, PROMPTS[:1], 2, 1 + 3.0, seed=1, size=(48, 32))
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=2e-4, rtol=0)


def test_wrong_second_encoder_is_named(sdxl, tmp_path):
    import json
    import shutil
    _, folder = sdxl
    for name, edit, message in (("other", {"text_encoder_2": ["transformers", "T5EncoderModel"]}, "text_encoder_2 is"),):
        src = tmp_path / name
        shutil.copytree(folder / "sdxl", src)
        index = json.loads((src / "model_index.json").read_text())
        (src / "model_index.json").write_text(json.dumps({**index, **edit}))
        with pytest.raises(ValueError, match=message):
            convert(str(src), str(tmp_path / f"{name}-model"))


def test_sdxl_controlnet_draws_what_diffusers_draws(sdxl, tmp_path, one_thread):
    """A diffusers SDXL ControlNetModel (from_unet of the pipeline's U-Net, with its own copy of the added
    embedding; zero convolutions and hint stack made non-zero) loads into ours, and txt2img with it draws
    what diffusers' StableDiffusionXLControlNetPipeline draws; ControlNet.from_unet on our U-Net copies
    what diffusers' from_unet copies."""
    import numpy as np

    from ldm.models.controlnet import ControlNet, controlnet_state_from_diffusers, load_controlnet
    theirs, folder = sdxl
    convert(str(folder / "sdxl"), str(tmp_path / "model"), guidance=3.0)
    torch.manual_seed(1)
    net = diffusers.ControlNetModel.from_unet(theirs.unet, conditioning_embedding_out_channels=(16, 32))  # f = 2
    assert net.config.addition_embed_type == "text_time"
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                p.normal_(0, 0.1)
    net.save_pretrained(str(tmp_path / "cn"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    side = pipe.index.resolution
    hint = torch.from_numpy(np.random.default_rng(0).random((1, 3, side, side)).astype(np.float32))
    control = [(load_controlnet(str(tmp_path / "cn")), hint, 0.8)]
    images, _ = pipe.generate(PROMPTS[:1], steps=3, seed=0, control=control)
    plain, _ = pipe.generate(PROMPTS[:1], steps=3, seed=0)
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(3), pipe.latent_shape(1),
                          generator=torch.Generator().manual_seed(0))
    cn_pipe = on_our_grid(diffusers.StableDiffusionXLControlNetPipeline(**theirs.components, controlnet=net))
    with torch.no_grad():
        reference = cn_pipe(PROMPTS[0], image=hint, controlnet_conditioning_scale=0.8, num_inference_steps=3,
                            guidance_scale=4.0, latents=noise, height=side, width=side, output_type="pt").images
    assert (images - plain).abs().max() > 0.05                                   # the control mattered
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=2e-4, rtol=0)

    ours = ControlNet.from_unet(pipe.unet, latent_factor=2)
    copied = controlnet_state_from_diffusers(
        diffusers.ControlNetModel.from_unet(theirs.unet, conditioning_embedding_out_channels=(16, 32)).state_dict(), 2)
    body = {k: v for k, v in ours.state_dict().items() if k.startswith("body.")}
    assert any(k.startswith("body.add_embed.") for k in body)
    assert all(torch.equal(v, copied[k]) for k, v in body.items())


def test_controlnet_stage_trains_one_for_sdxl(sdxl, tmp_path, one_thread, mixed_aspect_folder):
    """The ControlNet stage on the imported tiny SDXL model, from wide, square and tall pictures (buckets):
    the copy and the frozen U-Net both get the pooled text and each picture's six numbers; it writes a
    diffusers SDXL ControlNetModel that diffusers loads, with validation grids drawn through it."""
    from stage_scripts import load_stage
    stage = load_stage("train_controlnet")
    _, folder = sdxl
    convert(str(folder / "sdxl"), str(tmp_path / "model"))
    config = Path(stage.__file__).parents[1] / "configs" / "controlnet" / "tiny.yaml"
    out = stage.main(["--config", str(config), f"model={tmp_path / 'model'}", f"train.output_dir={tmp_path / 'run'}",
                      "data.source=imagefolder", f"data.path={mixed_aspect_folder}", "data.buckets=true",
                      "data.bucket_step=8", "train.validate_every=3"])
    net = diffusers.ControlNetModel.from_pretrained(str(out))
    assert net.config.addition_embed_type == "text_time"
    assert any((tmp_path / "run" / "samples").glob("*.png"))


def test_export_back_to_diffusers_draws_our_images(sdxl, tmp_path, one_thread, capsys):
    """ldm.models.to_diffusers on an SDXL folder (after a LoRA merged into U-Net and both encoders, as after
    fine-tuning here): diffusers' StableDiffusionXLPipeline.from_pretrained on the export, with its default
    call on the written scheduler, draws what our teacher draws."""
    from safetensors.torch import save_file

    from ldm.models.merge_lora import main as merge_main
    from ldm.models.to_diffusers import main as export_main
    theirs, folder = sdxl
    convert(str(folder / "sdxl"), str(tmp_path / "model"), guidance=3.0)
    save_file(_kohya_sdxl_lora(theirs.unet, (theirs.text_encoder, theirs.text_encoder_2)), str(tmp_path / "l.safetensors"))
    merge_main([str(tmp_path / "model"), "--lora", f"{tmp_path / 'l.safetensors'}:0.5", "--out", str(tmp_path / "tuned")])
    export_main([str(tmp_path / "tuned"), "--out", str(tmp_path / "exported")])
    assert "a diffusers StableDiffusionXLPipeline folder" in capsys.readouterr().out
    pipe = TextToImage.from_folder(str(tmp_path / "tuned"), decoder_precision="fp32")
    for ours, base in ((pipe.text_encoder.model, theirs.text_encoder), (pipe.text_encoder.model_2, theirs.text_encoder_2)):
        q = [k for k in base.state_dict() if k.endswith("layers.0.self_attn.q_proj.weight")][0]
        assert (ours.state_dict()[q] - base.state_dict()[q]).abs().max() > 1e-3   # both encoders were baked
    images, _ = pipe.generate(PROMPTS, steps=4, seed=0)
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(4), pipe.latent_shape(len(PROMPTS)),
                          generator=torch.Generator().manual_seed(0))
    exported = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "exported"))
    exported.set_progress_bar_config(disable=True)
    side = pipe.index.resolution
    with torch.no_grad():
        reference = exported(PROMPTS, num_inference_steps=4, guidance_scale=4.0, latents=noise, height=side,
                             width=side, output_type="pt").images
        untuned = on_our_grid(theirs)(PROMPTS, num_inference_steps=4, guidance_scale=4.0, latents=noise,
                                      height=side, width=side, output_type="pt").images
    assert (reference - untuned).abs().max() > 0.05                    # the merged LoRA went along
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=2e-4, rtol=0)


def test_stage_three_distills_an_sdxl_teacher(sdxl, tmp_path, one_thread):
    """Guided distillation of the imported tiny SDXL teacher, end to end: the w-conditioned student and its
    halvings pass the pooled text and the size numbers on; the students draw, and a fresh stage-one
    student (the w-embedding's last layer zero) is the teacher's conditional model exactly."""
    from stage_scripts import load_stage

    from ldm.distill.student import GuidedStudent
    _, folder = sdxl
    convert(str(folder / "sdxl"), str(tmp_path / "model"))
    teacher = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    student = GuidedStudent.from_teacher(teacher.unet).eval()
    cond = teacher.encode_prompts(PROMPTS)
    assert set(cond) == {"context", "pooled", "time_ids"}
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, w=torch.tensor([0.0, 3.0]), **cond), teacher.unet(x, t, **cond))

    stage = load_stage("distill")
    folder_out = stage.main(["--config", str(Path(stage.__file__).parents[1] / "configs" / "distill" / "tiny.yaml"),
                             f"teacher={tmp_path / 'model'}", f"train.output_dir={tmp_path / 'run'}",
                             f"model_out={tmp_path / 'distilled'}", "distill.n_start=2", "train.checkpoint_every=0"])
    pipe = TextToImage.from_folder(folder_out, decoder_precision="fp32")
    assert pipe.student_steps == [1, 2]
    for steps in (1, 2):
        images, info = pipe.generate(PROMPTS, steps=steps, guidance=2.0, size=(48, 32))
        assert info["model"] == f"student-{steps}" and images.shape == (2, 3, 32, 48)
        assert torch.isfinite(images).all()


def _kohya_sdxl_lora(unet, text_encoders, rank=4, seed=0) -> dict:
    """A kohya-layout SDXL LoRA: U-Net modules in the CompVis / sgm names kohya writes for SDXL (attention
    projections and LoCon's ResBlock convs), the two text encoders as lora_te1_ / lora_te2_ in transformers
    4's names (text_model.encoder...)."""
    from sd_layouts import unet_to_compvis
    g = torch.Generator().manual_seed(seed)
    state = unet.state_dict()
    compvis = {id(v): k for k, v in unet_to_compvis(state, levels=len(unet.config.block_out_channels),
                                                    n=unet.config.layers_per_block).items()}
    modules = {}
    for name, m in unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0", "resnets.0.conv1")):
            key = compvis[id(state[f"{name}.weight"])][len("model.diffusion_model."):-len(".weight")]
            modules["lora_unet_" + key.replace(".", "_")] = m
    for prefix, model in zip(("lora_te1_", "lora_te2_"), text_encoders):
        for name, m in model.named_modules():
            if name.endswith(("q_proj", "fc1")):
                modules[prefix + "text_model_" + name.removeprefix("text_model.").replace(".", "_")] = m
    out = {}
    for key, m in modules.items():
        down = torch.randn(rank, *m.weight.shape[1:], generator=g) * 0.3
        up = torch.randn(m.weight.shape[0], rank, *([1, 1] if m.weight.dim() == 4 else []), generator=g) * 0.3
        out |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
    return out


def test_kohya_sdxl_lora_merges_as_diffusers_and_the_closed_form(sdxl, tmp_path, one_thread):
    """U-Net part (sgm names, input_blocks_4_1_...): our images equal diffusers' load_lora_weights + fuse_lora
    on a fresh copy of the pipeline. Text parts (diffusers 0.42 drops them under transformers 5): each merged
    weight equals W + scale * alpha / r * up @ down."""
    from safetensors.torch import save_file
    _, folder = sdxl
    convert(str(folder / "sdxl"), str(tmp_path / "model"), guidance=3.0)
    theirs = write_sdxl_pipeline(tmp_path)                     # the same seed: the same weights, unfused
    lora = _kohya_sdxl_lora(theirs.unet, (theirs.text_encoder, theirs.text_encoder_2))
    assert any(k.startswith("lora_unet_input_blocks_") for k in lora)
    unet_part = {k: v for k, v in lora.items() if k.startswith("lora_unet_")}
    text_part = {k: v for k, v in lora.items() if not k.startswith("lora_unet_")}
    save_file(unet_part, str(tmp_path / "unet.safetensors"))
    save_file(text_part, str(tmp_path / "text.safetensors"))

    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    before = diffusers_images(theirs, pipe, PROMPTS, 3, 4.0)
    assert pipe.add_lora(str(tmp_path / "unet.safetensors"), 0.7) == len(unet_part) // 3
    images, _ = pipe.generate(PROMPTS, steps=3, seed=0)
    theirs.load_lora_weights(str(tmp_path / "unet.safetensors"))
    theirs.fuse_lora(lora_scale=0.7)
    reference = diffusers_images(theirs, pipe, PROMPTS, 3, 4.0)
    assert (reference - before).abs().max() > 0.05
    torch.testing.assert_close(images * 0.5 + 0.5, reference, atol=3e-4, rtol=0)

    models = {"lora_te1_": pipe.text_encoder.model, "lora_te2_": pipe.text_encoder.model_2}
    base = {p: {k: v.clone() for k, v in m.state_dict().items()} for p, m in models.items()}
    assert pipe.add_lora(str(tmp_path / "text.safetensors"), 0.5) == len(text_part) // 3
    changed = 0
    for prefix, model in models.items():
        for name, weight in model.state_dict().items():
            key = prefix + "text_model_" + name.removeprefix("text_model.").removesuffix(".weight").replace(".", "_")
            if f"{key}.lora_down.weight" in text_part:
                down, up = text_part[f"{key}.lora_down.weight"], text_part[f"{key}.lora_up.weight"]
                expected = base[prefix][name] + 0.5 * 2.0 / 4 * up @ down
                torch.testing.assert_close(weight, expected, atol=1e-5, rtol=1e-5)
                changed += 1
            else:
                assert torch.equal(weight, base[prefix][name]), name
    assert changed == len(text_part) // 3


def test_lcm_sampler_on_sdxl_draws_what_diffusers_lcm_draws(sdxl, tmp_path, one_thread):
    """Few-step SDXL as people run it with an LCM-LoRA (latent-consistency/lcm-lora-sdxl): sampler="lcm" on the
    lcm grid, 4 steps, no CFG; diffusers' SDXL pipeline with its LCMScheduler, the same latents and the same
    generator for the sampler's noise (our seed + 1)."""
    theirs, folder = sdxl
    convert(str(folder / "sdxl"), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    ours, info = pipe.generate(PROMPTS, steps=4, seed=0, guidance=0.0, sampler="lcm")
    assert info["spacing"] == "lcm" and info["nfe"] == 4
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(4, spacing="lcm"), pipe.latent_shape(2),
                          generator=torch.Generator().manual_seed(0))
    lcm = diffusers.StableDiffusionXLPipeline(**{**theirs.components,
                                                 "scheduler": diffusers.LCMScheduler.from_config(theirs.scheduler.config)})
    lcm.set_progress_bar_config(disable=True)
    side = pipe.index.resolution
    with torch.no_grad():
        reference = lcm(PROMPTS, num_inference_steps=4, guidance_scale=1.0, latents=noise, height=side, width=side,
                        generator=torch.Generator().manual_seed(1), output_type="pt").images
    torch.testing.assert_close(ours * 0.5 + 0.5, reference, atol=2e-4, rtol=0)


def _sdxl_stage_two_config(model: Path, images: Path, out: Path) -> Path:
    """A stage-2 config that fine-tunes the imported tiny SDXL model: its U-Net's own config, its two frozen
    CLIP encoders, SD's discrete schedule, a rank-4 LoRA, aspect-ratio buckets, a validation grid."""
    import json

    import yaml
    cfg = {"autoencoder": str(model / "autoencoder"), "init_from": str(model), "p_uncond": 0.5, "guidance": 3.0,
           "train": {"output_dir": str(out), "max_steps": 3, "batch_size": 2, "lr": 1e-2, "ema_decay": 0,
                     "checkpoint_every": 2, "log_every": 1, "validate_every": 3, "tracker": "none",
                     "min_free_disk_gb": 0},
           "data": {"source": "imagefolder", "path": str(images), "resolution": 32, "buckets": True,
                    "bucket_step": 8},
           "unet": json.loads((model / "unet" / "config.json").read_text()),
           "text": {"kind": "sdxl", "path": str(model / "text_encoder" / "clip"), "mask_padding": False,
                    "zero_empty": True},
           "diffusion": {"schedule": "scaled_linear",
                         "schedule_options": {"T": 1000, "beta_start": 0.00085, "beta_end": 0.012},
                         "prediction": "eps", "time": "discrete", "time_scale": 1.0},
           "lora": {"rank": 4},
           "val": {"prompts": ["picture 1", "picture 4"], "guidance": [0.0, 3.0], "steps": 2, "seed": 0}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("cached", [False, True])
def test_stage_two_trains_an_sdxl_lora(sdxl, tmp_path, one_thread, mixed_aspect_folder, monkeypatch, cached):
    """A LoRA on the imported tiny SDXL model from wide, square and tall pictures (their own buckets), on the
    fly and from the latent cache: the U-Net gets the pooled text and the six numbers of each picture (its
    original size, its crop corner in the resized picture, the bucket's size), the run resumes, the LoRA file
    merges, the model folder samples."""
    from stage_scripts import load_stage
    stage = load_stage("train_latent")
    _, folder = sdxl
    convert(str(folder / "sdxl"), str(tmp_path / "model"))
    config = _sdxl_stage_two_config(tmp_path / "model", mixed_aspect_folder, tmp_path / "run")
    seen = []
    forward = stage.LatentModel.forward
    monkeypatch.setattr(stage.LatentModel, "forward",
                        lambda self, x, t, prompts, time_ids=None: seen.append(time_ids.cpu()) or
                        forward(self, x, t, prompts, time_ids))
    extra = [f"cache_latents={str(cached).lower()}", f"cache_dir={tmp_path / 'cache'}"]
    stage.main(["--config", str(config), *extra, "train.max_steps=2"])
    out = stage.main(["--config", str(config), *extra, "--resume", "latest"])
    rows = {tuple(row.tolist()) for ids in seen for row in ids}
    # wide 80x48 -> bucket 40x24 (w x h): resized to 40x24 exactly; square 64 -> 32; tall 48x80 -> 24x40
    assert rows <= {(48.0, 80.0, 0.0, 0.0, 24.0, 40.0), (64.0, 64.0, 0.0, 0.0, 32.0, 32.0),
                    (80.0, 48.0, 0.0, 0.0, 40.0, 24.0)} and len(rows) >= 2
    assert (out.parent / "lora.safetensors").is_file() and any((out.parent / "samples").glob("*.png"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    assert pipe.add_lora(str(out.parent / "lora.safetensors")) > 0
    images, _ = TextToImage.from_folder(str(out), decoder_precision="fp32").generate(["picture 1"], steps=2)
    assert torch.isfinite(images).all()


def test_sdxl_embedding_draws_what_diffusers_draws(sdxl, tmp_path, one_thread):
    """An SDXL textual-inversion file ({"clip_l": (k, 768-ish), "clip_g": (k, 1280-ish)}, here 2 vectors at the
    toy widths) as a word of both encoders, in the prompt and in the negative prompt: diffusers'
    load_textual_inversion of each half into its encoder and tokenizer draws the same images."""
    from safetensors.torch import save_file
    _, folder = sdxl
    convert(str(folder / "sdxl"), str(tmp_path / "model"), guidance=3.0)
    theirs = write_sdxl_pipeline(tmp_path)                     # a fresh copy: the words change it
    g = torch.Generator().manual_seed(3)
    state = {"clip_l": torch.randn(2, 32, generator=g) * 0.5, "clip_g": torch.randn(2, 48, generator=g) * 0.5}
    save_file(state, str(tmp_path / "mystyle.safetensors"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    prompts = ["a cube in mystyle", "a cat"]
    before, _ = pipe.generate(prompts, steps=3, seed=0, negative="mystyle")
    assert pipe.add_embedding(str(tmp_path / "mystyle.safetensors")) == ("mystyle", 2)
    theirs.load_textual_inversion(state["clip_l"], token="mystyle", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(state["clip_g"], token="mystyle", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    ours, info = pipe.generate(prompts, steps=3, seed=0, negative="mystyle")
    reference = diffusers_images(theirs, pipe, prompts, 3, 1 + info["guidance"], negative_prompt=["mystyle"] * 2)
    torch.testing.assert_close(ours * 0.5 + 0.5, reference, atol=2e-4, rtol=0)
    assert (ours - before).abs().max() > 1e-2                                 # the new word did something
    save_file({"emb_params": state["clip_l"]}, str(tmp_path / "one.safetensors"))
    with pytest.raises(ValueError, match="not an SDXL embedding"):
        pipe.add_embedding(str(tmp_path / "one.safetensors"))
    save_file({"clip_l": state["clip_l"], "clip_g": state["clip_l"].clone()}, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ValueError, match="32 wide, this CLIP's tokens 48"):
        pipe.add_embedding(str(tmp_path / "narrow.safetensors"), "<other>")
    assert "<other>" not in pipe.text_encoder.tokenizers[0].get_vocab()    # all or nothing


def test_sdxl_long_prompts_and_emphasis(sdxl, tmp_path, one_thread):
    """Prompts past 77 tokens in 75-token chunks, each through both encoders alone (bigG's rows padded with
    its own id), side by side; the pooled vector is the first chunk's; `(word:1.5)` weighs its tokens; a
    short unweighted prompt gives exactly the plain encoding."""
    from ldm.models.prompt_weights import apply_weights
    theirs, folder = sdxl
    convert(str(folder / "sdxl"), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    pipe.prompt_weights = True
    plain = pipe.text_encoder.encode_pooled(PROMPTS)
    chunked = pipe.encode_prompts(PROMPTS, chunks=pipe.prompt_chunks(PROMPTS))
    assert pipe.prompt_chunks(PROMPTS) == 1
    assert torch.equal(chunked["context"], plain[0]) and torch.equal(chunked["pooled"], plain[2])

    long = "a red cube on a blue floor beside a green sphere under a yellow lamp, " * 8
    n = pipe.prompt_chunks([long])
    cond = pipe.encode_prompts([long, ""], chunks=n)
    assert n == 2 and cond["context"].shape == (2, 154, 80)
    rows = []
    for tokenizer, model in ((theirs.tokenizer, theirs.text_encoder), (theirs.tokenizer_2, theirs.text_encoder_2)):
        ids = tokenizer(long, add_special_tokens=False)["input_ids"]
        chunks = []
        for j in range(2):
            part = ids[75 * j: 75 * (j + 1)]
            row = [tokenizer.bos_token_id, *part, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (75 - len(part))
            with torch.no_grad():
                chunks.append(model(torch.tensor([row]), output_hidden_states=True).hidden_states[-2])
        rows.append(torch.cat(chunks, dim=1))
    torch.testing.assert_close(cond["context"][0], torch.cat(rows, dim=-1)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond["pooled"][0], pipe.text_encoder.encode_pooled([long])[2][0])
    assert not cond["context"][1].any() and not cond["pooled"][1].any()        # the empty prompt: zeros

    weighted = pipe.encode_prompts(["a (cube:1.5) on a floor"], chunks=1)["context"]
    weights = torch.ones(1, 77)
    weights[0, 2] = 1.5                                                       # start, "a", "cube"
    reference = apply_weights(pipe.text_encoder.encode_pooled(["a cube on a floor"])[0], weights)
    torch.testing.assert_close(weighted, reference)
    images, _ = pipe.generate([long], steps=2)                                # through sample's chunk count
    assert torch.isfinite(images).all()


def test_sdxl_ip_adapter_draws_what_diffusers_draws(sdxl, tmp_path, one_thread):
    """An IP-Adapter for SDXL (image tokens as wide as SDXL's 2048-ish context, one key/value pair per
    cross-attention of every transformer block, in diffusers' order): diffusers' load_ip_adapter on a fresh
    copy of the pipeline draws the same images."""
    from sd_layouts import ip_image, with_ip_adapter, write_image_encoder, write_ip_adapter
    _, folder = sdxl
    convert(str(folder / "sdxl"), str(tmp_path / "model"), guidance=3.0)
    theirs = write_sdxl_pipeline(tmp_path)
    encoder = write_image_encoder(tmp_path / "image_encoder")
    adapter = write_ip_adapter(tmp_path / "ip.safetensors", theirs.unet)
    image = ip_image()
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    plain, _ = pipe.generate(PROMPTS, steps=3, seed=0)
    pipe.add_ip_adapter(str(adapter), str(encoder), scale=0.7)
    ours, _ = pipe.generate(PROMPTS, steps=3, seed=0, ip_image=image)
    xl = with_ip_adapter(diffusers.StableDiffusionXLPipeline, theirs, encoder, adapter, 0.7)
    reference = diffusers_images(xl, pipe, PROMPTS, 3, 4.0, ip_adapter_image=image)
    torch.testing.assert_close(ours * 0.5 + 0.5, reference, atol=2e-4, rtol=0)
    assert (ours - plain).abs().max() > 1e-2                               # the image prompt mattered


@pytest.mark.parametrize("steps", [1, 2])
def test_turbo_style_sampling_draws_what_diffusers_draws(sdxl, tmp_path, one_thread, steps):
    """Few-step SDXL checkpoints distilled elsewhere (SDXL-Turbo's adversarial diffusion distillation, Sauer
    et al. 2023) are SDXL base folders sampled with Euler ancestral on the trailing grid, without CFG, in 1-4
    steps: `--sampler euler_a --guidance 0 --steps 1` draws what diffusers' SDXL pipeline with
    EulerAncestralDiscreteScheduler(timestep_spacing="trailing") draws (guidance_scale 0), the ancestral noise
    from the same generator (our seed + 1). diffusers' Euler schedulers start trailing grids from
    latents x sigma_max (`init_noise_sigma`) where the VP start is sqrt(1 + sigma_max^2), 0.23% more at
    SD's sigma_max = 14.6: its latents are given that factor, so both start from the same point."""
    theirs, folder = sdxl
    convert(str(folder / "sdxl"), str(tmp_path / "model"))
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    ours, info = pipe.generate(PROMPTS, steps=steps, seed=0, guidance=0.0, sampler="euler_a")
    assert info["nfe"] == steps
    euler = diffusers.StableDiffusionXLPipeline(**{**theirs.components, "scheduler":
                                                   diffusers.EulerAncestralDiscreteScheduler.from_config(
                                                       theirs.scheduler.config, timestep_spacing="trailing")})
    euler.set_progress_bar_config(disable=True)
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(steps), pipe.latent_shape(2),
                          generator=torch.Generator().manual_seed(0))
    euler.scheduler.set_timesteps(steps)
    sigma = float(euler.scheduler.sigmas[0])
    side = pipe.index.resolution
    with torch.no_grad():
        reference = euler(PROMPTS, num_inference_steps=steps, guidance_scale=0.0, height=side,
                          latents=noise * (1 + sigma ** 2) ** 0.5 / sigma,
                          width=side, generator=torch.Generator().manual_seed(1), output_type="pt").images
    torch.testing.assert_close(ours * 0.5 + 0.5, reference, atol=2e-4, rtol=0)


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_img2img_draws_what_diffusers_sdxl_img2img_draws(sdxl, tmp_path, one_thread, which):
    """sample(init=latents, strength) as diffusers' StableDiffusionXLImg2ImgPipeline given the same latents,
    for the base and for the refiner (bigG alone, 5 numbers: size, crop and the aesthetic score, 6.0 for the
    prompt and 2.5 for the unconditional half, as diffusers' call defaults; the empty negative prompt
    encoded, not zeroed, as the refiner's pipeline says)."""
    from sd_layouts import write_sdxl_refiner
    theirs, folder = sdxl
    if which == "refiner":
        theirs = write_sdxl_refiner(tmp_path)
        folder = tmp_path
    convert(str(folder / ("sdxl" if which == "base" else "refiner")), str(tmp_path / "model"), guidance=3.0)
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    if which == "refiner":
        assert pipe.text_encoder.dim == 48 and pipe.index.aesthetic == [6.0, 2.5]
        assert not pipe.text_encoder.cfg.zero_empty
        assert pipe.size_ids((1, 4, 16, 16), negative=True).tolist() == [[32, 32, 0, 0, 2.5]]
    init = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(3))
    z, info = pipe.sample(PROMPTS, steps=4, seed=0, init=init, strength=0.5)
    assert info["steps"] == 2 and info["nfe"] == 4
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(
        **{k: v for k, v in theirs.components.items() if k not in ("image_encoder", "feature_extractor")},
        requires_aesthetics_score=which == "refiner", force_zeros_for_empty_prompt=which == "base")
    with torch.no_grad():
        reference = on_our_grid(img2img)(PROMPTS, image=init, strength=0.5, num_inference_steps=4, guidance_scale=4.0,
                                         generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(pipe.decode(z) * 0.5 + 0.5, reference, atol=2e-4, rtol=0)


def test_training_stages_refuse_the_refiner_by_name(tmp_path, one_thread, mixed_aspect_folder):
    """The stages feed base-style numbers (size, crop, target size); the refiner's are (size, crop, score):
    stages 2 and 3 and the ControlNet stage say so instead of failing inside the U-Net."""
    from sd_layouts import write_sdxl_refiner
    from stage_scripts import load_stage
    write_sdxl_refiner(tmp_path)
    convert(str(tmp_path / "refiner"), str(tmp_path / "model"))
    root = Path(__file__).resolve().parents[2]
    with pytest.raises(ValueError, match="stage 3 does not take SDXL's refiner"):
        load_stage("distill").main(["--config", str(root / "configs" / "distill" / "tiny.yaml"),
                                    f"teacher={tmp_path / 'model'}", f"train.output_dir={tmp_path / 'run'}",
                                    f"model_out={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match="the ControlNet stage does not take SDXL's refiner"):
        load_stage("train_controlnet").main(["--config", str(root / "configs" / "controlnet" / "tiny.yaml"),
                                             f"model={tmp_path / 'model'}", f"train.output_dir={tmp_path / 'cn'}"])
    config = _sdxl_stage_two_config(tmp_path / "model", mixed_aspect_folder, tmp_path / "latent")
    with pytest.raises(ValueError, match="stage 2 trains SDXL base-style U-Nets"):
        load_stage("train_latent").main(["--config", str(config)])


def test_sdxl_inpainting_model_draws_what_diffusers_draws(tmp_path, one_thread):
    """An SDXL inpainting model (4 + 1 + 4 input channels, as diffusers/stable-diffusion-xl-1.0-inpainting-0.1)
    imported and run as diffusers' StableDiffusionXLInpaintPipeline runs it: the same latents from the same
    noise, mask and masked image, the size numbers passed through the inpainting inputs' wrapper."""
    theirs = write_sdxl_pipeline(tmp_path, unet_options={"in_channels": 9})
    convert(str(tmp_path / "sdxl"), str(tmp_path / "model"), guidance=3.0)
    pipe = TextToImage.from_folder(str(tmp_path / "model"), decoder_precision="fp32")
    assert pipe.inpainting_unet
    side = pipe.index.resolution
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, side, side, generator=g) * 2 - 1
    masks = torch.zeros(2, 1, side, side)
    masks[:, :, 4:20, 6:26] = 1
    extra = pipe.inpainting_inputs(images, masks)
    z, _ = pipe.sample(PROMPTS, steps=4, seed=0, inpaint=extra)
    noise = initial_noise(pipe.schedule, pipe.schedule.timesteps(4), pipe.latent_shape(2),
                          generator=torch.Generator().manual_seed(0))
    inpaint = on_our_grid(diffusers.StableDiffusionXLInpaintPipeline(**{
        k: v for k, v in theirs.components.items() if k not in ("image_encoder", "feature_extractor")}))
    with torch.no_grad():
        reference = inpaint(PROMPTS, image=images * 0.5 + 0.5, mask_image=masks, masked_image_latents=extra[:, 1:],
                            latents=noise, strength=1.0, num_inference_steps=4, guidance_scale=4.0, height=side,
                            width=side, output_type="latent").images
    torch.testing.assert_close(z, reference, atol=1e-4, rtol=1e-4)
