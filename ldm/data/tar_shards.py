"""WebDataset tar shards as a map-style table: `data.source: webdataset` (ldm/data/loaders.py).

A shard is a plain tar file whose members group into samples by key, the member name up to the first
dot of its base name (`a/b.c/000123.jpg` and `a/b.c/000123.txt` are the sample `a/b.c/000123`, with
the extensions `jpg` and `txt`). `data.path` names the shards: brace ranges and lists
(`data/{00000..00999}.tar`, `{train,extra}/*.tar`, expanded here, as braceexpand does), globs, and
folders (every .tar under them).

Each shard's headers are read once (tarfile seeks past member data, nothing is decompressed) into an
index of samples: shard, key, and the data offset and size of the image, caption and control members.
A row is then read by seeking to a member's data. Supported:
  * images: the sample's first member among .jpg .jpeg .png .webp;
  * captions: with `text_column` "text" (the default), the `.txt` member (stripped), else the `.json` member's
    "text" or "caption" field (img2dataset writes both); any other `text_column` is a `.json` field;
  * control images (`control_column`, ControlNet training): the member with that extension
    (`control.png`), or that name plus an image extension (`control` finds `000123.control.jpg`).
Samples without an image, caption or control image are skipped and counted (`TarShards.skipped`).

Caution: random access is what a map-style set needs (shuffles over everything, resumable mid-epoch,
buckets, latent caches), so shards should sit on a local disk, not behind HTTP. Compressed shards
(.tar.gz, .tar.zst) are refused: reaching a member would mean decompressing everything before it.
The index holds 53 bytes per sample plus 4 per character of the longest key, in numpy arrays (DataLoader workers fork
without touching per-sample Python objects, whose reference counts would copy them page by page).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
import time
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")     # in this order when a sample has several
CAPTION_FIELDS = {"text": ("text", "caption")}        # default text_column -> the .json fields it reads
TXT = -1                                              # the caption kind of .txt (else a json field's index)
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
MAX_OPEN = 32                                         # shard files a process keeps open at once


# --------------------------------------------------------------------------- shard names

def _closing_brace(text: str, start: int) -> int:
    """Index of the brace closing the one at `start`, or -1."""
    depth = 0
    for k in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return k
    return -1


def _top_level_split(body: str) -> list[str]:
    """`body` split at the commas outside nested braces."""
    parts, depth, last = [], 0, 0
    for k, char in enumerate(body):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(body[last:k])
            last = k + 1
    return parts + [body[last:]]


def expand_braces(pattern: str) -> list[str]:
    """`{000..123}` (zero-padded to the first bound's width, either direction) and `{a,b}` (nested), left to
    right; `{x}` without a comma or range stays literal."""
    start = pattern.find("{")
    while start >= 0:
        end = _closing_brace(pattern, start)
        if end < 0:
            break
        body = pattern[start + 1:end]
        bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        parts = _top_level_split(body)
        if bounds:
            lo, hi = int(bounds[1]), int(bounds[2])
            step = 1 if hi >= lo else -1
            parts = [str(n).zfill(len(bounds[1])) for n in range(lo, hi + step, step)]
        if bounds or len(parts) > 1:
            head, tails = pattern[:start], expand_braces(pattern[end + 1:])
            return [head + p + t for part in parts for p in expand_braces(part) for t in tails]
        start = pattern.find("{", start + 1)
    return [pattern]


def shard_files(pattern: str) -> list[str]:
    """The shard files `pattern` names, in its order: each brace expansion a file, a glob or a folder."""
    files = []
    for item in expand_braces(pattern):
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).rglob("*") if p.is_file()
                           and p.name.endswith((".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.xz", ".tar.bz2")))
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        elif os.path.isfile(item):
            found = [item]
        else:
            raise FileNotFoundError(f"shard {item!r} does not exist (data.path {pattern!r})")
        if not found:
            raise FileNotFoundError(f"no shards in {item!r} (data.path {pattern!r})")
        files += found
    return list(dict.fromkeys(files))


# --------------------------------------------------------------------------- the scan

def _open_tar(path: str, f) -> tarfile.TarFile:
    magic = f.read(6)
    for signature, name in COMPRESSED.items():
        if magic.startswith(signature):
            raise ValueError(f"shard {path} is {name}-compressed: reading a sample would decompress everything "
                             f"before it; decompress the shards to plain .tar files (e.g. gunzip)")
    f.seek(0)
    try:
        return tarfile.open(fileobj=f, mode="r:")
    except tarfile.ReadError as err:
        raise ValueError(f"shard {path} is not a tar file: {err}") from err


def _members(path: str, f) -> dict[str, dict[str, tarfile.TarInfo]]:
    """{key: {extension: member}} of the regular files in a shard, keys in order of first appearance."""
    samples, size = {}, os.fstat(f.fileno()).st_size
    tar = _open_tar(path, f)
    members = iter(tar)
    while True:
        try:
            info = next(members, None)
        except tarfile.ReadError as err:   # a cut-off download: keep what lies wholly inside the file
            logger.warning("shard %s ends early (%s); the samples before the cut are kept", path, err)
            break
        if info is None:
            break
        head, slash, base = info.name.rpartition("/")
        stem, dot, extension = base.partition(".")
        if info.isfile() and stem and dot and info.offset_data + info.size <= size:
            samples.setdefault(head + slash + stem, {})[extension.lower()] = info  # a later duplicate wins, as tar does
    tar.members = []
    return samples


def _caption(f, members: dict, fields: tuple[str, ...], txt: bool):
    """(kind, member) of a sample's caption: TXT, or the index of the first json field present; None if none."""
    if txt and "txt" in members:
        return TXT, members["txt"]
    if "json" not in members:
        return None
    info = members["json"]
    f.seek(info.offset_data)
    try:
        record = json.loads(f.read(info.size))
    except (ValueError, UnicodeDecodeError):
        return None
    present = [k for k, name in enumerate(fields) if isinstance(record, dict) and record.get(name) is not None]
    return (present[0], info) if present else None


def _control(members: dict, name: str):
    if name in members:
        return members[name]
    return next((members[f"{name}.{ext}"] for ext in IMAGE_EXTENSIONS if f"{name}.{ext}" in members), None)


class TarShards:
    """Rows (image value, caption[, control image value]) of WebDataset shards, read by seeking into them.

    Image values are {"bytes", "path"} dicts (`path` names the shard and member, for messages), which
    ldm.data.transforms.open_image decodes. Files open lazily in each process, so DataLoader workers
    never share a file position with the parent or with each other.
    """

    def __init__(self, pattern: str, text_column: str = "text", control_column: str = ""):
        self.pattern = pattern
        self.shards = shard_files(pattern)
        self.fields = CAPTION_FIELDS.get(text_column, (text_column,))
        self.control_column = control_column.lstrip(".").lower()
        self.skipped: Counter = Counter()   # reason -> samples left out
        shard, spans, kinds, keys = [], [], [], []
        began = time.perf_counter()
        for s, path in enumerate(self.shards):
            with open(path, "rb") as f:
                for key, members in _members(path, f).items():
                    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
                    caption = _caption(f, members, self.fields, txt=text_column == "text")
                    control = _control(members, self.control_column) if self.control_column else None
                    if image is None:
                        self.skipped[f"without an image ({'/'.join('.' + e for e in IMAGE_EXTENSIONS)})"] += 1
                    elif caption is None:
                        where = ".txt or " if text_column == "text" else ""
                        self.skipped[f"without a caption ({where}.json field {' or '.join(map(repr, self.fields))})"] += 1
                    elif self.control_column and control is None:
                        self.skipped[f"without a control image (.{self.control_column})"] += 1
                    else:
                        shard.append(s)
                        kinds.append(caption[0])
                        keys.append(key)
                        spans.append([image.offset_data, image.size, caption[1].offset_data, caption[1].size,
                                      control.offset_data if control else -1, control.size if control else -1])
        self.shard = np.asarray(shard, dtype=np.int32)                   # (N,) index into self.shards
        self.spans = np.asarray(spans, dtype=np.int64).reshape(-1, 6)     # (N, 6) (offset, size) of image, caption, control
        self.kinds = np.asarray(kinds, dtype=np.int8)                     # (N,) TXT or the json field's index
        self.keys = np.asarray(keys, dtype=str)                           # (N,) sample keys, for messages
        self.total = len(self) + sum(self.skipped.values())
        logger.info("indexed %d samples of %d shards in %.2f s", self.total, len(self.shards),
                    time.perf_counter() - began)
        self._files: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.shard)

    def describe_skipped(self) -> str:
        """'skipped 2 of 12 samples: 1 without an image (...), 1 without a caption (...)', or ''."""
        if not self.skipped:
            return ""
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.items())
        return f"skipped {sum(self.skipped.values())} of {self.total} samples: {reasons}"

    def _file(self, s: int):
        if self._pid != os.getpid():      # a forked worker: the inherited files share the parent's positions
            for f in self._files.values():
                f.close()                 # this process's copies only
            self._files, self._pid = OrderedDict(), os.getpid()
        if s in self._files:
            self._files.move_to_end(s)
        else:
            if len(self._files) >= MAX_OPEN:
                self._files.popitem(last=False)[1].close()
            self._files[s] = open(self.shards[s], "rb")
        return self._files[s]

    def _read(self, s: int, offset: int, size: int, what: str) -> bytes:
        f = self._file(s)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:             # the shard shrank since the scan: OSError is a decode error
            raise OSError(f"{what}: {len(data)} of {size} bytes (the shard changed since it was indexed)")
        return data

    def __getitem__(self, k: int):
        s, kind, key = int(self.shard[k]), int(self.kinds[k]), str(self.keys[k])
        image_at, image_size, text_at, text_size, control_at, control_size = (int(v) for v in self.spans[k])
        where = f"{self.shards[s]}:{key}"
        image = {"bytes": self._read(s, image_at, image_size, where), "path": f"{where} (image)"}
        text = self._read(s, text_at, text_size, where).decode("utf-8", errors="replace")
        text = text.strip() if kind == TXT else str(json.loads(text)[self.fields[kind]])
        if control_at < 0:
            return image, text
        return image, text, {"bytes": self._read(s, control_at, control_size, where), "path": f"{where} (control)"}

    def __getstate__(self) -> dict:       # spawned workers and pickles get no open files
        return {**self.__dict__, "_files": OrderedDict()}

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for f in getattr(self, "_files", {}).values():
                f.close()
