"""stages/train_embedding.py: on a tiny random SD 1.x import only the new word's vectors train (every other row of
the token table, the U-Net and the autoencoder stay bit-identical; checkpoints hold the vectors alone), the loss on
the training pictures drops, resume is exact, and the file it writes gives, in diffusers' load_textual_inversion, the
text-encoder output and the image ours gives; on the shipped shapes model (scratch text encoder) the word loads,
draws through txt2img and passes the shapes-caption check. (Stage 2's former `ti` mode is this stage's now.)"""
from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from stage_scripts import load_stage

from ldm.models.from_diffusers import convert
from ldm.training import find_latest_checkpoint, load_config
from ldm.pipeline import DEFAULT_MODEL, TextToImage, embedding_words

ROOT = Path(__file__).resolve().parents[2]
stage = load_stage("train_embedding")
pytestmark = pytest.mark.usefixtures("one_thread_module")


def sd_layouts():
    """tests/models/sd_layouts.py (the tiny diffusers pipelines), registered as tests/models/conftest.py does."""
    if "sd_layouts" not in sys.modules:
        spec = importlib.util.spec_from_file_location("sd_layouts", ROOT / "tests" / "models" / "sd_layouts.py")
        sys.modules["sd_layouts"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["sd_layouts"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(our model folder, diffusers' pipeline folder, a folder of 4 uncaptioned 32 px pictures)."""
    root = tmp_path_factory.mktemp("sd")
    sd_layouts().write_sd_pipeline(root)
    convert(str(root / "sd"), str(root / "model"))
    pictures = root / "pictures"
    pictures.mkdir()
    for i in range(4):   # one "object": an orange disc on blue, in four places
        yy, xx = np.mgrid[:40, :40]
        disc = (yy - 12 - 4 * i) ** 2 + (xx - 20 + 3 * i) ** 2 < 80
        image = np.where(disc[..., None], [240, 130, 30], [40, 90, 220]).astype(np.uint8)
        Image.fromarray(image).save(pictures / f"{i}.png")
    return root / "model", root / "sd", pictures


def sd_args(sd, out: Path, *overrides: str) -> list[str]:
    model, _, pictures = sd
    return ["model=" + str(model), "data.source=imagefolder", f"data.path={pictures}", "data.resolution=32",
            "data.crop=random", "concept=''", 'templates=["a photo of {}", "a {}"]', "embedding.word=<w>",
            "embedding.init_word=cat", "embedding.vectors=2", "train.batch_size=2", "train.lr=0.05",
            f"train.output_dir={out}", "train.max_steps=4", "train.checkpoint_every=2", "train.validate_every=0",
            "train.tracker=none", "train.min_free_disk_gb=0", "val.steps=2", "val.images=2", *overrides]


def fixed_loss(pipe, words, vectors, pictures: torch.Tensor, prompt: str, draws: int = 8) -> float:
    """The stage's loss on `pictures` with the word's vectors set to `vectors`, over the same noise and times."""
    with torch.no_grad():
        words.vectors[0].copy_(vectors)
        z = pipe.autoencoder.encode_latents(pictures, sample=False)
        time = "discrete" if hasattr(pipe.schedule, "num_timesteps") else "continuous"
        loss_fn = stage.DiffusionLoss(pipe.schedule, pipe.index.prediction, time=time, time_scale=pipe.index.time_scale)
        cond = stage.conditioning(pipe, [prompt] * len(z), z)
        g = torch.Generator().manual_seed(0)
        return sum(loss_fn(pipe.unet, z, cond, generator=g).item() for _ in range(draws)) / draws


def test_only_the_word_trains_resume_is_exact_and_diffusers_reads_the_file(sd, tmp_path, monkeypatch):
    model, theirs_folder, _ = sd
    made = []                                              # (the stage's pipeline, its WordVectors) of each run

    def add_word(pipe, cfg, add=stage.add_word):
        made.append((pipe, add(pipe, cfg)))
        return made[-1][1]
    monkeypatch.setattr(stage, "add_word", add_word)
    straight = stage.main(sd_args(sd, tmp_path / "straight", "train.validate_every=4"))
    stage.main(sd_args(sd, tmp_path / "resumed", "train.max_steps=2"))
    resumed = stage.main(sd_args(sd, tmp_path / "resumed", "--resume", "latest"))
    assert straight.name == "learned_embeds.safetensors" and (tmp_path / "straight" / "samples" / "step-000004.png").is_file()
    learned = load_file(str(straight))
    assert list(learned) == ["<w>"] and learned["<w>"].shape == (2, 32)
    assert torch.equal(learned["<w>"], load_file(str(resumed))["<w>"])                    # 2 + 2 steps == 4
    with safe_open(str(straight), "pt") as f:
        assert f.metadata()["word"] == "<w>" and f.metadata()["init_word"] == "cat"
    checkpoint = load_file(str(find_latest_checkpoint(tmp_path / "resumed") / "model.safetensors"))
    assert list(checkpoint) == ["vectors.0"]                                             # the word's vectors only

    # Frozen means frozen: the trained pipeline's weights are the folder's, bit for bit; the table grew by the
    # word's 2 rows (still "cat", unused: the hook splices the vectors in) and kept every other row.
    (trained, words), fresh = made[0], TextToImage.from_folder(str(model))
    for a, b in ((trained.unet, fresh.unet), (trained.autoencoder, fresh.autoencoder)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    mine, theirs_state = trained.text_encoder.model.state_dict(), fresh.text_encoder.model.state_dict()
    for key, value in theirs_state.items():
        if "token_embedding" in key:
            cat = value[fresh.text_encoder.token_ids("cat")[0]]
            assert torch.equal(mine[key][:len(value)], value) and torch.equal(mine[key][len(value):], cat.expand(2, -1))
        else:
            assert torch.equal(mine[key], value), key
    assert (learned["<w>"] - cat).abs().max() > 0.05                                         # the vectors moved
    assert torch.equal(words.vectors[0].detach(), learned["<w>"])
    assert embedding_words(trained.text_encoder) == ["<w>"]                              # CLIP's, for check_prompts

    # The loss on the training pictures, on the same noise and times, is lower with the learnt vectors (the random
    # U-Net barely listens to its text: the shapes model below shows a clear drop).
    cfg = load_config(stage.EmbeddingStageConfig, stage.DEFAULT_CONFIG, sd_args(sd, tmp_path / "x", "data.crop=center"))
    pictures = torch.stack([stage.pictures(cfg)[i]["pixel_values"] for i in range(4)])
    before, after = (fixed_loss(trained, words, v, pictures, "a photo of <w>") for v in (cat.expand(2, -1), learned["<w>"]))
    assert after < before, (before, after)

    # Our loader: the word from the file's metadata; the text-encoder output and image diffusers' give.
    sd_layouts_ = sd_layouts()
    ours = TextToImage.from_folder(str(model), decoder_precision="fp32")
    assert ours.add_embedding(str(straight)) == ("<w>", 2)
    theirs = sd_layouts_.diffusers.StableDiffusionPipeline.from_pretrained(str(theirs_folder), safety_checker=None)
    theirs.load_textual_inversion(str(straight))
    prompt = "a photo of <w>"
    with torch.no_grad():
        context = ours.encode_prompts([prompt])["context"]
        reference, _ = theirs.encode_prompt(prompt, "cpu", 1, False)
    torch.testing.assert_close(context, reference, atol=1e-5, rtol=0)
    images, info = ours.generate([prompt], steps=3, seed=0, teacher=True)
    drawn = sd_layouts_.diffusers_images(theirs, ours, [prompt], 3, 1 + info["guidance"])
    torch.testing.assert_close(images * 0.5 + 0.5, drawn, atol=2e-4, rtol=0)
    with torch.no_grad():                                  # training's hook encodes as the loaded rows do
        torch.testing.assert_close(trained.encode_prompts([prompt])["context"], context, atol=1e-6, rtol=0)


def test_the_loss_on_the_shapes_pictures_drops(tmp_path):
    """On the same noise and times, by a clear margin: the shapes model taught "<zig>" for a large red circle from
    "square" in 10 steps."""
    out = stage.main(["--config", str(stage.DEFAULT_CONFIG), f"train.output_dir={tmp_path / 'shapes'}",
                      "train.max_steps=10", "train.batch_size=4", "train.lr=0.1", "train.validate_every=0", "embedding.vectors=1",
                      "train.checkpoint_every=10", "train.tracker=none", "train.min_free_disk_gb=0"])
    pipe = TextToImage.from_folder(DEFAULT_MODEL)
    words = stage.add_word(pipe, stage.WordConfig("<zig>", "square", 1))
    images = torch.stack([stage.ConceptScenes("a large red circle", 0, 1000, 64)[i]["pixel_values"] for i in range(8)])
    init = words.vectors[0].detach().clone()
    before, after = (fixed_loss(pipe, words, v, images, "a <zig>") for v in (init, load_file(str(out))["<zig>"]))
    assert after < 0.9 * before, (before, after)
    with warnings.catch_warnings():                        # the stage's own validation prompts: no caption warning
        warnings.simplefilter("error")
        pipe.check_prompts(["a <zig>", "a <zig> on the left"])


def test_a_shapes_word_loads_into_the_scratch_encoder_and_draws_through_txt2img(tmp_path, capsys):
    from ldm import txt2img
    out = stage.main(["--config", str(ROOT / "configs" / "embedding" / "shapes64.yaml"), f"train.output_dir={tmp_path}",
                      "train.max_steps=2", "train.batch_size=2", "train.validate_every=0", "train.tracker=none",
                      "train.min_free_disk_gb=0", "embedding.vectors=3", "train.lr=0.1"])
    vectors = load_file(str(out))["<zig>"]
    pipe = TextToImage.from_folder(DEFAULT_MODEL)
    table = pipe.text_encoder.token_embedding.weight.detach().clone()
    assert pipe.add_embedding(str(out)) == ("<zig>", 3)
    ids, _ = pipe.text_encoder.tokenize(["a <zig> on the left"])
    assert ids[0, :8].tolist() == [49406, 320, 49408, 49409, 49410, 525, 518, 1823]          # a, the word's 3, on ...
    grown = pipe.text_encoder.token_embedding.weight
    assert torch.equal(grown[:len(table)], table) and torch.equal(grown[len(table):], vectors)
    square = table[pipe.text_encoder.token_ids("square")[0]]
    assert (vectors - square).abs().max() > 0.1
    with pytest.raises(ValueError, match="already"):
        pipe.add_embedding(str(out))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        txt2img.main(["a <zig> on the left", "--embedding", str(out), "--teacher", "--steps", "2", "--out",
                      str(tmp_path / "zig.png")])
    assert not [w for w in caught if "shapes-world" in str(w.message)]                  # the word reads as a shape
    assert "embedding" in capsys.readouterr().out and Image.open(tmp_path / "zig.png").size == (64, 64)

    # The shapes-caption check reads an added word as some part of a shape; the rest of the prompt still counts.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.check_prompts(["a <zig> on the left", "a small blue <zig> at the top", "A  <zig>",
                            "a <zig> to the left of a green square on a black background"])
    for prompt in ("a <zig> riding a corgi", "a <zag> on the left"):                     # not shapes; unknown word
        with pytest.warns(UserWarning, match=f"'{prompt}' is not a shapes-world caption"):
            pipe.check_prompts([prompt])


@pytest.mark.parametrize("override, message", [
    ('templates=["a photo"]', "need {} for the word"),
    ("concept=a dog", "not a shapes-world caption"),
    ("concept=''", "set it"),
    ("embedding.word=two words", "one word without spaces"),
    ("train.ema_decay=0.9", None),
])
def test_bad_settings_are_named(tmp_path, capsys, override, message):
    args = ["--config", str(ROOT / "configs" / "embedding" / "shapes64.yaml"), f"train.output_dir={tmp_path}",
            "train.tracker=none", "train.min_free_disk_gb=0", override]
    if message is None:
        with pytest.raises(ValueError, match="keeps no EMA"):
            stage.main(args)
        return
    with pytest.raises(SystemExit):
        stage.main(args)
    assert message in capsys.readouterr().err


def test_init_words_of_several_tokens_and_encoders_without_token_tables_are_refused():
    pipe = TextToImage.from_folder(DEFAULT_MODEL)
    with pytest.raises(ValueError, match="is 3 tokens"):
        stage.add_word(pipe, stage.WordConfig("<zig>", "large red circle", 1))
    for kind in ("sd3", "flux"):                           # T5 beside CLIPs: refused by name, before anything runs
        with pytest.raises(ValueError, match=rf"needs a CLIP text encoder .*\({kind}\)"):
            stage.add_word(SimpleNamespace(text_kind=kind, text_encoder=object()), stage.WordConfig())


def test_every_caption_names_the_word(tmp_path):
    """No batch trains without the word (stage 2's former `ti` mode dropped captions for CFG and then had to train
    on with zero gradients; this stage drops none): a template per picture, or the data's own captions, each of
    which must name it."""
    def config(templates: str):
        return load_config(stage.EmbeddingStageConfig, stage.DEFAULT_CONFIG,
                           ["data.source=imagefolder", f"data.path={tmp_path}", "concept=''", f"templates={templates}"])
    templated, own = config('["a {}", "a {} on the left"]'), config("[]")
    torch.manual_seed(0)
    assert set(stage.captions({"text": [""] * 16}, templated)) == {"a <zig>", "a <zig> on the left"}
    assert stage.captions({"text": ["a <zig> on the left"]}, own) == ["a <zig> on the left"]
    with pytest.raises(ValueError, match="'a red circle' does not name '<zig>'"):
        stage.captions({"text": ["a <zig>", "a red circle"]}, own)


def test_presets_load():
    for name in ("shapes64", "sd15"):
        cfg = load_config(stage.EmbeddingStageConfig, ROOT / "configs" / "embedding" / f"{name}.yaml")
        assert cfg.data.batch_size == cfg.train.batch_size and "{}" in cfg.templates[0]
