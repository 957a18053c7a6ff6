"""FID and KID of image folders in the features of the FID Inception-v3, as pytorch-fid computes them.

    python -m ldm.eval fid --images DIR --ref DIR|STATS.npz [--inception WEIGHTS]
    python -m ldm.eval fid-stats --images DIR --out STATS.npz [--inception WEIGHTS]

What is implemented (checked against pytorch-fid's src/pytorch_fid/inception.py and fid_score.py,
and torchvision 0.29's models/inception.py):

- The network: torchvision's `Inception3(num_classes=1008, aux_logits=False, transform_input=False)`
  (1008 classes: the TF graph's; the fc is never run, it is only there so the weights load strictly),
  with the blocks that the TF-ported FID network computes differently replaced: Mixed_5b/5c/5d
  (InceptionA), Mixed_6b/6c/6d/6e (InceptionC) and Mixed_7b (InceptionE) average-pool their pool
  branch with count_include_pad=False (TF's average pool leaves the zero padding out of the mean);
  Mixed_7c (InceptionE) max-pools it (3x3, stride 1, padding 1) instead. Everything else (every conv,
  BatchNorm eps 0.001, Mixed_6a/7a, the stem's max pools) is torchvision's, unchanged.
- Features: pool3, the 2048-d global average over Mixed_7c's 8x8 map (pytorch-fid's default block 3).
- Input: each image is read with PIL, converted to RGB (any mode: L, P, RGBA, I;16 ...), scaled to
  [0, 1] as uint8 / 255, resized to 299x299 with F.interpolate(bilinear, align_corners=False, no
  antialias) and mapped to [-1, 1] as 2x - 1: pytorch-fid's resize_input and normalize_input. Images
  are resized one by one, so folders may mix sizes (pytorch-fid batches them and needs one size).
- Files: *.bmp, jpg, jpeg, pgm, png, ppm, tif, tiff, webp in the folder, not its subfolders, sorted
  (pytorch-fid's list; the extension matched case-insensitively here). Unreadable files are skipped,
  counted and named in the result.
- FID (Heusel et al. 2017): |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) in float64
  with np.cov's N - 1 covariance; the symmetric form equals pytorch-fid's tr sqrtm(C_a C_b) without
  its complex round-off (tests/eval/test_fid.py checks both against scipy.linalg.sqrtm); with fewer
  generated images than 2048 the cross term comes from an N x N eigenproblem instead (frechet_distance_to).
- Statistics files: np.savez with pytorch-fid's keys `mu` (2048,) and `sigma` (2048, 2048), plus `n`;
  pytorch-fid's own .npz files (and clean-fid's, same keys) are read as references.
- KID (Binkowski et al. 2018), when both sides are folders: the unbiased MMD^2 estimate with the
  cubic polynomial kernel k(x, y) = (x.y / 2048 + 1)^3, averaged over `subsets` random subsets of
  `subset_size` images per side (drawn without replacement; 100 x 1000 by default, as torch-fidelity
  and clean-fid; the size is capped at the smaller folder), reported as mean and std over subsets.
- Convolutions run in full fp32 (cuDNN's TF32 is switched off while features are extracted).

Caution: nothing is downloaded here. The weights are pytorch-fid's pt_inception-2015-12-05-6726825d.pth
(FID_WEIGHTS_URL), a torchvision-style state dict (Conv2d_1a_3x3.conv.weight, ..., fc.weight); it is
loaded strictly, BatchNorm's num_batches_tracked counters aside (unused in eval). The tests check the
architecture against torchvision's blocks with random weights only: agreement of the numbers with
pytorch-fid on the real weights is by construction, not measured here. clean-fid's default "clean"
mode resizes with PIL bicubic instead, so its FIDs differ from these (and pytorch-fid's) slightly;
FID also depends on the number of images (biased upwards at small N): compare only at equal N.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models.inception import (BasicConv2d, Inception3, InceptionA, InceptionAux, InceptionB,
                                          InceptionC, InceptionD, InceptionE)

from ldm.eval.metrics import _sqrtm_psd

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's naming: the file's sha256 starts with these digits
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
SIZE = 299        # the network's input resolution
DIMS = 2048       # pool3 features


# --------------------------------------------------------------------------- the network

def tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 average pool, stride 1, padding 1, averaging only real pixels (TF's SAME average pool)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def tf_max_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 max pool, stride 1, padding 1: the pool branch of the FID network's last block."""
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


# Each block below is torchvision's with the same submodules (so the same state-dict names); only the
# pool branch's pooling differs, and it is the instance's `pool`, so a test can swap it.

class FIDInceptionA(InceptionA):
    pool = staticmethod(tf_avg_pool)

    def _forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(self.pool(x))]


class FIDInceptionC(InceptionC):
    pool = staticmethod(tf_avg_pool)

    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return [self.branch1x1(x), b7, b7dbl, self.branch_pool(self.pool(x))]


class FIDInceptionE(InceptionE):
    pool = staticmethod(tf_avg_pool)

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        return [self.branch1x1(x), b3, b3dbl, self.branch_pool(self.pool(x))]


# pool3's path through torchvision's Inception3 (its _forward without the aux head, dropout and fc)
POOL3_PATH = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
              "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
              "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")


class FIDInception(Inception3):
    """The FID Inception-v3 (see the module docstring); `features` maps prepared images to pool3."""

    def __init__(self, init_weights: bool = False):
        blocks = [BasicConv2d, FIDInceptionA, InceptionB, FIDInceptionC, InceptionD, FIDInceptionE, InceptionAux]
        super().__init__(num_classes=1008, aux_logits=False, transform_input=False, inception_blocks=blocks,
                         init_weights=init_weights)
        self.Mixed_7c.pool = tf_max_pool
        self.eval().requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1], H, W >= 75 (299 for FID) -> (B, 2048) pool3 features."""
        for name in POOL3_PATH:
            x = getattr(self, name)(x)
        return x.flatten(1)

    forward = features


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, 299, 299) in [-1, 1]: pytorch-fid's resize, then 2x - 1."""
    x = images.float() / 255
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


def default_weights_path() -> str:
    """Where pytorch-fid's own download puts the weights (torch.hub's checkpoints folder)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_NAME)


def load_fid_inception(path: str | None = None, device="cpu") -> FIDInception:
    """The FID Inception with the weights of `path` (default: default_weights_path()), loaded strictly."""
    path = path or default_weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}. Nothing is downloaded here: get pytorch-fid's "
            f"{FID_WEIGHTS_NAME} from {FID_WEIGHTS_URL} and pass --inception PATH (or put it at "
            f"{default_weights_path()})")
    with torch.device("meta"):
        model = FIDInception()  # no random init: every tensor comes from the file
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict like {FID_WEIGHTS_NAME}")
    ours = model.state_dict()
    counters = {k: torch.tensor(0) for k in ours if k.endswith("num_batches_tracked")}
    state = {**counters, **state}  # old files lack BatchNorm's step counters; eval never reads them
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in ours.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        problems = [f"{len(keys)} {what}: {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
                    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                       ("keys of the wrong shape", wrong)) if keys]
        raise ValueError(f"{path} is not the FID Inception's state dict ({FID_WEIGHTS_NAME}, torchvision "
                         f"Inception3 names): " + "; ".join(problems))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ images

def image_files(folder: str | Path) -> list[Path]:
    """The folder's image files (IMAGE_EXTENSIONS, not recursive), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}")
    return files


def read_rgb(path: Path) -> np.ndarray | None:
    """uint8 (H, W, 3) of any image PIL reads, converted to RGB; None when the file is unreadable."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None  # truncated, corrupt or not an image at all


class PreparedImages(torch.utils.data.Dataset):
    """(index, prepared (3, 299, 299) image or None) per file: resized in the loader's workers."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        pixels = read_rgb(self.files[i])
        if pixels is None:
            return i, None
        return i, preprocess(torch.from_numpy(pixels).permute(2, 0, 1)[None])[0]


def _collate(items):
    kept = [(i, x) for i, x in items if x is not None]
    batch = torch.stack([x for _, x in kept]) if kept else None
    return batch, [i for i, x in items if x is None]


@contextlib.contextmanager
def full_fp32():
    """cuDNN convolutions in fp32, not TF32 (PyTorch's default on Ampere and later)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


@torch.no_grad()
def folder_features(model: FIDInception, folder, batch_size: int = 50, workers: int = 0,
                    device="cpu") -> dict:
    """pool3 features of a folder's readable images: {"features": float64 (N, 2048), "n", "skipped", ...}."""
    from tqdm.auto import tqdm

    files = image_files(folder)
    loader = torch.utils.data.DataLoader(PreparedImages(files), batch_size=batch_size, num_workers=workers,
                                         collate_fn=_collate)
    features, skipped = [], []
    with full_fp32():
        for batch, bad in tqdm(loader, desc=f"inception {folder}", unit="batch", leave=False):
            skipped += [files[i].name for i in bad]
            if batch is not None:
                features.append(model.features(batch.to(device)).double().cpu().numpy())
    found = np.concatenate(features) if features else np.zeros((0, DIMS))
    return {"path": str(folder), "n": len(found), "skipped": len(skipped), "skipped_files": skipped,
            "features": found}


# ------------------------------------------------------------------------------ metrics

def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and covariance (F, F) with N - 1 (np.cov), in float64: pytorch-fid's mu and sigma."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need (N, F) features with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_distance_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """Frechet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b) (Dowson & Landau 1982), float64."""
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma_a, sigma_b))
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != (mu_a.size, mu_a.size):
        raise ValueError(f"mismatched statistics: mu {mu_a.shape} and {mu_b.shape}, "
                         f"sigma {sigma_a.shape} and {sigma_b.shape}")
    root_a = _sqrtm_psd(sigma_a)
    # tr (C_a^1/2 C_b C_a^1/2)^1/2 = tr (C_a C_b)^1/2: a sum of roots of the symmetric PSD form's eigenvalues
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ sigma_b @ root_a).clip(min=0)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * cross)


def frechet_distance_to(features, mu, sigma) -> float:
    """Frechet distance between the Gaussian fitted to (N, F) features and N(mu, sigma).

    For N <= F, C_a = X^T X with X the centred features / sqrt(N - 1) has rank < N, and the nonzero
    eigenvalues of C_a C_b are those of X C_b X^T (N x N): the same number in O(N F^2), exact where the
    F x F route loses ~sqrt(eps) to C_a's null space (a small folder against a 2048-d reference).
    """
    features = np.asarray(features, np.float64)
    mu_a, n = features.mean(axis=0), len(features)
    if n > features.shape[1]:
        return frechet_distance_stats(*gaussian_stats(features), mu, sigma)
    if n < 2 or np.shape(sigma) != (features.shape[1],) * 2:
        raise ValueError(f"need (N, F) features with N >= 2 and an (F, F) sigma, got {features.shape} and "
                         f"{np.shape(sigma)}")
    x = (features - mu_a) / np.sqrt(n - 1)  # (N, F)
    cross = np.sqrt(np.linalg.eigvalsh(x @ np.asarray(sigma, np.float64) @ x.T).clip(min=0)).sum()
    diff = mu_a - np.asarray(mu, np.float64)
    return float(diff @ diff + (x * x).sum() + np.trace(sigma) - 2 * cross)


def kernel_inception_distance(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> dict:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, over random subsets."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs subsets of >= 2 images per side, got {len(a)} and {len(b)} images")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy, k_xy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values.append(within - 2 * k_xy.mean())
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "subsets": subsets,
            "subset_size": m}


# ---------------------------------------------------------------------- statistics files

def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, n: int) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to other names
        np.savez(f, mu=mu, sigma=sigma, n=n)


def load_stats(path: str | Path) -> dict:
    """{"mu", "sigma", "n" (None when the file has none)} of a pytorch-fid style .npz."""
    with np.load(path) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise ValueError(f"{path} has no {' or '.join(missing)}: expected pytorch-fid's statistics keys "
                             f"mu and sigma, found {f.files}")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        n = int(f["n"]) if "n" in f.files else None
    if mu.shape != (DIMS,) or sigma.shape != (DIMS, DIMS):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not pool3 statistics "
                         f"({DIMS},) and ({DIMS}, {DIMS})")
    return {"mu": mu, "sigma": sigma, "n": n}


# ------------------------------------------------------------------------------ commands

def _features_of(model, folder, batch_size, workers, device) -> dict:
    found = folder_features(model, folder, batch_size, workers, device)
    if found["n"] < 2:
        raise ValueError(f"{folder}: {found['n']} readable images ({found['skipped']} unreadable); "
                         f"FID needs at least 2")
    return found


def _weights_info(path: str | None) -> dict:
    path = path or default_weights_path()
    digest = file_sha256(path)
    return {"path": str(path), "sha256": digest, "pytorch_fid_weights": digest.startswith(FID_WEIGHTS_SHA256_PREFIX)}


def _side(found: dict) -> dict:
    return {k: v for k, v in found.items() if k != "features"}


def fid(images, ref, inception: str | None = None, batch_size: int = 50, device="cpu", workers: int = 0,
        kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """FID of the folder `images` against `ref` (a folder or a statistics .npz); KID when ref is a folder."""
    if not (os.path.isdir(ref) or (os.path.isfile(ref) and str(ref).endswith(".npz"))):
        raise FileNotFoundError(f"--ref {ref!r} is neither an images folder nor a statistics .npz file")
    start = time.perf_counter()
    model = load_fid_inception(inception, device)
    ours = _features_of(model, images, batch_size, workers, device)
    kid = None
    if os.path.isdir(ref):
        theirs = _features_of(model, ref, batch_size, workers, device)
        reference = {"kind": "folder", **_side(theirs)}
        ref_mu, ref_sigma = gaussian_stats(theirs["features"])
        if kid_subsets > 0:
            kid = kernel_inception_distance(ours["features"], theirs["features"], kid_subsets, kid_subset_size,
                                            seed)
    else:
        stats = load_stats(ref)
        reference = {"kind": "stats", "path": str(ref), "n": stats["n"]}
        ref_mu, ref_sigma = stats["mu"], stats["sigma"]
    return {"fid": frechet_distance_to(ours["features"], ref_mu, ref_sigma), "kid": kid, "images": _side(ours),
            "ref": reference, "inception": _weights_info(inception), "feature_dim": DIMS,
            "seconds": time.perf_counter() - start}


def fid_stats(images, out, inception: str | None = None, batch_size: int = 50, device="cpu",
              workers: int = 0) -> dict:
    """Write the folder's pool3 mu and sigma to `out` (.npz, pytorch-fid's keys); the summary."""
    if not str(out).endswith(".npz"):
        raise ValueError(f"--out must name a .npz file, got {out!r}")
    model = load_fid_inception(inception, device)
    found = _features_of(model, images, batch_size, workers, device)
    mu, sigma = gaussian_stats(found["features"])
    save_stats(out, mu, sigma, found["n"])
    return {"stats": str(out), "images": _side(found), "inception": _weights_info(inception), "feature_dim": DIMS}


def _skipped(side: dict) -> str:
    if not side.get("skipped"):
        return ""
    names = ", ".join(side["skipped_files"][:5]) + (", ..." if side["skipped"] > 5 else "")
    return f" ({side['skipped']} unreadable skipped: {names})"


def format_fid(result: dict) -> str:
    """The FID (and KID) result as plain text."""
    ours, ref = result["images"], result["ref"]
    ref_n = "n unknown" if ref["n"] is None else f"{ref['n']} images"
    lines = [f"{'images':<10}{ours['path']}: {ours['n']} images{_skipped(ours)}",
             f"{'reference':<10}{ref['path']}: {ref['kind']}, {ref_n}{_skipped(ref)}",
             f"{'FID':<10}{result['fid']:.4f}"]
    if result["kid"]:
        kid = result["kid"]
        lines.append(f"{'KID':<10}{kid['mean']:.6f} +- {kid['std']:.6f} "
                     f"({kid['subsets']} subsets of {kid['subset_size']})")
    lines += _notes(result["inception"], min(ours["n"], ref["n"] or ours["n"]))
    return "\n".join(lines)


def format_stats(result: dict) -> str:
    found = result["images"]
    lines = [f"wrote {result['stats']}: mu, sigma of {found['n']} images in {found['path']}{_skipped(found)}"]
    return "\n".join(lines + _notes(result["inception"], found["n"]))


def _notes(weights: dict, n: int) -> list[str]:
    notes = []
    if not weights["pytorch_fid_weights"]:
        notes.append(f"note: {weights['path']} is not {FID_WEIGHTS_NAME} (sha256 {weights['sha256'][:8]}...): "
                     f"these numbers are not comparable with published FIDs")
    if n < DIMS:
        notes.append(f"note: {n} images < {DIMS} features: the covariance is rank-deficient and FID is biased "
                     f"upwards at small N; compare FIDs only at equal N")
    return notes
