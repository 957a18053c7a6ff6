"""Aspect-ratio buckets (ldm/data/buckets.py) and upright images: sizes by closed form, whole pictures,
seeded order, resume, two-process sharding through accelerate, bucketed latent caches."""
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.buckets import BucketBatchSampler, assign_buckets, bucket_sizes
from ldm.data.loaders import DataConfig, build_dataset, check_image_multiple, make_dataloader, resumable_loader
from ldm.data.transforms import image_size, open_image

RED, BLUE, GRAY = (220, 20, 20), (20, 20, 220), (128, 128, 128)


def test_bucket_sizes_match_the_hand_computed_list_and_their_rules():
    # 512^2 px, sides multiples of 64, at most 2:1 -- worked by hand: width 384 -> height 262144 // 384 = 682
    # -> 640; 448 -> 576; 512 -> 512; 320 -> 768 is 2.4:1, out; 704 -> 320 is 2.2:1, out.
    assert bucket_sizes(512, 64, 2.0) == [(640, 384), (576, 448), (512, 512), (448, 576), (384, 640)]
    for resolution, step, ratio in [(512, 64, 2.0), (1024, 64, 4.0), (768, 32, 3.0), (64, 8, 2.5), (100, 16, 1.5)]:
        sizes, area = bucket_sizes(resolution, step, ratio), resolution ** 2
        assert sizes == sorted({(h, w) for w, h in sizes}, key=lambda s: s[1] / s[0])  # mirror-symmetric
        for w, h in sizes:
            assert w % step == 0 and h % step == 0 and w * h <= area
            assert (w + step) * h > area and w * (h + step) > area                      # no side could grow
            assert max(w / h, h / w) <= ratio
        assert len({w / h for w, h in sizes}) == len(sizes)
    with pytest.raises(ValueError, match="step"):
        bucket_sizes(64, 128)


def test_each_image_goes_to_the_bucket_nearest_in_log_aspect():
    buckets = bucket_sizes(512, 64, 2.0)
    sizes = [(1000, 500), (300, 400), (777, 777), (100, 1000), (590, 430)]
    want = [min(range(len(buckets)), key=lambda k: abs(math.log(w / h) - math.log(buckets[k][0] / buckets[k][1])))
            for w, h in sizes]
    assert assign_buckets(sizes, buckets) == want == [0, 3, 2, 4, 1]


def _edges(width, height):
    """Gray with a 4-px red stripe down the left edge and a blue one down the right: lost by any side crop."""
    image = Image.new("RGB", (width, height), GRAY)
    image.paste(RED, (0, 0, 4, height))
    image.paste(BLUE, (width - 4, 0, width, height))
    return image


SIZES = {"wide": (80, 48), "square": (64, 64), "tall": (48, 80)}   # the 64-px, step-16 buckets at ratio 2


@pytest.fixture
def mixed_folder(tmp_path):
    """4 wide, 4 square and 2 tall pictures at twice their bucket's size (plus one broken file)."""
    tmp_path = tmp_path / "images"
    tmp_path.mkdir()
    rows = []
    for kind, count in (("wide", 4), ("square", 4), ("tall", 2)):
        w, h = SIZES[kind]
        for i in range(count):
            name = f"{kind}{i}.png"
            _edges(2 * w, 2 * h).save(tmp_path / name)
            rows.append({"file_name": name, "text": f"{kind} {i}"})
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows.append({"file_name": "broken.png", "text": "broken"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _config(folder, **kw):
    return DataConfig(**{"source": "imagefolder", "path": str(folder), "resolution": 64, "buckets": True,
                         "bucket_step": 16, "batch_size": 2, "seed": 7, **kw})


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_batches_hold_whole_pictures_of_one_bucket_and_every_image_once(mixed_folder):
    assert bucket_sizes(64, 16, 2.0) == list(SIZES.values())
    loader = _quiet(make_dataloader, _config(mixed_folder))
    epochs = [list(loader), list(loader)]
    for batches in epochs:
        assert len(batches) == 5
        seen = []
        for batch in batches:
            kinds = {t.split()[0] for t in batch["text"]}
            assert len(kinds) == 1
            w, h = SIZES[kinds.pop()]
            assert batch["pixel_values"].shape == (2, 3, h, w)
            # the whole picture: both edge stripes survive (a square crop of a wide one loses them)
            left, right = batch["pixel_values"][:, :, :, 0], batch["pixel_values"][:, :, :, -1]
            assert (left[:, 0] > 0.5).all() and (left[:, 2] < -0.5).all()
            assert (right[:, 2] > 0.5).all() and (right[:, 0] < -0.5).all()
            seen += batch["text"]
        assert sorted(seen) == sorted(f"{k} {i}" for k, n in (("wide", 4), ("square", 4), ("tall", 2))
                                      for i in range(n))
    assert [b["text"] for b in epochs[0]] != [b["text"] for b in epochs[1]]   # a new order per epoch
    again = _quiet(make_dataloader, _config(mixed_folder))
    assert [b["text"] for b in again] == [b["text"] for b in epochs[0]]       # the same per seed


def test_bucketed_loader_resumes_with_the_next_batch(mixed_folder):
    cfg = _config(mixed_folder, crop="random")
    plain = _quiet(make_dataloader, cfg)
    order = [(b["text"], b["pixel_values"]) for b in plain] + [(b["text"], b["pixel_values"]) for b in plain]
    for state in ({"epoch": 0, "batch": 3}, {"epoch": 1, "batch": 1}):
        resumed = _quiet(make_dataloader, cfg)
        resumed.load_state_dict(json.loads(json.dumps(state)))
        got = [(b["text"], b["pixel_values"]) for _, b in zip(range(3), resumed.forever())]
        start = 5 * state["epoch"] + state["batch"]
        for (text, pixels), (want_text, want_pixels) in zip(got, order[start:start + 3]):
            assert text == want_text and torch.equal(pixels, want_pixels)


class _Shard:
    """What accelerate.prepare does to a DataLoader on process `index` of 2 (its real prepare_data_loader)."""

    num_processes = 2

    def __init__(self, index):
        self.index = index

    def prepare(self, loader):
        from accelerate.data_loader import prepare_data_loader
        return prepare_data_loader(loader, num_processes=2, process_index=self.index, put_on_device=False)


def test_two_processes_split_the_bucket_order_and_resume_together(mixed_folder):
    cfg = _config(mixed_folder)
    dataset = _quiet(build_dataset, cfg)
    order = [b["text"] for b in resumable_loader(dataset, cfg)]       # one process: 5 batches
    shards = [resumable_loader(dataset, cfg, _Shard(i)) for i in range(2)]
    local = [[b["text"] for b in shard] for shard in shards]
    assert local[0] == order[0:4:2] and local[1] == order[1:4:2]       # 5th batch: not on both, dropped
    for shard in shards:
        shard.load_state_dict({"epoch": 0, "batch": 1})
    assert [[b["text"] for b in shard] for shard in shards] == [[order[2]], [order[3]]]


def test_small_buckets_warn_and_bad_settings_are_named(mixed_folder):
    with pytest.warns(UserWarning, match="2 of 10 images are in buckets smaller than a batch"):
        make_dataloader(_config(mixed_folder, batch_size=3))
    for kw, key in [({"bucket_step": 128}, "data.bucket_step"), ({"bucket_max_ratio": 0.5}, "data.bucket_max_ratio"),
                    ({"drop_last": False}, "data.drop_last"), ({"source": "shapes", "path": ""}, "data.buckets")]:
        with pytest.raises(ValueError, match=key):
            _config(mixed_folder, **kw)
    with pytest.raises(ValueError, match="data.bucket_step=16 is not divisible by 32"):
        check_image_multiple(_config(mixed_folder), 32, "test")
    check_image_multiple(_config(mixed_folder), 16, "test")


def test_exif_orientation_is_applied(tmp_path):
    """A camera's portrait: stored on its side with EXIF orientation 6 (turn 90 degrees clockwise to view)."""
    upright = Image.new("RGB", (40, 60), RED)
    upright.paste(BLUE, (0, 30, 40, 60))                     # red top, blue bottom
    stored = upright.transpose(Image.Transpose.ROTATE_90)    # counter-clockwise: 60 x 40 on disk
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "photo.jpg", quality=95, exif=exif)
    assert Image.open(tmp_path / "photo.jpg").size == (60, 40)
    image = open_image(tmp_path / "photo.jpg")
    assert image.size == (40, 60) == image_size(tmp_path / "photo.jpg")
    pixels = np.asarray(image).astype(int)
    assert abs(pixels[5, 20] - RED).max() < 30 and abs(pixels[55, 20] - BLUE).max() < 30
    from ldm.cli import load_image                            # img2img / inpaint inputs, upright too
    tensor = load_image(str(tmp_path / "photo.jpg"), (40, 60))
    assert tensor.shape == (1, 3, 60, 40) and tensor[0, 0, 5, 20] > 0.5 and tensor[0, 2, 55, 20] > 0.5


def test_sixteen_bit_grayscale_keeps_its_levels(tmp_path):
    """A 16-bit grayscale PNG (how depth estimators save depth maps, a ControlNet's or T2I-Adapter's image): its
    levels scaled to 8 bits, as RGB and as L (PIL's convert clips every value above 255 to white)."""
    ramp = np.linspace(0, 65535, 64 * 16).reshape(16, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "depth.png")
    for mode in ("RGB", "L"):
        pixels = np.asarray(open_image(tmp_path / "depth.png", mode=mode)).astype(int)
        expected = np.round(ramp / 257).astype(int)
        assert abs(pixels.reshape(16, 64, -1) - expected[..., None]).max() <= 1, mode


def test_bucketed_latent_cache_equals_the_autoencoder_per_bucket(mixed_folder, tmp_path):
    from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from ldm.training.latent_cache import make_cache_loader, open_or_build

    torch.manual_seed(0)
    ae_cfg = AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, z_channels=4,
                               num_groups=4, mid_attn=False, resolution=32)
    folder = tmp_path / "ae"
    AutoencoderKL(ae_cfg).save_pretrained(folder)
    ae = AutoencoderKL.from_pretrained(folder)
    cfg = _config(mixed_folder)
    cache, hit = _quiet(open_or_build, tmp_path / "cache", folder, cfg, ae, shard_size=4, progress=False)
    dataset = _quiet(build_dataset, cfg)
    assert not hit and len(cache) == 10 and cache.item_buckets == dataset.item_buckets
    with torch.no_grad():
        for i in range(10):
            item = dataset[i]
            posterior = ae.encode(item["pixel_values"][None])
            torch.testing.assert_close(cache[i]["mean"], posterior.mean[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(cache[i]["std"], posterior.std[0], rtol=1e-5, atol=1e-6)
            assert cache[i]["text"] == item["text"]
    batches = list(make_cache_loader(cache, cfg))
    assert len(batches) == 5 and {tuple(b["mean"].shape[-2:]) for b in batches} == {(24, 40), (32, 32), (40, 24)}
    square = _quiet(open_or_build, tmp_path / "cache", folder, DataConfig(
        source="imagefolder", path=str(mixed_folder), resolution=32, batch_size=2), ae)[0]
    assert square.item_buckets is None and square.mean.shape == (10, 4, 16, 16)


def test_bucket_sampler_len_counts_full_batches_after_a_start():
    sampler = BucketBatchSampler(list(range(11)), [0] * 5 + [1] * 6, batch_size=2)
    assert len(sampler) == 2 + 3
    sampler.start = 2
    assert len(sampler) == 3 and len(list(sampler)) == 3 and len(sampler) == 5
