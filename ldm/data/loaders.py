"""One entry point for the training stages: `make_dataloader(DataConfig, accelerator)`.

Sources: the shapes world rendered on the fly ("shapes"), a local image folder with
metadata.jsonl ("imagefolder", e.g. an exported shapes folder), parquet/arrow files with
an image and a text column ("parquet", read through `datasets`), a `datasets` hub
name ("hub"), or WebDataset tar shards ("webdataset", `data/{00000..00999}.tar`, indexed and read
by seeking: ldm/data/tar_shards.py). Every item is {"pixel_values": float (3, R, R) in [-1, 1], "text": str}
(the shapes world adds its labels; image data sets add "size_ids", SDXL's original size and crop
corner of the picture, ldm.data.transforms.preprocess). With `buckets` on, pixel_values are (3, H, W) in
aspect-ratio buckets of about R^2 pixels, one bucket per batch (ldm/data/buckets.py). With
`control_column` set, items add "control" (3, H, W) in [0, 1]: that column's image, cropped and
flipped with the picture (ControlNet training).

Broken images are found once, up front (`verify`): each is decoded, and unreadable,
truncated or non-image files are skipped with one warning that gives their count.
Images are read upright: an EXIF orientation (camera photos) is applied.

Order and resumption: `EpochSampler` draws a fixed permutation per (seed, epoch), and
crops/flips are keyed on (seed, epoch, index), so a run is reproducible. The returned
`ResumableLoader` counts the batches it handed out; save its `state_dict()` with the
checkpoint and `load_state_dict()` it on resume: the next batch is the one that would
have come next. It wraps the Accelerate-prepared loader, so no `skip_first_batches`
is needed (the sampler starts mid-epoch instead of loading and dropping batches).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ldm.data.buckets import BucketBatchSampler, assign_buckets, bucket_sizes, describe
from ldm.data.captions import P_ZONE
from ldm.data.edits import ShapesEdits
from ldm.data.shapes import SPLITS, ShapesWorld
from ldm.data.tar_shards import TarShards
from ldm.data.transforms import CROPS, DECODE_ERRORS, image_size, open_image, preprocess

logger = logging.getLogger(__name__)

SOURCES = ("shapes", "shapes-edits", "imagefolder", "parquet", "hub", "webdataset")
SHAPES_SOURCES = ("shapes", "shapes-edits")   # generated on the fly: no path, a split, no flips
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class DataConfig:
    """Where training images and captions come from and how they are prepared."""

    source: str = "shapes"       # shapes | shapes-edits (InstructPix2Pix triples) | imagefolder | parquet | hub |
                                 # webdataset
    path: str = ""               # folder, parquet file/folder/glob, hub name, or tar shards ({000..099}, glob, folder)
    image_column: str = "image"  # parquet/hub column holding the image
    text_column: str = "text"    # column (or metadata.jsonl key, .json field) holding the caption
    control_column: str = ""     # column/key (tar shards: member extension) of a control image per row; "" = none
    resolution: int = 64         # output side; the shorter side is resized to it
    crop: str = "center"         # center | random
    flip: bool = False           # off by default: a mirror falsifies "left of" captions
    batch_size: Optional[int] = None  # per process; None: the stage's train.batch_size
    num_workers: int = 0         # DataLoader worker processes
    seed: int = 0                # order and crops; for shapes also the world's stream
    split: str = "train"         # shapes: train | heldout; hub: the datasets split name
    length: int = 100_000        # shapes: samples per epoch
    p_zone: float = P_ZONE       # shapes: share of one-object captions naming the zone (curricula)
    verify: bool = True          # decode every image once up front to skip broken ones
    drop_last: bool = True       # every batch full: steady shapes for compiled models
    buckets: bool = False        # aspect-ratio buckets: whole pictures of ~resolution^2 pixels, not square crops
    bucket_step: int = 64        # bucket sides are multiples of this: the autoencoder's x the U-Net's downsampling
    bucket_max_ratio: float = 2.0  # the longest bucket side over its shortest
    corrupt_captions: float = 0.0  # share of items given another item's caption, fixed per (seed, index): a data set
                                   # with wrong labels for robustness experiments (docs/eval/huber-loss); not heldout

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {SOURCES}, got {self.source!r}")
        if self.crop not in CROPS:
            raise ValueError(f"data.crop must be one of {CROPS}, got {self.crop!r}")
        for key in ("resolution", "batch_size", "length"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.p_zone <= 1.0:
            raise ValueError(f"data.p_zone must be in [0, 1], got {self.p_zone}")
        if not 0.0 <= self.corrupt_captions < 1.0:
            raise ValueError(f"data.corrupt_captions must be in [0, 1), got {self.corrupt_captions}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.buckets:
            if self.source in SHAPES_SOURCES:
                raise ValueError("data.buckets: the shapes world is square; buckets are for imagefolder, "
                                 "parquet and hub data")
            if not 1 <= self.bucket_step <= self.resolution:
                raise ValueError(f"data.bucket_step must be in [1, data.resolution={self.resolution}], "
                                 f"got {self.bucket_step}")
            if self.bucket_max_ratio < 1:
                raise ValueError(f"data.bucket_max_ratio must be >= 1, got {self.bucket_max_ratio}")
            if not self.drop_last:  # accelerate's sharding only takes full batches when they can differ in shape
                raise ValueError("data.buckets needs data.drop_last=true")
        if self.source in SHAPES_SOURCES:
            if self.split not in SPLITS:
                raise ValueError(f"data.split must be one of {tuple(SPLITS)} for shapes, "
                                 f"got {self.split!r}")
            if self.flip:
                raise ValueError("data.flip=True with source 'shapes' would make "
                                 "'left'/'right' captions false")
            if self.control_column:
                raise ValueError("data.control_column: the shapes world has no control images "
                                 "(compute them: stages/train_controlnet.py hint=edges)")
        elif not self.path:
            raise ValueError(f"data.path is required for source {self.source!r}")
        if self.source == "webdataset" and self.image_column != "image":
            raise ValueError("data.image_column: a tar shard's image is each sample's .jpg, .jpeg, .png or .webp "
                             "member; control images: data.control_column=EXTENSION")


def check_image_multiple(cfg: DataConfig, multiple: int, why: str) -> None:
    """Refuse image sides the models cannot take: the square side and every bucket side must divide by `multiple`."""
    if cfg.resolution % multiple:
        raise ValueError(f"data.resolution={cfg.resolution} is not divisible by {multiple} ({why})")
    if cfg.buckets and cfg.bucket_step % multiple:
        raise ValueError(f"data.bucket_step={cfg.bucket_step} is not divisible by {multiple} ({why}): "
                         f"bucket sides are multiples of it")


# ------------------------------------------------------------------- image-text data

class ImageTextDataset(Dataset):
    """Captioned images from a table of (image value, text) rows, decoded lazily.

    `sizes`, the upright (width, height) of each row, puts the items in aspect-ratio buckets:
    `buckets` lists the (width, height) sizes, `item_buckets` the bucket of each item.
    """

    def __init__(self, table, rows: list[int], cfg: DataConfig, root: str | None = None,
                 sizes: list[tuple[int, int]] | None = None):
        self.table, self.rows, self.cfg, self.root = table, rows, cfg, root
        self.epoch = 0
        self.buckets = self.item_buckets = None
        if sizes is not None:
            self.buckets = bucket_sizes(cfg.resolution, cfg.bucket_step, cfg.bucket_max_ratio)
            self.item_buckets = assign_buckets(sizes, self.buckets)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # keys the random crop/flip, so every epoch draws new ones

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        value, text, *control = self.table[self.rows[index]]
        try:
            image = open_image(value, self.root)
            control = open_image(control[0], self.root) if control else None
        except DECODE_ERRORS as err:  # it decoded during verify: the file changed since
            raise OSError(f"cannot read image {_describe(value)}: {err}") from err
        key = [self.cfg.seed, self.epoch, index]
        size = self.cfg.resolution if self.buckets is None else self.buckets[self.item_buckets[index]]
        pixels, size_ids = preprocess(image, size, self.cfg.crop, self.cfg.flip, np.random.default_rng(key),
                                      size_ids=True)
        item = {"pixel_values": pixels, "size_ids": size_ids, "text": "" if text is None else str(text)}
        if control is not None:  # the same crop and flip as the picture (the same draws at the same size), in [0, 1]
            control = control.resize(image.size, Image.Resampling.BICUBIC) if control.size != image.size else control
            item["control"] = (preprocess(control, size, self.cfg.crop, self.cfg.flip, np.random.default_rng(key)) + 1) / 2
        return item


class _HFTable:
    """(image value, text) rows of a `datasets.Dataset` whose images are left undecoded."""

    def __init__(self, ds, image_column: str, text_column: str, control_column: str = ""):
        self.ds, self.image_column, self.text_column = ds, image_column, text_column
        self.control_column = control_column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, k: int):
        row = self.ds[int(k)]
        if self.control_column:
            return row[self.image_column], row[self.text_column], row[self.control_column]
        return row[self.image_column], row[self.text_column]


def _describe(value) -> str:
    if isinstance(value, dict):
        return repr(value.get("path") or "<bytes>")
    return "<bytes>" if isinstance(value, (bytes, bytearray)) else repr(value)


def _usable_rows(table, root: str | None, cfg: DataConfig, where: str) -> tuple[list[int], list | None]:
    """(indices of rows whose image decodes, their upright sizes when buckets are on); one warning counts the rest."""
    if not cfg.verify and not cfg.buckets:
        rows, sizes = list(range(len(table))), None
    else:
        rows, sizes = [], [] if cfg.buckets else None
        for k in range(len(table)):
            try:
                row = table[k]   # once: a tar-shard row is read from disk
                if cfg.verify:
                    for value in (row[0], *row[2:]):   # the picture and its control image
                        open_image(value, root, draft=cfg.resolution)
                if cfg.buckets:  # the header: a draft decode may round the size
                    sizes.append(image_size(row[0], root))
                rows.append(k)
            except DECODE_ERRORS:
                pass
        bad = len(table) - len(rows)
        if bad and rows:
            warnings.warn(f"{where}: skipped {bad} of {len(table)} images that are unreadable, "
                          f"truncated or not images", stacklevel=3)
    if not rows:
        raise ValueError(f"no usable image in {where} ({len(table)} rows, none decodes)")
    return rows, sizes


def _folder_table(path: str, text_column: str, control_column: str = "") -> list[tuple[str, ...]]:
    """(image path, text[, control image path]) rows of every metadata.jsonl under an image folder."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"imagefolder path is not a folder: {path}")
    metas = sorted(root.rglob("metadata.jsonl"))
    if not metas:
        has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.rglob("*"))
        if not has_images:
            raise ValueError(f"no usable image in {path}: no images and no metadata.jsonl")
        raise ValueError(f"text column {text_column!r} not found in {path}: it has images but "
                         f"no metadata.jsonl; columns found: ['image']")
    rows = []
    for meta in metas:
        with open(meta, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{meta}:{line_no}: invalid JSON ({err})") from err
                for key in ("file_name", text_column, control_column or "file_name"):
                    if key not in record:
                        raise ValueError(f"column {key!r} not found in {meta}:{line_no}; "
                                         f"columns found: {sorted(record)}")
                row = (str(meta.parent / record["file_name"]), record[text_column])
                rows.append(row + (str(meta.parent / record[control_column]),) if control_column else row)
    return rows


def _data_files(path: str) -> list[str]:
    """Parquet/arrow files named by a file, a folder (searched recursively) or a glob."""
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix in (".parquet", ".arrow"))
    elif p.is_file():
        files = [str(p)]
    else:
        files = sorted(glob.glob(path, recursive=True))
    if not files:
        raise ValueError(f"no usable image in {path}: no parquet or arrow files found")
    return files


def _hf_table(ds, cfg: DataConfig, where: str) -> _HFTable:
    import datasets

    columns = [("image", cfg.image_column), ("text", cfg.text_column)]
    columns += [("control image", cfg.control_column)] if cfg.control_column else []
    for kind, name in columns:
        if name not in ds.column_names:
            raise ValueError(f"{kind} column {name!r} not found in {where}; "
                             f"columns found: {ds.column_names}")
    ds = ds.select_columns([name for _, name in columns])
    for name in (cfg.image_column, cfg.control_column):
        if name and isinstance(ds.features[name], datasets.Image):
            # decode ourselves, inside try/except: datasets would raise mid-epoch on a bad file
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return _HFTable(ds, cfg.image_column, cfg.text_column, cfg.control_column)


def _load_table(cfg: DataConfig):
    """(table of (image value, text) rows, root for relative image paths) of a real source."""
    if cfg.source == "imagefolder":
        return _folder_table(cfg.path, cfg.text_column, cfg.control_column), None
    if cfg.source == "webdataset":
        table = TarShards(cfg.path, cfg.text_column, cfg.control_column)
        if not len(table):
            raise ValueError(f"no usable sample in {cfg.path} ({len(table.shards)} shards): "
                             f"{table.describe_skipped() or 'no members with extensions'}")
        if table.skipped:
            warnings.warn(f"{cfg.path}: {table.describe_skipped()}", stacklevel=3)
        return table, None
    import datasets  # slow to import: only the sources that read through it pay

    if cfg.source == "parquet":
        files = _data_files(cfg.path)
        builder = "arrow" if all(f.endswith(".arrow") for f in files) else "parquet"
        ds = datasets.load_dataset(builder, data_files=files, split="train")
        return _hf_table(ds, cfg, cfg.path), os.path.dirname(files[0])
    ds = datasets.load_dataset(cfg.path, split=cfg.split)
    return _hf_table(ds, cfg, f"{cfg.path} (split {cfg.split!r})"), None


def build_dataset(cfg: DataConfig) -> Dataset:
    """The map-style data set `cfg` names; items hold pixel_values (3, R, R) and text."""
    dataset = _build_dataset(cfg)
    if cfg.corrupt_captions and not (cfg.source in SHAPES_SOURCES and cfg.split == "heldout"):
        dataset = CorruptCaptions(dataset, cfg.corrupt_captions, cfg.seed)
    return dataset


class CorruptCaptions(Dataset):
    """`dataset` with a fixed share of its items carrying another item's caption: whether item i is hit, and whose
    caption it gets, are drawn from (seed, i), so every epoch, resume and latent cache sees the same wrong pairs, as a
    badly captioned data set would (not fresh noise per view). Everything else is the wrapped data set's."""

    def __init__(self, dataset: Dataset, share: float, seed: int):
        self.dataset, self.share, self.seed = dataset, share, seed

    def donor(self, index: int) -> int | None:
        """The item whose caption item `index` carries, or None if it keeps its own."""
        rng = np.random.default_rng([self.seed, index, 0xC0DE])   # a stream apart from the crops' (seed, epoch, i)
        if rng.random() >= self.share or len(self.dataset) < 2:
            return None
        other = int(rng.integers(len(self.dataset) - 1))
        return other + (other >= index)                             # any item but itself

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item, donor = self.dataset[index], self.donor(int(index))
        return item if donor is None else {**item, "text": self.dataset[donor]["text"]}

    def __getattr__(self, name: str):            # buckets, item_buckets, set_epoch, ...: the wrapped data set's
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _build_dataset(cfg: DataConfig) -> Dataset:
    if cfg.source == "shapes":
        return ShapesWorld(cfg.split, cfg.seed, cfg.resolution, cfg.length, cfg.p_zone)
    if cfg.source == "shapes-edits":             # items add source_pixels, the image to edit (ldm.data.edits)
        return ShapesEdits(cfg.split, cfg.seed, cfg.resolution, cfg.length)
    if cfg.source not in ("hub", "webdataset") and not os.path.exists(cfg.path) and not glob.glob(cfg.path):
        raise FileNotFoundError(f"data path does not exist: {cfg.path}")
    table, root = _load_table(cfg)
    rows, sizes = _usable_rows(table, root, cfg, cfg.path)
    dataset = ImageTextDataset(table, rows, cfg, root, sizes)
    if sizes is not None:
        logger.info("aspect-ratio buckets of %s: %s", cfg.path, describe(dataset.buckets, dataset.item_buckets))
    return dataset


# ------------------------------------------------------------------ order and resume

class EpochSampler(Sampler[int]):
    """A fixed permutation per (seed, epoch); `start` skips the first indices of one pass."""

    def __init__(self, data_source, seed: int = 0, shuffle: bool = True):
        self.data_source, self.seed, self.shuffle = data_source, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Accelerate's prepared loaders call this at every pass; we forward it to the data."""
        self.epoch = epoch
        if hasattr(self.data_source, "set_epoch"):
            self.data_source.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.data_source) - self.start

    def __iter__(self):
        n = len(self.data_source)
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(n)
                 if self.shuffle else np.arange(n))
        start, self.start = self.start, 0  # a resume offset applies to one pass only
        yield from order[start:].tolist()


class ResumableLoader:
    """Batches of one epoch per `for` loop, with a (epoch, batch) position to checkpoint.

    `dataloader` may be a plain DataLoader or its Accelerate-prepared version; with N
    processes each local batch stands for N batches of the shared sampler order. `stride`
    is how many sampler positions one batch spans: the batch size for an `EpochSampler`,
    1 for a `BucketBatchSampler` (its positions are batches).
    """

    def __init__(self, dataloader, sampler: EpochSampler | BucketBatchSampler, stride: int, num_processes: int = 1):
        self.dataloader, self.sampler = dataloader, sampler
        self.stride, self.num_processes = stride, num_processes
        self.epoch, self.batch = 0, 0

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self):
        """The rest of the current epoch; the next loop starts the next epoch."""
        self.sampler.start = self.batch * self.stride * self.num_processes
        if hasattr(self.dataloader, "set_epoch"):  # Accelerate's loader keeps its own count
            self.dataloader.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch)         # Accelerate does not reach a sharded batch sampler
        for batch in self.dataloader:
            self.batch += 1  # counted when handed out, so prefetched batches do not count
            yield batch
        self.epoch, self.batch = self.epoch + 1, 0

    def forever(self):
        """Endless batches across epochs, for step-based training loops."""
        while True:
            yield from self

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        for key in ("epoch", "batch"):
            if key not in state:
                raise KeyError(f"data loader state lacks {key!r}; found {sorted(state)}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def collate(batch: list[dict]) -> dict:
    """Stack tensors (pixel_values, cached latents); every other key (text, labels) becomes a list."""
    return {key: torch.stack([item[key] for item in batch]) if torch.is_tensor(batch[0][key])
            else [item[key] for item in batch] for key in batch[0]}


def make_dataloader(cfg: DataConfig, accelerator=None) -> ResumableLoader:
    """The training loader for `cfg`, prepared by `accelerator` when one is given."""
    return resumable_loader(build_dataset(cfg), cfg, accelerator)


def resumable_loader(dataset, cfg: DataConfig, accelerator=None, num_workers: int | None = None) -> ResumableLoader:
    """Seeded, resumable batches of any map-style data set (the order rules of `EpochSampler`)."""
    if cfg.batch_size is None:                  # DataLoader(batch_size=None) would not batch at all
        raise ValueError("data.batch_size is not set (a training stage sets it from train.batch_size)")
    # persistent_workers=False: workers re-copy the data set every epoch, so they see its epoch.
    # The loader's own generator: a DataLoader draws a worker base seed whenever an epoch starts,
    # and drawing it from the global RNG would shift the training's random stream on resume.
    common = dict(num_workers=cfg.num_workers if num_workers is None else num_workers, collate_fn=collate,
                  pin_memory=torch.cuda.is_available(), persistent_workers=False,
                  generator=torch.Generator().manual_seed(cfg.seed))
    item_buckets = getattr(dataset, "item_buckets", None)
    if item_buckets is not None:  # aspect-ratio buckets: the sampler makes the batches
        sampler = BucketBatchSampler(dataset, item_buckets, cfg.batch_size, cfg.seed, cfg.drop_last)
        never = sum(len(m) for m in sampler.members.values() if len(m) < cfg.batch_size)
        if never:
            warnings.warn(f"aspect-ratio buckets: {never} of {len(item_buckets)} images are in buckets smaller "
                          f"than a batch ({cfg.batch_size}) and are never drawn; fewer buckets (a lower "
                          f"data.bucket_max_ratio, a larger data.bucket_step) or smaller batches take them",
                          stacklevel=2)
        loader, stride = DataLoader(dataset, batch_sampler=sampler, **common), 1
    else:
        sampler = EpochSampler(dataset, cfg.seed)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=cfg.drop_last, **common)
        stride = cfg.batch_size
    num_processes = 1
    if accelerator is not None:
        loader, num_processes = accelerator.prepare(loader), accelerator.num_processes
    return ResumableLoader(loader, sampler, stride, num_processes)
