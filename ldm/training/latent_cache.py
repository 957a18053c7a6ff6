"""Latent cache: encode a finite data set once with the frozen stage-1 autoencoder.

Stage 2 never changes the autoencoder, so each image's posterior q(z|x) = N(mean, std^2) is
the same in every epoch; caching it saves one encoder pass per step. We store the moments,
not one sample, so training still draws a fresh z ~ q(z|x) each time it sees an image.

Layout: `<cache_dir>/<key>/meta.json` (written last: its presence marks a complete cache) and
`shard-00000.safetensors`, ... each holding `mean` and `std` (n, z, h, w) float32 in raw,
unscaled latent units, with the n captions as JSON in the file's metadata. With aspect-ratio
buckets (`data.buckets`) latents differ in size: a shard holds `mean.<k>`/`std.<k>` per bucket k
and its metadata `groups` = [[k, [positions in the shard]], ...] says which items they are.

The key hashes everything that decides the latents: the autoencoder's weights (content
digest) and config, the data config except pure batching knobs, and for local data the
size and mtime of every file under `data.path`. Changing any of them gives a new key, so
stale latents are never read (old folders stay until deleted). For the on-the-fly shapes
world, caching means `data.length` samples rendered once, so the model sees a finite set.
Caveat: random crops are cached as drawn in epoch 0 (the pixels' crop is fixed).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset, Subset

from ldm.data.loaders import DataConfig, ResumableLoader, build_dataset, collate, make_dataloader, resumable_loader
from ldm.models.autoencoder import CONFIG_NAME, WEIGHTS_NAME, AutoencoderKL
from ldm.models.weights import write_safetensors_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
BATCH_ONLY = ("batch_size", "num_workers", "drop_last")   # data keys that never change a latent


# --------------------------------------------------------------------------- the key

def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(cfg: DataConfig) -> dict:
    """The data config minus batching knobs, plus (path, size, mtime) of local data files."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in BATCH_ONLY}
    if not cfg.buckets:  # keys of square caches stay as they were before buckets existed
        fields = {k: v for k, v in fields.items() if not k.startswith("bucket")}
    if not cfg.corrupt_captions:  # nor do those of clean captions, from before corrupt_captions existed
        del fields["corrupt_captions"]
    if cfg.source in ("imagefolder", "parquet") and os.path.exists(cfg.path):
        root = Path(cfg.path)
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        fields["files"] = [[str(f.relative_to(root) if root.is_dir() else f.name),
                            f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
    elif cfg.source == "webdataset":  # the shards the pattern names, each with its size and time
        from ldm.data.tar_shards import shard_files
        fields["files"] = [[str(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in shard_files(cfg.path)]
    return fields


def cache_key(autoencoder_dir: str | Path, data_cfg: DataConfig) -> tuple[str, dict]:
    """(hex key, the parts it hashes) for latents of `data_cfg` under the autoencoder folder."""
    ae = Path(autoencoder_dir)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (ae / name).is_file():
            raise FileNotFoundError(f"autoencoder folder {str(ae)!r} lacks {name}")
    parts = {"format": FORMAT_VERSION,
             "autoencoder": {"config": json.loads((ae / CONFIG_NAME).read_text()),
                             "weights_sha256": file_digest(ae / WEIGHTS_NAME)},
             "data": data_fingerprint(data_cfg)}
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20], parts


# --------------------------------------------------------------------------- reading

class LatentCache(Dataset):
    """Items {"mean", "std": (z, h, w) raw posterior moments, "text", "index"} of a complete cache, and
    "size_ids" (4,) (SDXL's original size and crop corner, `preprocess`) where the pictures had them.

    A bucketed cache also has `item_buckets` (each item's bucket), which `resumable_loader` batches by.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"latent cache {str(self.folder)!r} is incomplete (no meta.json)")
        self.meta = json.loads(meta_path.read_text())
        means, stds, self.captions, self.item_buckets = [], [], [], None
        sizes = []                  # SDXL's size numbers: image data sets have them, the shapes world not
        for name in self.meta["shards"]:
            with safe_open(str(self.folder / name), framework="pt") as f:
                metadata = f.metadata()
                if "groups" in metadata:   # bucketed: per-item (z, h, w) tensors, back in item order
                    self.item_buckets = self.item_buckets or []
                    captions = json.loads(metadata["captions"])
                    slots = [None] * len(captions)
                    keys = set(f.keys())
                    for bucket, positions in json.loads(metadata["groups"]):
                        mean, std = f.get_tensor(f"mean.{bucket}"), f.get_tensor(f"std.{bucket}")
                        ids = f.get_tensor(f"size_ids.{bucket}") if f"size_ids.{bucket}" in keys else None
                        for row, position in enumerate(positions):
                            slots[position] = (mean[row], std[row], bucket, None if ids is None else ids[row])
                    means += [m for m, _, _, _ in slots]
                    stds += [s for _, s, _, _ in slots]
                    self.item_buckets += [b for _, _, b, _ in slots]
                    sizes += [i for _, _, _, i in slots]
                else:
                    means.append(f.get_tensor("mean"))
                    stds.append(f.get_tensor("std"))
                    captions = json.loads(metadata["captions"])
                    ids = f.get_tensor("size_ids") if "size_ids" in f.keys() else None
                    sizes += [None] * len(captions) if ids is None else list(ids)
                self.captions += captions
        if self.item_buckets is None:
            self.mean, self.std = torch.cat(means), torch.cat(stds)  # (N, z, h, w) each
        else:
            self.mean, self.std = means, stds                          # N tensors (z, h, w)
        self.size_ids = sizes if sizes and all(i is not None for i in sizes) else None
        if len(self.mean) != self.meta["num_samples"] or len(self.captions) != len(self.mean):
            raise ValueError(f"latent cache {str(self.folder)!r}: shards hold {len(self.mean)} latents and "
                             f"{len(self.captions)} captions, meta.json says {self.meta['num_samples']}")

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, index: int) -> dict:
        item = {"mean": self.mean[index], "std": self.std[index], "text": self.captions[index], "index": int(index)}
        if self.size_ids is not None:
            item["size_ids"] = self.size_ids[index]
        return item


def make_cache_loader(cache: LatentCache, cfg: DataConfig, accelerator=None) -> ResumableLoader:
    """Seeded, resumable batches of a cache, in the same order rules as `make_dataloader`."""
    return resumable_loader(cache, cfg, accelerator, num_workers=0)  # in memory already: no workers


def scaled_latents(mean: torch.Tensor, std: torch.Tensor, ae_config, sample: bool = True,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Cached moments -> diffusion latents, as `AutoencoderKL.encode_latents` computes them."""
    z = mean
    if sample:
        z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (z - (ae_config.shift_factor or 0.0)) * ae_config.scaling_factor


# --------------------------------------------------------------------------- building

@torch.no_grad()
def _encode(ae: AutoencoderKL, dataset: Dataset, indices: list[int], batch_size: int,
            num_workers: int) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor | None]:
    """(mean, std, captions, size_ids or None) of the items `indices`, which must share one image size."""
    device = next(ae.parameters()).device
    # Its own generator: the worker seed it draws must not move the caller's (training) RNG.
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate, generator=torch.Generator())
    means, stds, captions, sizes = [], [], [], []
    for batch in loader:
        posterior = ae.encode(batch["pixel_values"].to(device).float())
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
        captions += batch["text"]
        sizes.append(batch.get("size_ids"))
    ids = torch.cat(sizes).contiguous() if all(s is not None for s in sizes) else None
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous(), captions, ids


def _encode_shard(ae: AutoencoderKL, dataset: Dataset, indices: range, batch_size: int,
                  num_workers: int, path: Path) -> None:
    item_buckets = getattr(dataset, "item_buckets", None)
    if item_buckets is None:
        mean, std, captions, ids = _encode(ae, dataset, list(indices), batch_size, num_workers)
        write_safetensors_atomic({"mean": mean, "std": std, **({"size_ids": ids} if ids is not None else {})}, path,
                          metadata={"captions": json.dumps(captions)})
        return
    groups: dict[int, list[int]] = {}                      # bucket -> positions in the shard
    for position, index in enumerate(indices):
        groups.setdefault(item_buckets[index], []).append(position)
    tensors, captions = {}, [""] * len(indices)
    for bucket, positions in sorted(groups.items()):
        mean, std, texts, ids = _encode(ae, dataset, [indices[p] for p in positions], batch_size, num_workers)
        tensors |= {f"mean.{bucket}": mean, f"std.{bucket}": std, **({f"size_ids.{bucket}": ids} if ids is not None
                                                                     else {})}
        for position, text in zip(positions, texts):
            captions[position] = text
    write_safetensors_atomic(tensors, path, metadata={"captions": json.dumps(captions),
                                               "groups": json.dumps(sorted(groups.items()))})


def build_cache(folder: Path, ae: AutoencoderKL, dataset: Dataset, parts: dict, *, batch_size: int = 64,
                num_workers: int = 0, shard_size: int = 4096, rank: int = 0, world: int = 1,
                barrier: Callable[[], None] = lambda: None, progress: bool = True) -> None:
    """Encode `dataset` into `folder`; process `rank` of `world` encodes every world-th shard.

    All processes must call it (they meet at `barrier`) and see one shared file system.
    The folder is assembled as `<folder>.tmp` and renamed when complete. An interrupted build
    resumes: each shard is written whole or not at all, and the shards of a `.tmp` with the same
    plan (items, shard size) are kept; the folder's name is the key of the data and autoencoder,
    so they hold these latents. On an SD-sized data set this is hours of encoding.
    """
    from tqdm.auto import tqdm

    tmp = folder.with_name(folder.name + ".tmp")
    n = len(dataset)
    plan = {"num_samples": n, "shard_size": shard_size}
    if rank == 0:
        try:
            kept = json.loads((tmp / "plan.json").read_text()) == plan
        except (OSError, ValueError):
            kept = False
        if not kept:
            shutil.rmtree(tmp, ignore_errors=True)  # another plan, or a build from before plans
            tmp.mkdir(parents=True)
            (tmp / "plan.json").write_text(json.dumps(plan))
    barrier()
    shards = [f"shard-{k:05d}.safetensors" for k in range((n + shard_size - 1) // shard_size)]
    mine = range(rank, len(shards), world)
    todo = [k for k in mine if not (tmp / shards[k]).is_file()]
    if len(todo) < len(mine) and rank == 0:
        logger.info("latent cache: resuming a build, %d of %d shards already encoded", len(mine) - len(todo),
                    len(mine))
    for k in tqdm(todo, desc="caching latents", initial=len(mine) - len(todo), total=len(mine),
                  disable=not progress or rank != 0):
        _encode_shard(ae, dataset, range(k * shard_size, min(n, (k + 1) * shard_size)),
                      batch_size, num_workers, tmp / shards[k])
    barrier()
    if rank == 0:
        meta = {"num_samples": n, "shard_size": shard_size, "shards": shards, **parts}
        if getattr(dataset, "buckets", None) is not None:
            meta["buckets"] = [list(size) for size in dataset.buckets]
        (tmp / "plan.json").unlink()
        for part in tmp.glob("*.tmp"):             # a shard file cut off by an interrupted build
            part.unlink()
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)  # the cache appears complete or not at all
    barrier()


def open_or_build(cache_dir: str | Path, autoencoder_dir: str | Path, data_cfg: DataConfig,
                  ae: AutoencoderKL, **build_kwargs) -> tuple[LatentCache, bool]:
    """(the cache of these latents, hit): build it first on a miss (see `build_cache`)."""
    key, parts = cache_key(autoencoder_dir, data_cfg)
    folder = Path(cache_dir) / key
    hit = (folder / "meta.json").is_file()
    if not hit:
        if data_cfg.crop == "random":
            warnings.warn("cache_latents with data.crop='random' caches one crop per image (epoch 0's)",
                          stacklevel=2)
        logger.info("latent cache miss: encoding %s into %s", data_cfg.source, folder)
        build_cache(folder, ae, build_dataset(data_cfg), parts, batch_size=data_cfg.batch_size,
                    num_workers=data_cfg.num_workers, **build_kwargs)
    else:
        logger.info("latent cache hit: %s", folder)
    return LatentCache(folder), hit


def stage_loader(accelerator, data_cfg: DataConfig, ae: AutoencoderKL, autoencoder_dir: str | Path,
                 cache_dir: str | Path | None) -> ResumableLoader:
    """A training stage's batches: with a cache_dir, the cached posterior moments of data_cfg's images (encoded
    first on a miss, each process its share); without one, the images, which the stage encodes as it trains."""
    if cache_dir is None:
        return make_dataloader(data_cfg, accelerator)
    cache, _ = open_or_build(cache_dir, autoencoder_dir, data_cfg, ae, rank=accelerator.process_index,
                             world=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
                             progress=accelerator.is_local_main_process)
    return make_cache_loader(cache, data_cfg, accelerator)
