"""WebDataset tar shards (ldm/data/tar_shards.py, data.source=webdataset): shard names, the index, pixels equal
to the imagefolder source's on the same files, skipped samples, workers, and stage 2 trained from shards."""
import io
import json
import tarfile
import warnings

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from stage_scripts import load_stage

from ldm.data.loaders import DataConfig, build_dataset, resumable_loader
from ldm.data import tar_shards
from ldm.data.tar_shards import TarShards, expand_braces, shard_files
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.training import find_latest_checkpoint

TINY_LATENT = Path(__file__).resolve().parents[2] / "configs" / "latent" / "tiny.yaml"


def _encoded(image, fmt):
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _picture(i, size):
    """A flat picture with a stripe at its left edge: a crop or flip shows."""
    image = Image.new("RGB", size, (30 * i % 256, 100, 200 - 20 * i))
    image.paste((250, 250, 0), (0, 0, 3, size[1]))
    return image


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# (shard, [(member name, bytes)]) and the samples the index must hold: (key, image bytes, caption, control bytes)
@pytest.fixture
def shards(tmp_path):
    sizes = [(48, 32), (32, 32), (32, 48), (40, 24), (32, 32), (24, 40)]
    png = [_encoded(_picture(i, s), "PNG") for i, s in enumerate(sizes)]
    jpg = _encoded(_picture(9, (40, 32)), "JPEG")
    ctl = [_encoded(Image.new("L", s, 40 * i).convert("RGB"), "PNG") for i, s in enumerate(sizes)]
    text = str.encode
    layout = {
        "00000.tar": [
            ("000000.png", png[0]), ("000000.txt", text("a red circle\n")), ("000000.control.png", ctl[0]),
            ("000001.json", text(json.dumps({"caption": "from json", "url": "x"}))), ("000001.png", png[1]),
            ("000001.control.png", ctl[1]),
            ("000002.txt", text("caption before image")), ("000002.control.png", ctl[2]), ("000002.png", png[2]),
            ("000003.png", png[3]),                                                   # no caption
            ("000004.png", b"\x89PNG\r\n\x1a\n" + bytes(200)), ("000004.txt", text("corrupt")),
            ("000004.control.png", ctl[3]),
        ],
        "00001.tar": [
            ("a/b.c/000005.jpg", jpg), ("a/b.c/000005.txt", text("a dotted folder")),   # key a/b.c/000005
            ("a/b.c/000005.control.png", ctl[4]),
            ("000006.txt", text("no image")),
            ("000007.png", png[4]), ("000007.json", text(json.dumps({"url": "y"}))),   # json without a caption
            ("000008.png", png[5]), ("000008.txt", text("txt wins")),
            ("000008.json", text(json.dumps({"caption": "json loses"}))), ("000008.control.png", ctl[5]),
        ],
    }
    folder = tmp_path / "shards"
    folder.mkdir()
    for name, members in layout.items():
        _write_tar(folder / name, members)
    expected = [("000000", png[0], "a red circle", ctl[0]), ("000001", png[1], "from json", ctl[1]),
                ("000002", png[2], "caption before image", ctl[2]),
                ("000004", layout["00000.tar"][-3][1], "corrupt", ctl[3]),
                ("a/b.c/000005", jpg, "a dotted folder", ctl[4]), ("000008", png[5], "txt wins", ctl[5])]
    return folder, expected


def _image_folder(root, expected):
    """The same image files as an imagefolder (metadata.jsonl), in the index's order: an independent reader."""
    root.mkdir()
    rows = []
    for i, (_, image, caption, control) in enumerate(expected):
        (root / f"{i}.img").write_bytes(image)
        (root / f"{i}.ctl.png").write_bytes(control)
        rows.append(json.dumps({"file_name": f"{i}.img", "text": caption, "control": f"{i}.ctl.png"}) + "\n")
    (root / "metadata.jsonl").write_text("".join(rows))
    return root


def _build(cfg):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = build_dataset(cfg)
    return dataset, [str(w.message) for w in caught if "skipped" in str(w.message)]


def test_brace_ranges_lists_globs_and_folders_name_the_shards(shards, tmp_path):
    assert expand_braces("d/{00..02}.tar") == ["d/00.tar", "d/01.tar", "d/02.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]                   # unpadded
    assert expand_braces("{010..008}") == ["010", "009", "008"]                # padded, descending
    assert expand_braces("x{y,{z,w}v}") == ["xy", "xzv", "xwv"]                # nested
    assert expand_braces("{x}{1..2") == ["{x}{1..2"]                           # literal, unbalanced
    folder, _ = shards
    both = [str(folder / "00000.tar"), str(folder / "00001.tar")]
    assert shard_files(f"{folder}/{{00000..00001}}.tar") == both
    assert shard_files(f"{folder}/{{00001,00000}}.tar") == both[::-1]
    assert shard_files(f"{folder}/*.tar") == shard_files(str(folder)) == both
    with pytest.raises(FileNotFoundError, match="00002.tar"):                  # a missing shard is named
        shard_files(f"{folder}/{{00000..00002}}.tar")
    with pytest.raises(FileNotFoundError, match="no shards"):
        shard_files(f"{tmp_path}/*.tar")
    with tarfile.open(tmp_path / "packed.tar.gz", "w:gz") as tar:
        tar.add(folder / "00000.tar", arcname="x.txt")
    with pytest.raises(ValueError, match="gzip-compressed.*plain .tar"):
        TarShards(str(tmp_path / "packed.tar.gz"))


def test_the_index_holds_exactly_the_samples_and_counts_the_rest(shards):
    folder, expected = shards
    table = TarShards(f"{folder}/{{00000..00001}}.tar")
    assert list(table.keys) == [key for key, *_ in expected]
    for k, (key, image, caption, _) in enumerate(expected):
        value, text = table[k]
        assert value["bytes"] == image and text == caption, key
    assert table.describe_skipped() == ("skipped 3 of 9 samples: 2 without a caption (.txt or .json field 'text' "
                                        "or 'caption'), 1 without an image (.jpg/.jpeg/.png/.webp)")
    json_only = TarShards(str(folder), text_column="caption")                 # another column: .json only
    assert [json_only[k][1] for k in range(len(json_only))] == ["from json", "json loses"]
    controls = TarShards(str(folder), control_column="control")               # `control` finds .control.png
    assert [controls[k][2]["bytes"] for k in range(len(controls))] == [c for *_, c in expected]
    assert TarShards(str(folder), control_column="control.png").keys.tolist() == controls.keys.tolist()


@pytest.mark.parametrize("options", [dict(crop="random", flip=True), dict(buckets=True, bucket_step=8)],
                         ids=["random-crop-flip", "buckets"])
def test_items_equal_the_imagefolder_source_on_the_same_files(shards, tmp_path, options):
    folder, expected = shards
    common = dict(resolution=32, control_column="control", seed=5, **options)
    tars, tar_messages = _build(DataConfig(source="webdataset", path=f"{folder}/{{00000..00001}}.tar", **common))
    files, file_messages = _build(DataConfig(source="imagefolder", path=str(_image_folder(tmp_path / "f", expected)),
                                             **common))
    assert len(tars) == len(files) == 5                                        # the corrupt image skipped by both
    assert tar_messages[0].endswith("1 without an image (.jpg/.jpeg/.png/.webp)")
    assert [m.split(": ", 1)[1] for m in tar_messages[1:] + file_messages] == [
        "skipped 1 of 6 images that are unreadable, truncated or not images"] * 2
    assert tars.item_buckets == files.item_buckets and tars.buckets == files.buckets
    for epoch in (0, 1):
        tars.set_epoch(epoch), files.set_epoch(epoch)
        for k in range(len(tars)):
            a, b = tars[k], files[k]
            assert a.keys() == b.keys() == {"pixel_values", "size_ids", "text", "control"}
            assert a["text"] == b["text"]
            for key in ("pixel_values", "size_ids", "control"):
                assert torch.equal(a[key], b[key]), (k, key)
    if options.get("buckets"):
        assert [tuple(tars[k]["pixel_values"].shape[1:]) for k in range(5)] == [(24, 40), (32, 32), (40, 24),
                                                                                (32, 32), (40, 24)]


def test_two_workers_give_the_items_of_none(shards, monkeypatch):
    folder, _ = shards
    cfg = DataConfig(source="webdataset", path=str(folder), resolution=32, batch_size=2, drop_last=False,
                     crop="random")
    dataset, _ = _build(cfg)                     # verify opened the shards in this process: workers reopen
    batches = {}
    for workers in (0, 2):
        loader = resumable_loader(dataset, cfg, num_workers=workers)
        batches[workers] = [batch for _ in range(2) for batch in loader]      # two epochs
    assert len(batches[0]) == 6
    for a, b in zip(batches[0], batches[2], strict=True):
        assert a["text"] == b["text"] and torch.equal(a["pixel_values"], b["pixel_values"])
    # Another process (a forked worker: getpid differs) never reads through files this one opened.
    table = dataset.table
    inherited = list(table._files.values())
    assert inherited
    monkeypatch.setattr(tar_shards.os, "getpid", lambda: -1)
    assert table[0][1] == "a red circle"
    assert all(f.closed for f in inherited) and not {id(f) for f in table._files.values()} & set(map(id, inherited))


def test_missing_captions_everywhere_is_an_error_that_says_why(tmp_path):
    _write_tar(tmp_path / "only.tar", [("0.png", _encoded(_picture(0, (8, 8)), "PNG")), ("1.jpg", b"")])
    with pytest.raises(ValueError, match=r"no usable sample .*2 without a caption"):
        build_dataset(DataConfig(source="webdataset", path=str(tmp_path / "only.tar")))
    with pytest.raises(ValueError, match="data.image_column"):
        DataConfig(source="webdataset", path=str(tmp_path), image_column="png")
    with pytest.raises(FileNotFoundError, match="gone.tar' does not exist"):
        build_dataset(DataConfig(source="webdataset", path=str(tmp_path / "{only,gone}.tar")))


@pytest.mark.usefixtures("one_thread")
def test_stage_2_trains_from_shards_and_resumes_exactly(shards, tmp_path):
    """1 step, then --resume latest for the 2nd, equals 2 steps straight: the sampler's position in the shards
    is checkpointed (the shards' sample order and pixels are the same in both runs)."""
    torch.manual_seed(0)
    ae = tmp_path / "autoencoder"
    AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, z_channels=4,
                                    num_groups=4, mid_attn=False, resolution=32, scaling_factor=0.5)).save_pretrained(ae)
    folder, _ = shards
    stage = load_stage("train_latent")

    def run(out, *overrides):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # the fixture's skipped samples
            return stage.main(["--config", str(TINY_LATENT), f"autoencoder={ae}", f"train.output_dir={tmp_path / out}",
                               "data.source=webdataset", f"data.path={folder}/{{00000..00001}}.tar",
                               "data.crop=random", "train.max_steps=2", "train.checkpoint_every=1", *overrides])

    run("straight")
    run("resumed", "train.max_steps=1")
    run("resumed", "--resume", "latest")
    a, b = (load_file(str(find_latest_checkpoint(tmp_path / out) / "model.safetensors")) for out in ("straight", "resumed"))
    assert find_latest_checkpoint(tmp_path / "resumed").name == "checkpoint-000002"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cached = run("cached", "cache_latents=true", f"cache_dir={tmp_path / 'cache'}")   # latents encoded from the shards
    assert (cached / "unet" / "model.safetensors").is_file() and len(list((tmp_path / "cache").iterdir())) == 1
