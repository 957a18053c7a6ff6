"""build_dataset / make_dataloader on local fixtures: sources, preprocessing, bad input, resume."""
import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.loaders import DataConfig, build_dataset, make_dataloader
from ldm.data.transforms import preprocess

RED, BLUE = (200, 30, 30), (30, 30, 200)


def _png_bytes(image, fmt="PNG"):
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _good_images():
    """(file name, image, caption, expected RGB at the output centre) in many modes."""
    halves = Image.new("RGB", (128, 64), RED)
    halves.paste(BLUE, (64, 0, 128, 64))  # left red, right blue: checks the crop
    p_mode = Image.new("P", (70, 90), 3)
    p_mode.putpalette([0, 0, 0] * 3 + [10, 200, 90] + [0, 0, 0] * 252)
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # fully transparent: white, not black
    return [
        ("halves.png", halves, "left red, right blue", None),
        ("gray.png", Image.new("L", (64, 80), 100), "", (100, 100, 100)),
        ("palette.png", p_mode, "Größe ünïcödé 形", (10, 200, 90)),
        ("clear.png", clear, "transparent", (255, 255, 255)),
        ("photo.jpg", Image.new("RGB", (96, 96), (60, 120, 180)), "a jpeg", (60, 120, 180)),
    ]


def _bad_files(folder):
    """Broken files the loader must skip and count: returns their names."""
    good = _png_bytes(Image.new("RGB", (64, 64), RED))
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "text.png").write_text("this is not an image")
    (folder / "noise.jpg").write_bytes(bytes(range(256)) * 4)
    (folder / "notes.txt").write_text("a caption file that is not an image")
    return ["truncated.png", "text.png", "noise.jpg", "notes.txt", "missing.png"]


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    rows = []
    for name, image, text, _ in _good_images():
        image.save(folder / "sub" / name)
        rows.append({"file_name": f"sub/{name}", "text": text})
    rows += [{"file_name": name, "text": "broken"} for name in _bad_files(folder)]
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return folder


def _build_quietly(cfg):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_dataset(cfg)
    return ds, [str(w.message) for w in caught if "skipped" in str(w.message)]


def test_imagefolder_skips_and_counts_bad_files_and_converts_modes(image_folder):
    ds, messages = _build_quietly(DataConfig(source="imagefolder", path=str(image_folder)))
    assert len(messages) == 1 and "skipped 5 of 10" in messages[0]
    assert str(image_folder) in messages[0]
    items = [ds[i] for i in range(len(ds))]
    assert [it["text"] for it in items] == [t for _, _, t, _ in _good_images()]
    for item, (name, _, _, rgb) in zip(items, _good_images()):
        x = item["pixel_values"]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert -1 <= x.min() and x.max() <= 1
        if rgb is not None:
            centre = ((x[:, 32, 32] + 1) * 127.5).round()
            tol = 3 if name.endswith(".jpg") else 0
            assert (centre - torch.tensor(rgb, dtype=torch.float32)).abs().max() <= tol, name
    # 128x64 -> shorter side already 64 -> center crop keeps columns 32..95: red | blue
    halves = ((items[0]["pixel_values"] + 1) * 127.5).round()
    assert (halves[:, :, :32] == torch.tensor(RED, dtype=torch.float32)[:, None, None]).all()
    assert (halves[:, :, 32:] == torch.tensor(BLUE, dtype=torch.float32)[:, None, None]).all()


def test_preprocess_resizes_shorter_side_and_random_crop_stays_inside():
    image = Image.new("RGB", (300, 200), (0, 0, 0))
    image.paste((255, 255, 255), (100, 0, 200, 200))  # white middle third
    x = preprocess(image, 64, "center")
    assert x.shape == (3, 64, 64)
    # scale 0.32: white spans columns 32..64 of 96; the center crop (16..80) shows 16..48 white
    assert (x[:, :, 20:44] > 0.95).all() and (x[:, :, :12] < -0.95).all()
    rng = np.random.default_rng(0)
    crops = {tuple(preprocess(image, 64, "random", rng=rng)[0, 0, ::8].tolist()) for _ in range(20)}
    assert len(crops) > 1  # random crops move
    flipped = preprocess(image.crop((0, 0, 200, 200)), 64, flip=True, rng=np.random.default_rng(3))
    plain = preprocess(image.crop((0, 0, 200, 200)), 64)
    assert torch.equal(flipped, plain) or torch.equal(flipped, plain.flip(-1))


@pytest.mark.parametrize("crop, flip", [("center", False), ("random", False), ("random", True)])
def test_size_ids_are_the_original_size_and_where_the_crop_sits(crop, flip):
    """SDXL's numbers of a picture (original height, width, crop top, left): the crop corner is found
    independently, by matching the returned pixels against PIL's own resize of the picture, flipped
    when the picture came out flipped."""
    gradient = np.tile(np.arange(100, dtype=np.uint8)[None, :, None] * 2, (60, 1, 3))   # 100 x 60, columns differ
    gradient[..., 1] = np.arange(60, dtype=np.uint8)[:, None] * 4                         # rows differ
    image = Image.fromarray(gradient)
    lefts, flips = set(), 0
    for seed in range(6):
        pixels, ids = preprocess(image, 32, crop, flip, np.random.default_rng(seed), size_ids=True)
        resized = np.asarray(image.resize((53, 32), Image.Resampling.BICUBIC, reducing_gap=3.0)).astype(np.int16)
        got = np.rint((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.int16)
        flipped = not np.array_equal(got, resized[:, int(ids[3]):int(ids[3]) + 32])
        if flipped:                                          # the corner is the flipped picture's
            resized = resized[:, ::-1]
        top, left = int(ids[2]), int(ids[3])
        assert ids[:2].tolist() == [60.0, 100.0] and top == 0 and 0 <= left <= 21
        assert np.array_equal(got, resized[top:top + 32, left:left + 32])
        lefts.add(left)
        flips += flipped
    assert lefts == {10} if crop == "center" else len(lefts) > 1
    assert (flips > 0) == flip


def test_parquet_with_custom_columns_and_broken_bytes(tmp_path):
    import datasets
    images = [Image.new("RGB", (64, 64), c) for c in (RED, BLUE, (5, 6, 7))]
    table = datasets.Dataset.from_dict({
        "picture": [{"bytes": _png_bytes(im), "path": None} for im in images]
        + [{"bytes": b"\x89PNG broken", "path": None}],
        "caption": ["red", "blue", "", "broken"],
        "extra": [1, 2, 3, 4],
    }).cast_column("picture", datasets.Image())
    table.to_parquet(str(tmp_path / "part-0.parquet"))
    cfg = DataConfig(source="parquet", path=str(tmp_path), image_column="picture",
                     text_column="caption")
    ds, messages = _build_quietly(cfg)
    assert len(messages) == 1 and "skipped 1 of 4" in messages[0]
    assert [ds[i]["text"] for i in range(len(ds))] == ["red", "blue", ""]
    for i, image in enumerate(images):
        expected = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(ds[i]["pixel_values"], expected, rtol=0, atol=1e-6)
    # a "hub" name that is a local folder goes through the same datasets path
    hub = build_dataset(DataConfig(source="hub", path=str(tmp_path), image_column="picture",
                                   text_column="caption", verify=False))
    assert len(hub) == 4 and hub[1]["text"] == "blue"

    with pytest.raises(ValueError) as err:
        build_dataset(DataConfig(source="parquet", path=str(tmp_path), image_column="picture"))
    message = str(err.value)
    assert "'text'" in message and "picture" in message and "caption" in message
    assert "extra" in message


def test_missing_text_key_in_metadata_names_the_columns(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "x"}))
    with pytest.raises(ValueError, match=r"'text'.*\['file_name', 'prompt'\]"):
        build_dataset(DataConfig(source="imagefolder", path=str(tmp_path)))
    (tmp_path / "metadata.jsonl").unlink()
    with pytest.raises(ValueError, match="columns found"):
        build_dataset(DataConfig(source="imagefolder", path=str(tmp_path)))


def test_empty_missing_and_all_broken_data_name_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no usable image") as err:
        build_dataset(DataConfig(source="imagefolder", path=str(empty)))
    assert str(empty) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset(DataConfig(source="parquet", path=str(tmp_path / "nowhere")))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_text("nope")
    (broken / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "t"}))
    with pytest.raises(ValueError, match="no usable image") as err:
        build_dataset(DataConfig(source="imagefolder", path=str(broken)))
    assert str(broken) in str(err.value)


@pytest.mark.parametrize("key,value", [("source", "csv"), ("crop", "top"), ("split", "test")])
def test_bad_config_values_are_named(key, value):
    with pytest.raises(ValueError, match=f"{key}.*{value}"):
        DataConfig(**{key: value})


def test_shapes_with_flip_is_refused():
    with pytest.raises(ValueError, match="flip"):
        DataConfig(source="shapes", flip=True)


def _ids(batch):
    return [(t, round(float(p.sum()), 3)) for t, p in zip(batch["text"], batch["pixel_values"])]


def test_shapes_loader_order_is_seeded_and_resumes_with_the_next_batch():
    cfg = DataConfig(source="shapes", length=24, batch_size=4, seed=1)
    loader = make_dataloader(cfg)
    assert len(loader) == 6
    epoch0 = [_ids(b) for b in loader]
    epoch1 = [_ids(b) for b in loader]
    assert epoch0 != epoch1 and sorted(sum(epoch0, [])) == sorted(sum(epoch1, []))
    assert [_ids(b) for b in make_dataloader(cfg)] == epoch0  # same seed, same order

    for target in [(0, 3), (0, 6), (1, 2)]:
        run = make_dataloader(cfg)
        batches, consumed = run.forever(), 0
        while tuple(run.state_dict().values()) != target:
            next(batches)
            consumed += 1
        state = json.loads(json.dumps(run.state_dict()))  # as a checkpoint stores it
        expected = (epoch0 + epoch1)[consumed:consumed + 3]
        resumed = make_dataloader(cfg)
        resumed.load_state_dict(state)
        got = []
        for batch in resumed.forever():
            got.append(_ids(batch))
            if len(got) == 3:
                break
        assert got == expected, target


def test_multi_worker_random_crops_are_deterministic_and_resume(image_folder):
    cfg = DataConfig(source="imagefolder", path=str(image_folder), crop="random", flip=True,
                     resolution=48, batch_size=2, num_workers=2, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = make_dataloader(cfg)
        again = make_dataloader(cfg)
    first = [b["pixel_values"] for b in loader] + [b["pixel_values"] for b in loader]
    second = [b["pixel_values"] for b in again] + [b["pixel_values"] for b in again]
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and len(first) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = make_dataloader(cfg)
    resumed.load_state_dict({"epoch": 1, "batch": 1})
    assert torch.equal(next(iter(resumed))["pixel_values"], first[3])


def test_accelerate_prepared_loader_resumes():
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    cfg = DataConfig(source="shapes", length=12, batch_size=3, seed=2)
    plain = [_ids(b) for b in make_dataloader(cfg)]
    prepared = make_dataloader(cfg, accelerator)
    assert [_ids(b) for b in prepared] == plain
    resumed = make_dataloader(cfg, accelerator)
    resumed.load_state_dict({"epoch": 0, "batch": 2})
    assert [_ids(b) for b in resumed] == plain[2:]
    assert prepared.state_dict() == {"epoch": 1, "batch": 0}


def test_data_config_rejects_a_bad_p_zone_by_name():
    with pytest.raises(ValueError, match="data.p_zone"):
        DataConfig(p_zone=1.5)


def test_corrupt_captions_swap_a_fixed_share_for_other_items_captions():
    """data.corrupt_captions: about that share of the items carry another item's caption, the same ones at every build
    (a data set with wrong labels, not noise per view), pictures untouched; held-out shapes stay clean; 0 keeps the
    latent cache keys of before the option existed."""
    import dataclasses

    from ldm.data.shapes import generate
    from ldm.training.latent_cache import data_fingerprint
    cfg = DataConfig(source="shapes", resolution=32, length=2000, corrupt_captions=0.3, seed=3)
    data, again = build_dataset(cfg), build_dataset(cfg)
    own = [generate(3, i, "train", 32)[1] for i in range(cfg.length)]       # each scene's true caption
    donors = [data.donor(i) for i in range(cfg.length)]
    hit = [i for i, d in enumerate(donors) if d is not None]
    assert abs(len(hit) / cfg.length - 0.3) < 4 * (0.3 * 0.7 / cfg.length) ** 0.5     # binomial, 4 sigma
    assert all(d != i for i, d in enumerate(donors) if d is not None) and donors == [again.donor(i) for i in
                                                                                      range(cfg.length)]
    for i in [*hit[:20], 0, 1, 2]:
        item, clean = data[i], build_dataset(dataclasses.replace(cfg, corrupt_captions=0.0))[i]
        assert item["text"] == own[donors[i]] if donors[i] is not None else item["text"] == own[i]
        assert torch.equal(item["pixel_values"], clean["pixel_values"])
    heldout = build_dataset(dataclasses.replace(cfg, split="heldout", length=50))
    assert [heldout[i]["text"] for i in range(50)] == [generate(3, i, "heldout", 32)[1] for i in range(50)]
    assert "corrupt_captions" not in data_fingerprint(dataclasses.replace(cfg, corrupt_captions=0.0))
    assert data_fingerprint(cfg)["corrupt_captions"] == 0.3
    with pytest.raises(ValueError, match="data.corrupt_captions"):
        DataConfig(corrupt_captions=1.0)
