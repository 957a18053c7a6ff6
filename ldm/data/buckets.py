"""Aspect-ratio buckets: train on whole pictures of many shapes instead of square crops of them.

A square centre crop of a portrait cuts off heads and feet, and the model learns that pictures
are cut that way (NovelAI's aspect-ratio bucketing, 2022; SDXL's multi-aspect training, Podell
et al. 2023, sec. 2.3). Buckets are sizes of about `resolution`^2 pixels whose sides are
multiples of `step`; each image goes to the bucket nearest its aspect ratio (in log space, so
2:1 and 1:2 are equally far from 1:1), is resized to cover it and cropped to it, and every batch
holds images of one bucket, so they stack. Batches of a bucket are drawn in a fixed permutation
per (seed, epoch, bucket) and the batches of all buckets are shuffled together per (seed, epoch):
the run is reproducible and resumes at the next batch like `EpochSampler`.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np


def bucket_sizes(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) sizes, widest first: sides multiples of `step`, area <= resolution^2, each
    side as long as the area lets it be given the other, aspect ratio within [1/max_ratio, max_ratio]."""
    if step < 1 or resolution < step:
        raise ValueError(f"bucket step must be in [1, resolution={resolution}], got {step}")
    if max_ratio < 1:
        raise ValueError(f"bucket max_ratio must be >= 1, got {max_ratio}")
    area = resolution * resolution
    sizes = []
    for width in range(step, area // step + 1, step):
        height = area // width // step * step          # the tallest height the area allows
        if height < step:
            break
        maximal = (width + step) * height > area         # not a narrower copy of a wider bucket
        if maximal and max(width / height, height / width) <= max_ratio + 1e-9:
            sizes.append((width, height))
    if not sizes:
        raise ValueError(f"no bucket of about {resolution}^2 pixels with sides multiples of {step}")
    return sorted(sizes, key=lambda s: s[1] / s[0])


def assign_buckets(image_sizes: list[tuple[int, int]], buckets: list[tuple[int, int]]) -> list[int]:
    """For each (width, height), the index of the bucket nearest in log aspect ratio."""
    logs = np.array([math.log(w / h) for w, h in buckets])
    return [int(np.argmin(np.abs(logs - math.log(w / h)))) for w, h in image_sizes]


def describe(buckets: list[tuple[int, int]], item_buckets: list[int]) -> str:
    """'640x384: 12, 512x512: 80, ...' for a log line."""
    counts = Counter(item_buckets)
    return ", ".join(f"{w}x{h}: {counts[k]}" for k, (w, h) in enumerate(buckets) if counts[k])


class BucketBatchSampler:
    """Batches of indices from one bucket each; a fixed order per (seed, epoch); `start` skips batches.

    Under Accelerate each process takes every num_processes-th batch of this order
    (accelerate's BatchSamplerShard), so all processes share one order and a resume point.
    """

    def __init__(self, data_source, item_buckets: list[int], batch_size: int, seed: int = 0,
                 drop_last: bool = True):
        self.data_source, self.batch_size, self.seed, self.drop_last = data_source, batch_size, seed, drop_last
        self.members = {}                                  # bucket -> its item indices, ascending
        for index, bucket in enumerate(item_buckets):
            self.members.setdefault(bucket, []).append(index)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.data_source, "set_epoch"):
            self.data_source.set_epoch(epoch)              # keys the random crops

    def _batches(self) -> list[list[int]]:
        batches = []
        for bucket, members in sorted(self.members.items()):
            order = np.random.default_rng([self.seed, self.epoch, bucket]).permutation(members).tolist()
            full = len(order) // self.batch_size * self.batch_size
            batches += [order[i:i + self.batch_size] for i in range(0, full, self.batch_size)]
            if not self.drop_last and full < len(order):
                batches.append(order[full:])
        shuffle = np.random.default_rng([self.seed, self.epoch]).permutation(len(batches))
        return [batches[k] for k in shuffle]

    def __len__(self) -> int:
        sizes = [len(m) for m in self.members.values()]
        per_bucket = (n // self.batch_size if self.drop_last else -(-n // self.batch_size) for n in sizes)
        return sum(per_bucket) - self.start

    def __iter__(self):
        start, self.start = self.start, 0                  # a resume offset applies to one pass only
        yield from self._batches()[start:]
