"""Stage 2 (stages/train_latent.py) at tiny size: run, resume exactly, model folder, latent cache, dropout."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from stage_scripts import load_stage, record_losses, train_latent

from ldm.data.loaders import DataConfig, build_dataset
from ldm.data.shapes import export
from ldm.distill.student import WEmbedding
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.lora import MMDIT_TRAIN_TARGETS
from ldm.models.mmdit import MMDiT, MMDiTConfig
from ldm.models.text import ScratchTextEncoder, TextEncoderConfig
from ldm.models.unet import UNet, count_params, sdxl_config
from ldm.pipeline import TextToImage, load_index
from ldm.training import find_latest_checkpoint, load_config
from ldm.training.latent_cache import cache_key, open_or_build

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "latent"


stage = load_stage("train_latent")


pytestmark = pytest.mark.usefixtures("one_thread_module")


run = train_latent          # stages/train_latent.py on configs/latent/tiny.yaml (tests/stage_scripts.py)


def test_run_resume_is_exact_and_writes_a_model_folder(tiny_ae, tmp_path):
    cache = f"cache_dir={tmp_path / 'cache'}"
    common = ["cache_latents=true", cache, "train.max_steps=4", "p_uncond=0.5"]
    run(tiny_ae, tmp_path / "straight", *common)
    run(tiny_ae, tmp_path / "resumed", *common, "train.max_steps=2")
    assert find_latest_checkpoint(tmp_path / "resumed").name == "checkpoint-000002"
    folder = run(tiny_ae, tmp_path / "resumed", *common, "--resume", "latest")

    last = find_latest_checkpoint(tmp_path / "resumed")
    assert last.name == "checkpoint-000004"
    assert json.loads((last / "meta.json").read_text())["step"] == 4
    straight = find_latest_checkpoint(tmp_path / "straight")
    for name in ("model.safetensors", "ema.safetensors"):  # bit-for-bit: 2 + 2 steps == 4 steps
        a, b = load_file(str(straight / name)), load_file(str(last / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # One optimizer trains the U-Net and the scratch text encoder: every EMA-tracked
    # parameter received gradients (AdamW keeps state only for those).
    ema = load_file(str(last / "ema.safetensors"))
    adam = torch.load(last / "training_state.pt", weights_only=True)["optimizer"]["state"]
    assert any(k.startswith("text_encoder.") for k in ema) and len(adam) == len(ema)

    # The model folder holds the EMA weights, and generates through the public pipeline.
    unet = load_file(str(folder / "unet" / "model.safetensors"))
    assert all(torch.equal(unet[k], ema[f"unet.{k}"]) for k in unet)
    text = load_file(str(folder / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(text[k], ema[f"text_encoder.{k}"]) for k in text if f"text_encoder.{k}" in ema)
    index = load_index(str(folder))
    assert (index.prediction, index.schedule, index.time_scale, index.resolution) == \
        ("v", {"name": "cosine_logsnr"}, 1000.0, 32)
    pipe = TextToImage.from_folder(str(folder))
    images, info = pipe.generate(["a red circle", "a blue square"], steps=8, guidance=2.0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert info["nfe"] == 16


def test_init_from_a_model_folder_starts_from_its_weights(tiny_ae, tmp_path):
    common = ["cache_latents=true", f"cache_dir={tmp_path / 'cache'}"]
    first = run(tiny_ae, tmp_path / "first", *common, "train.max_steps=2")
    # lr 0: the weights (and so the EMA) stay at the loaded ones; the exported folder must equal the source.
    again = run(tiny_ae, tmp_path / "again", *common, "train.max_steps=1", "train.lr=0", f"init_from={first}")
    for part in ("unet", "text_encoder"):
        a = load_file(str(first / part / "model.safetensors"))
        b = load_file(str(again / part / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    fresh = run(tiny_ae, tmp_path / "fresh", *common, "train.max_steps=1", "train.lr=0")
    a, b = (load_file(str(f / "unet" / "model.safetensors")) for f in (first, fresh))
    assert not all(torch.equal(a[k], b[k]) for k in a)              # the test can tell the difference
    with pytest.raises(ValueError, match="does not fit"):             # another architecture: named keys
        run(tiny_ae, tmp_path / "wide", *common, "train.max_steps=1", f"init_from={first}",
            "unet.channels=[32,64]")


def test_lora_fine_tune_trains_only_the_updates(tiny_ae, tmp_path, capsys):
    """lora.rank > 0: only the low-rank updates train; the folder holds them merged, and the LoRA file
    beside it, merged into the source model, draws the same images."""
    common = ["cache_latents=true", f"cache_dir={tmp_path / 'cache'}", "train.ema_decay=0"]
    first = run(tiny_ae, tmp_path / "first", *common, "train.max_steps=2")
    with pytest.raises(SystemExit):
        run(tiny_ae, tmp_path / "none", *common, "lora.rank=2")
    assert "lora.rank > 0 fine-tunes a trained U-Net: set init_from" in capsys.readouterr().err
    lora = [*common, f"init_from={first}", "lora.rank=2", "lora.alpha=4", "train.lr=1e-2"]
    run(tiny_ae, tmp_path / "lora", *lora, "train.max_steps=2")
    folder = run(tiny_ae, tmp_path / "lora", *lora, "train.max_steps=3", "--resume", "latest")
    straight = run(tiny_ae, tmp_path / "straight", *lora, "train.max_steps=3")
    last = find_latest_checkpoint(tmp_path / "lora")
    adam = torch.load(last / "training_state.pt", weights_only=True)["optimizer"]["state"]
    n = 4 * 2 * 4                                                   # transformer blocks (down 1, mid 1, up 2)
    assert last.name == "checkpoint-000003" and len(adam) == 2 * n  # x 2 attentions x 4 projections; A and B
    saved = load_file(str(last / "model.safetensors"))              # the updates only: the base is init_from's
    assert len(saved) == 2 * n and all(k.endswith(("lora_A", "lora_B")) for k in saved)
    a, b = (load_file(str(f / "unet" / "model.safetensors")) for f in (folder, straight))
    assert all(torch.equal(a[k], b[k]) for k in a)                  # 2 + 1 steps == 3 steps
    with pytest.raises(ValueError, match="model.lora: .* in checkpoint vs absent now"):  # nor a full run
        run(tiny_ae, tmp_path / "lora", *common, f"init_from={first}", "train.max_steps=4", "--resume", "latest")
    base, tuned = (load_file(str(f / "unet" / "model.safetensors")) for f in (first, folder))
    assert base.keys() == tuned.keys()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.weight")) for k in changed)
    a, b = (load_file(str(f / "text_encoder" / "model.safetensors")) for f in (first, folder))
    assert all(torch.equal(a[k], b[k]) for k in a)                   # frozen, scratch encoder included
    source = TextToImage.from_folder(str(first))
    assert source.add_lora(str(tmp_path / "lora" / "lora.safetensors")) == n
    images = [p.generate(["a red circle"], steps=3, guidance=2.0)[0] for p in (source, TextToImage.from_folder(str(folder)))]
    torch.testing.assert_close(images[0], images[1], atol=1e-5, rtol=0)


def test_frozen_scratch_text_encoder_stays_at_its_init(tiny_ae, tmp_path):
    """train_text_encoder=false: the scratch encoder is exported exactly as it started (same seed,
    same random init as a trained run's), while the U-Net trains."""
    common = ["cache_latents=true", f"cache_dir={tmp_path / 'cache'}", "train.max_steps=2", "train.ema_decay=0"]
    frozen = run(tiny_ae, tmp_path / "frozen", *common, "train_text_encoder=false")
    start = run(tiny_ae, tmp_path / "start", *common, "train.lr=0")
    trained = run(tiny_ae, tmp_path / "trained", *common)
    text = {f: load_file(str(f / "text_encoder" / "model.safetensors")) for f in (frozen, start, trained)}
    assert all(torch.equal(text[frozen][k], text[start][k]) for k in text[start])
    assert not all(torch.equal(text[trained][k], text[start][k]) for k in text[start])  # it can tell
    unet = {f: load_file(str(f / "unet" / "model.safetensors")) for f in (frozen, start)}
    assert not all(torch.equal(unet[frozen][k], unet[start][k]) for k in unet[start])


def test_init_from_adds_zero_position_embeddings(tiny_ae, tmp_path):
    """unet.pos_embed=true on a folder trained without it: the run starts as that model (lr 0
    exports its weights unchanged, plus all-zero position projections) and generates the same."""
    common = ["cache_latents=true", f"cache_dir={tmp_path / 'cache'}"]
    first = run(tiny_ae, tmp_path / "first", *common, "train.max_steps=2")
    pos = run(tiny_ae, tmp_path / "pos", *common, "train.max_steps=1", "train.lr=0", f"init_from={first}",
              "unet.pos_embed=true")
    a = load_file(str(first / "unet" / "model.safetensors"))
    b = load_file(str(pos / "unet" / "model.safetensors"))
    new = sorted(set(b) - set(a))
    assert new and all(".pos_proj." in k for k in new) and all(not b[k].any() for k in new)
    assert all(torch.equal(a[k], b[k]) for k in a)
    images = [TextToImage.from_folder(str(f)).generate(["a red circle on the left"], steps=4, guidance=2.0,
                                                       seed=0)[0] for f in (first, pos)]
    torch.testing.assert_close(images[0], images[1])


def test_on_the_fly_latents_and_validation_grid(tiny_ae, tmp_path, capsys):
    run(tiny_ae, tmp_path, "train.max_steps=2", "train.validate_every=1", "train.ema_decay=0", "val.score=3")
    scores = json.loads((tmp_path / "samples" / "step-000001-score.json").read_text())
    assert scores["prompts"] == 3 and 0 <= scores["accuracy"] <= 1 and scores["fd"] > 0   # the oracle's verdict
    unscored = run(tiny_ae, tmp_path / "unscored", "train.max_steps=2", "train.validate_every=1", "train.ema_decay=0")
    a, b = (load_file(str(f / "unet" / "model.safetensors")) for f in (tmp_path / "model", unscored))
    assert all(torch.equal(a[k], b[k]) for k in a)                                          # the training RNG untouched
    with pytest.raises(SystemExit):
        run(tiny_ae, tmp_path / "bad", "val.score=3", "data.source=imagefolder", f"data.path={tmp_path}")
    assert "val.score needs data.source=shapes" in capsys.readouterr().err
    grid = tmp_path / "samples" / "step-000001.png"
    from PIL import Image
    # rows = the 2 guidance weights, columns = the 2 prompts: 2 x (32 + 2 px padding) + 2
    assert Image.open(grid).size == (70, 70)
    assert (tmp_path / "model" / "model_index.json").is_file()
    assert not (tmp_path / "latent-cache").exists()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random 2-layer CLIPTextModel folder with a CLIPTokenizer written from open_clip's BPE."""
    import open_clip
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("clip")
    bpe = open_clip.get_tokenizer("ViT-B-32")
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (root / "vocab.json").write_text(json.dumps({special.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (root / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(bpe.encoder), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=bpe.sot_token_id,
                            eos_token_id=bpe.eot_token_id, pad_token_id=bpe.eot_token_id)
    CLIPTextModel(config).save_pretrained(root)
    return root


def test_frozen_clip_is_named_not_trained(tiny_ae, tiny_clip, tmp_path):
    folder = run(tiny_ae, tmp_path, "text.kind=clip", f"text.path={tiny_clip}", "train.max_steps=1")
    weights = load_file(str(find_latest_checkpoint(tmp_path) / "model.safetensors"))
    assert weights and all(k.startswith("unet.") for k in weights)   # CLIP is neither saved nor trained
    saved = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert (saved["kind"], saved["path"]) == ("clip", str(tiny_clip))
    assert not (folder / "text_encoder" / "model.safetensors").exists()
    images, _ = TextToImage.from_folder(str(folder)).generate(["a red circle"], steps=2, guidance=1.0)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_latent_cache_hit_miss_and_invalidation(tiny_ae, tmp_path):
    ae = AutoencoderKL.from_pretrained(tiny_ae)
    data = DataConfig(source="shapes", resolution=32, length=5, batch_size=2, seed=3)
    cache, hit = open_or_build(tmp_path, tiny_ae, data, ae, shard_size=2, progress=False)
    assert not hit and len(cache) == 5 and len(list(cache.folder.glob("shard-*"))) == 3

    # Against the autoencoder run directly on the same images.
    items = [build_dataset(data)[i] for i in range(5)]
    with torch.no_grad():
        posterior = ae.encode(torch.stack([it["pixel_values"] for it in items]))
    torch.testing.assert_close(cache.mean, posterior.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache.std, posterior.std, rtol=1e-5, atol=1e-6)
    assert cache.captions == [it["text"] for it in items]

    again, hit = open_or_build(tmp_path, tiny_ae, dataclasses.replace(data, batch_size=4), ae)
    assert hit and again.folder == cache.folder       # batching alone never rebuilds

    _, hit = open_or_build(tmp_path, tiny_ae, dataclasses.replace(data, seed=4), ae, progress=False)
    assert not hit                                     # other data

    with torch.no_grad():
        next(ae.parameters()).add_(0.01)
    ae.save_pretrained(tiny_ae.parent / "ae2")
    _, hit = open_or_build(tmp_path, tiny_ae.parent / "ae2", data, ae, progress=False)
    assert not hit                                     # other autoencoder weights
    assert len([p for p in tmp_path.iterdir() if (p / "meta.json").is_file()]) == 3


def test_an_interrupted_cache_build_resumes_from_its_shards(tiny_ae, tmp_path, monkeypatch):
    """A build killed after its first shard keeps that shard and encodes only the others next time; the cache
    equals one built straight. A .tmp from another shard size is started afresh."""
    from ldm.training import latent_cache
    ae = AutoencoderKL.from_pretrained(tiny_ae)
    data = DataConfig(source="shapes", resolution=32, length=5, batch_size=2, seed=3)
    straight, _ = open_or_build(tmp_path / "straight", tiny_ae, data, ae, shard_size=2, progress=False)
    encode, encoded = latent_cache._encode_shard, []

    def dies_after_one(ae, dataset, indices, *args):
        if encoded:
            raise KeyboardInterrupt
        encoded.append(indices)
        encode(ae, dataset, indices, *args)

    monkeypatch.setattr(latent_cache, "_encode_shard", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        open_or_build(tmp_path / "resumed", tiny_ae, data, ae, shard_size=2, progress=False)
    tmp = next((tmp_path / "resumed").glob("*.tmp"))
    assert sorted(p.name for p in tmp.glob("shard-*")) == ["shard-00000.safetensors"]
    (tmp / "shard-00001.safetensors.tmp").write_bytes(b"cut off")    # a write the kill interrupted

    def counts(ae, dataset, indices, *args):
        encoded.append(indices)
        encode(ae, dataset, indices, *args)

    monkeypatch.setattr(latent_cache, "_encode_shard", counts)
    resumed, hit = open_or_build(tmp_path / "resumed", tiny_ae, data, ae, shard_size=2, progress=False)
    assert not hit and encoded == [range(0, 2), range(2, 4), range(4, 5)] and not tmp.exists()
    assert torch.equal(resumed.mean, straight.mean) and resumed.captions == straight.captions
    assert sorted(p.name for p in resumed.folder.iterdir()) == ["meta.json", *(f"shard-0000{k}.safetensors"
                                                                              for k in range(3))]

    encoded.clear()   # a stale .tmp of another plan is not trusted
    other = dataclasses.replace(data, seed=4)
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(latent_cache, "_encode_shard", dies_after_one)
        open_or_build(tmp_path / "plan", tiny_ae, other, ae, shard_size=2, progress=False)
    encoded.clear()
    monkeypatch.setattr(latent_cache, "_encode_shard", counts)
    open_or_build(tmp_path / "plan", tiny_ae, other, ae, shard_size=3, progress=False)
    assert encoded == [range(0, 3), range(3, 5)]


def test_cache_key_follows_local_files(tiny_ae, tmp_path):
    export(tmp_path / "imgs", 2, progress=False)
    data = DataConfig(source="imagefolder", path=str(tmp_path / "imgs"), resolution=32)
    key, _ = cache_key(tiny_ae, data)
    assert cache_key(tiny_ae, data)[0] == key
    meta = tmp_path / "imgs" / "metadata.jsonl"
    meta.write_text(meta.read_text().replace("a ", "an ", 1))
    assert cache_key(tiny_ae, data)[0] != key
    # tar shards: the files the pattern names, so a rewritten shard is a new cache
    import tarfile
    for i in range(2):
        with tarfile.open(tmp_path / f"s{i}.tar", "w") as tar:
            tar.add(tmp_path / "imgs" / "metadata.jsonl", arcname="000000.txt")
    shards = DataConfig(source="webdataset", path=str(tmp_path / "s{0..1}.tar"), resolution=32)
    key = cache_key(tiny_ae, shards)[0]
    assert cache_key(tiny_ae, shards)[0] == key
    with tarfile.open(tmp_path / "s1.tar", "w") as tar:
        tar.add(tmp_path / "imgs" / "metadata.jsonl", arcname="000001.txt")
    assert cache_key(tiny_ae, shards)[0] != key


def test_caption_dropout_rate_is_p_uncond_and_seeded():
    captions = ["a red circle"] * 20000
    dropped = stage.drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    rate = dropped.count("") / len(captions)
    assert abs(rate - 0.1) < 0.006                     # 3 sigma of a binomial(20000, 0.1) rate is 0.0064
    assert set(dropped) == {"", "a red circle"}
    assert stage.drop_captions(captions, 0.1, torch.Generator().manual_seed(0)) == dropped
    assert stage.drop_captions(captions[:100], 0.0) == captions[:100]


def test_presets_load_and_shapes64_fits_the_budget():
    for name in ("tiny", "shapes64", "shapes64-mmdit", "sd15", "sdxl-lora", "sd3-lora"):
        load_config(stage.LatentStageConfig, CONFIGS / f"{name}.yaml")
    assert load_config(stage.LatentStageConfig, CONFIGS / "sdxl-lora.yaml").unet == sdxl_config()
    sd3 = load_config(stage.LatentStageConfig, CONFIGS / "sd3-lora.yaml")          # SD3 medium, its LoRA script's layers
    assert sd3.network is sd3.mmdit and sd3.mmdit == MMDiTConfig() and sd3.lora.targets == list(MMDIT_TRAIN_TARGETS)
    assert load_config(stage.LatentStageConfig, CONFIGS / "sdxl-lora.yaml").lora.targets == ["to_q", "to_k", "to_v",
                                                                                             "to_out"]
    cfg = load_config(stage.LatentStageConfig, CONFIGS / "shapes64.yaml")
    unet = count_params(UNet(cfg.unet))
    assert unet <= 5_000_000 and cfg.text.width == 128 and cfg.unet.context_dim == 128
    text = count_params(ScratchTextEncoder(TextEncoderConfig(**vars(cfg.text))))
    w_embedding = count_params(WEmbedding(64, cfg.unet.time_embed_dim))
    fp16_mb = 2 * (5 * unet + 4 * w_embedding + text) / 1e6  # teacher + 4 students + text encoder
    assert fp16_mb < 56, f"{fp16_mb:.1f} MB leaves too little of 60 MB for the autoencoder"


def test_bad_key_is_named(capsys):
    with pytest.raises(SystemExit):
        stage.main(["--config", str(CONFIGS / "tiny.yaml"), "unet.chanels=[8]"])
    assert "unet.chanels" in capsys.readouterr().err


def test_textual_inversion_keys_point_to_the_embedding_stage(tmp_path, capsys):
    """Stage 2's ti.* keys are gone (stages/train_embedding.py learns words): an override or a preset that still
    sets one fails before training, naming the key and where it went."""
    preset = tmp_path / "old.yaml"
    preset.write_text((CONFIGS / "tiny.yaml").read_text() + "ti:\n  word: <w>\n  vectors: 2\n")
    for args in (["--config", str(CONFIGS / "tiny.yaml"), "ti.word=<w>"], ["--config", str(preset)]):
        with pytest.raises(SystemExit):
            stage.main([*args, f"train.output_dir={tmp_path / 'run'}"])
        assert "config key 'ti.word': textual inversion moved to stages/train_embedding.py" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_older_config_with_ti_switched_off_still_loads(tmp_path):
    """Stage-2 runs of 2026-12-06 saved a `ti` section with word "" (off) in their config.yaml: it loads as before."""
    from ldm.training.config import load_config
    saved = tmp_path / "config.yaml"
    saved.write_text((CONFIGS / "tiny.yaml").read_text() + "ti:\n  word: ''\n  init_word: '*'\n  vectors: 1\n"
                     "  template: ''\n")
    cfg = load_config(stage.LatentStageConfig, str(saved), [])
    assert cfg == load_config(stage.LatentStageConfig, str(CONFIGS / "tiny.yaml"), [])


@pytest.mark.parametrize("override, key", [("diffusion.time_shift=-2", "diffusion.time_shift="),
                                           ("diffusion.time_shift_share=2", "diffusion.time_shift_share="),
                                           ("diffusion.noise_offset=-1", "noise_offset=-1")])
def test_bad_time_shift_is_named(capsys, override, key):
    with pytest.raises(SystemExit):
        stage.main(["--config", str(CONFIGS / "tiny.yaml"), override])
    assert key in capsys.readouterr().err


@pytest.mark.parametrize("override, key", [("diffusion.loss_type=huberr", "config key 'diffusion.loss_type'"),
                                           ("diffusion.huber_schedule=linear", "config key 'diffusion.huber_schedule'"),
                                           ("diffusion.huber_c=0", "diffusion.huber_c=0.0"),
                                           ("diffusion.huber_c=0.3", "diffusion.huber_c set with diffusion.loss_type='l2'")])
def test_bad_robust_loss_is_named(capsys, override, key):
    with pytest.raises(SystemExit):
        stage.main(["--config", str(CONFIGS / "tiny.yaml"), override])
    assert key in capsys.readouterr().err


@pytest.mark.parametrize("overrides, key", [
    (["diffusion.multires_noise_iterations=-2"], "diffusion.multires_noise_iterations=-2"),
    (["diffusion.multires_noise_iterations=1.5"], "config key 'diffusion.multires_noise_iterations'"),
    (["diffusion.multires_noise_iterations=6", "diffusion.multires_noise_discount=2"],
     "diffusion.multires_noise_discount=2.0"),
    (["diffusion.multires_noise_discount=0.5"], "diffusion.multires_noise_discount set with"),
    (["diffusion.weighting=debiassed"], "config key 'diffusion.weighting'")])
def test_bad_multires_noise_and_weighting_are_named(capsys, overrides, key):
    with pytest.raises(SystemExit):
        stage.main(["--config", str(CONFIGS / "tiny.yaml"), *overrides])
    assert key in capsys.readouterr().err


def test_a_huber_run_completes_and_trains_on_the_same_draws_below_l2(tiny_ae, tmp_path, monkeypatch):
    """diffusion.loss_type=huber (Khrapov et al. 2024, scheduled c) runs stage 2 end to end: the same seed draws the
    same data, times and noise, so its first loss is pseudo-Huber's 2c (sqrt(d^2 + c^2) - c) <= d^2 of l2's residuals
    (below it), and the model folder samples."""
    losses = record_losses(monkeypatch, stage)
    run(tiny_ae, tmp_path / "l2", "train.max_steps=1")
    first = len(losses)
    folder = run(tiny_ae, tmp_path / "huber", "train.max_steps=3", "diffusion.loss_type=huber",
                 "diffusion.huber_schedule=exponential", "diffusion.huber_c=0.2")
    assert 0 < losses[first] < losses[0] and all(math.isfinite(v) for v in losses)
    saved = load_config(stage.LatentStageConfig, str(tmp_path / "huber" / "config.yaml"), [])
    assert (saved.diffusion.loss_type, saved.diffusion.huber_schedule, saved.diffusion.huber_c) == \
        ("huber", "exponential", 0.2)
    images, _ = TextToImage.from_folder(str(folder)).generate(["a red circle"], steps=2)
    assert bool(torch.isfinite(images).all())


ZERO_SNR = ["diffusion.schedule=scaled_linear", "diffusion.schedule_options={zero_snr: true}", "diffusion.time=discrete",
            "diffusion.time_scale=1", "diffusion.time_shift_share=1"]


def test_zero_terminal_snr_trains_v_and_refuses_eps(tiny_ae, tmp_path, capsys):
    """Lin et al. 2024: a zero-terminal-SNR schedule trains a v model (the last step sees pure noise) and
    samples it; eps prediction is refused by its key before anything runs."""
    with pytest.raises(SystemExit):
        run(tiny_ae, tmp_path / "eps", *ZERO_SNR, "diffusion.prediction=eps")
    assert "config section 'diffusion': a zero-terminal-SNR schedule needs prediction 'v'" in capsys.readouterr().err
    folder = run(tiny_ae, tmp_path / "v", *ZERO_SNR, "diffusion.prediction=v", "train.max_steps=2",
                 "train.validate_every=2", "train.ema_decay=0", "diffusion.noise_offset=0.1",
                 "diffusion.input_perturbation=0.1", "diffusion.multires_noise_iterations=2",
                 "diffusion.weighting=debiased")   # the training tricks run with it too
    from ldm.pipeline import TextToImage
    pipe = TextToImage.from_folder(str(folder))
    assert pipe.index.schedule == {"name": "scaled_linear", "zero_snr": True} and pipe.schedule.zero_terminal_snr
    images, _ = pipe.generate(["a red circle"], steps=3, sampler="dpmpp_2m")
    assert bool(torch.isfinite(images).all()) and (tmp_path / "v" / "samples" / "step-000002.png").is_file()


def test_aspect_ratio_buckets_train_from_images_and_from_the_cache(tiny_ae, tmp_path, mixed_aspect_folder):
    """Wide, square and tall pictures in their own buckets (40x24, 32x32, 24x40), on the fly and cached."""
    images = mixed_aspect_folder
    data = ["data.source=imagefolder", f"data.path={images}", "data.buckets=true", "data.bucket_step=8"]
    for cached in ("false", "true"):
        folder = run(tiny_ae, tmp_path / f"run-{cached}", *data, f"cache_latents={cached}", "train.max_steps=3")
        assert (folder / "unet" / "model.safetensors").is_file()
    cache = next((tmp_path / "run-true" / "latent-cache").iterdir())
    assert json.loads((cache / "meta.json").read_text())["buckets"] == [[40, 24], [32, 32], [24, 40]]
    with pytest.raises(ValueError, match="data.bucket_step=6 is not divisible by 4"):
        run(tiny_ae, tmp_path / "bad", *data[:-1], "data.bucket_step=6")


def test_dreambooth_prior_draws_the_class_once_and_resumes_exactly(tiny_ae, tmp_path, capsys):
    """prior.class_prompt (Ruiz et al. 2023): the class pictures are the init model's own drawings, seed i for
    image i; they are drawn once; the class loader's position is checkpointed (1 + 2 steps == 3 steps)."""
    import numpy as np
    from PIL import Image
    first = run(tiny_ae, tmp_path / "first", "train.max_steps=2")
    prior = [f"init_from={first}", "prior.class_prompt=a red circle", "prior.class_images=3", "prior.steps=2",
             "train.checkpoint_every=1"]
    straight = run(tiny_ae, tmp_path / "straight", *prior)
    run(tiny_ae, tmp_path / "resumed", *prior, "train.max_steps=1")
    resumed = run(tiny_ae, tmp_path / "resumed", *prior, "--resume", "latest")
    a, b = (load_file(str(f / "unet" / "model.safetensors")) for f in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = run(tiny_ae, tmp_path / "plain", f"init_from={first}", "train.checkpoint_every=1")
    c = load_file(str(plain / "unet" / "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)              # the class loss changed the training

    folder = tmp_path / "straight" / "class-images"
    pipe = TextToImage.from_folder(str(first))
    drawn, _ = pipe.generate(["a red circle"] * 3, steps=2, seed=[0, 1, 2], teacher=True)
    want = ((drawn.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(3):
        assert np.array_equal(np.asarray(Image.open(folder / f"{i:05d}.png")), want[i])
    stamp = (folder / "00000.png").stat().st_mtime_ns
    run(tiny_ae, tmp_path / "straight", *prior, "train.max_steps=4", "--resume", "latest")
    assert (folder / "00000.png").stat().st_mtime_ns == stamp       # drawn once
    with pytest.raises(SystemExit):
        run(tiny_ae, tmp_path / "bad", "prior.class_prompt=a red circle")
    assert "prior.class_prompt" in capsys.readouterr().err


def test_rectified_flow_trains_and_samples(tiny_ae, tmp_path, capsys):
    """SD3's objective (Esser et al. 2024): flow velocity on the straight path, logit-normal times, and the
    schedule's grid shift recorded in the model folder, which samples with every kind of sampler."""
    rf = ["diffusion.schedule=rectified_flow", "diffusion.schedule_options={shift: 2.0}", "diffusion.prediction=flow",
          "diffusion.time=logit_normal", "diffusion.logit_std=0.8"]
    for bad, message in (("diffusion.prediction=eps", "zero-terminal-SNR schedule needs prediction"),
                         ("diffusion.logit_std=-1", "diffusion.logit_std=-1")):
        with pytest.raises(SystemExit):
            run(tiny_ae, tmp_path / "bad", *rf, bad)
        assert message in capsys.readouterr().err
    folder = run(tiny_ae, tmp_path / "rf", *rf, "train.max_steps=2", "train.validate_every=2")
    assert (tmp_path / "rf" / "samples" / "step-000002.png").is_file()
    pipe = TextToImage.from_folder(str(folder))
    assert (pipe.index.prediction, pipe.index.schedule) == ("flow", {"name": "rectified_flow", "shift": 2.0})
    torch.testing.assert_close(pipe.schedule.timesteps(2)[:-1], torch.tensor([1.0, 2 / 3], dtype=torch.float64))
    for sampler in ("ddim", "dpmpp_2m", "euler_a", "heun"):
        images, _ = pipe.generate(["a red circle"], steps=3, guidance=2.0, sampler=sampler)
        assert images.shape == (1, 3, 32, 32) and bool(torch.isfinite(images).all()), sampler


TINY_MMDIT = ["net=mmdit", "mmdit={in_channels: 4, out_channels: 4, patch_size: 2, depth: 2, num_heads: 2, head_dim: 16, "
              "context_dim: 32, caption_dim: 32, pooled_dim: 0, pos_embed_max_size: 8, sample_size: 16}"]


def test_an_mmdit_trains_from_scratch_with_the_scratch_text_encoder(tiny_ae, tmp_path, monkeypatch):
    """net=mmdit, pooled_dim=0: SD3's transformer on the shapes world, trained jointly with the scratch text encoder
    (no pooled text; the padding masked); 2 + 2 steps resume to exactly 4, and the folder draws through txt2img."""
    from ldm import txt2img
    losses = record_losses(monkeypatch, stage)
    common = [*TINY_MMDIT, "cache_latents=true", f"cache_dir={tmp_path / 'cache'}", "train.max_steps=4"]
    run(tiny_ae, tmp_path / "straight", *common)
    run(tiny_ae, tmp_path / "resumed", *common, "train.max_steps=2")
    folder = run(tiny_ae, tmp_path / "resumed", *common, "--resume", "latest")
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[4:] == losses[:4]                                   # the resumed run drew the same times and noise
    a, b = (load_file(str(find_latest_checkpoint(tmp_path / f) / "model.safetensors")) for f in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("text_encoder.") for k in a) and not any(".pooled_embed." in k for k in a)
    config = json.loads((folder / "unet" / "config.json").read_text())
    assert (config["kind"], config["pooled_dim"], config["depth"]) == ("mmdit", 0, 2)

    out = tmp_path / "circle.png"
    txt2img.main(["a red circle", "--model", str(folder), "--steps", "2", "--out", str(out)])
    assert out.is_file()
    with pytest.raises(ValueError, match=r"mmdit.pooled_dim=8 .* must be the pooled width \(0; 0 = no pooled text\) "
                       r"and the token width \(32\) of text.kind=scratch"):     # the scratch encoder has none
        run(tiny_ae, tmp_path / "bad", *TINY_MMDIT, "mmdit.pooled_dim=8")


def test_shapes64_mmdit_preset_is_about_the_unets_size():
    """configs/latent/shapes64-mmdit.yaml: shapes64 with an MMDiT of about the U-Net's parameters in its place."""
    unet = load_config(stage.LatentStageConfig, CONFIGS / "shapes64.yaml")
    mmdit = load_config(stage.LatentStageConfig, CONFIGS / "shapes64-mmdit.yaml")
    assert mmdit.net == "mmdit" and count_params(MMDiT(mmdit.mmdit)) == 4_028_048     # the header's numbers
    assert count_params(UNet(unet.unet)) == 3_849_268
    same = ("text", "diffusion", "data", "val", "p_uncond", "latents", "guidance", "autoencoder")
    assert all(getattr(mmdit, key) == getattr(unet, key) for key in same)
    assert dataclasses.replace(mmdit.train, output_dir="") == dataclasses.replace(unet.train, output_dir="")
