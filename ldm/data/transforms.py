"""Image preprocessing shared by every data source: any PIL image -> float (3, R, R) in [-1, 1]."""
from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

CROPS = ("center", "random")

# What a broken, truncated or non-image file raises inside PIL (SyntaxError and
# EOFError come from some older decoders; DecompressionBombError is an Exception).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels are composited over white, not left black."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def open_image(value, root: str | None = None, draft: int | None = None) -> Image.Image:
    """Decode an image given as a path, raw bytes, a {"bytes", "path"} dict or a PIL image.

    Relative paths are taken under `root`. `draft` lets JPEG decode at a reduced scale
    (at least that many pixels a side), which makes a validation pass cheap.
    Raises one of DECODE_ERRORS for anything that is not a complete image.
    """
    if isinstance(value, Image.Image):
        return to_rgb(value)
    data, path = None, None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
    else:
        raise ValueError(f"cannot read an image from a {type(value).__name__}")
    if data is None and path is None:
        raise ValueError("image value holds neither bytes nor a path")
    if data is None and root is not None and not os.path.isabs(path):
        path = os.path.join(root, path)
    with Image.open(io.BytesIO(data) if data is not None else path) as image:
        if draft is not None:
            image.draft("RGB", (draft, draft))
        image.load()  # decodes every byte: truncated files fail here, not later
        return to_rgb(image)


def resize_and_crop(image: Image.Image, resolution: int, crop: str = "center",
                    rng: np.random.Generator | None = None) -> Image.Image:
    """Resize the shorter side to `resolution`, then crop a square (center or random)."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    w, h = image.size
    if min(w, h) != resolution:  # an image already at size keeps its exact pixels
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        w, h = image.size
    if crop == "random":
        rng = rng if rng is not None else np.random.default_rng()
        left, top = int(rng.integers(w - resolution + 1)), int(rng.integers(h - resolution + 1))
    else:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    if (w, h) == (resolution, resolution):
        return image
    return image.crop((left, top, left + resolution, top + resolution))


def cover_and_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to cover `size` = (width, height) with the aspect kept, then crop its centre to it; square sizes
    give `resize_and_crop(image, side)` exactly."""
    width, height = size
    w, h = image.size
    scale = max(width / w, height / h)
    if (w, h) != size and scale != 1:
        image = image.resize((max(width, round(w * scale)), max(height, round(h * scale))),
                             Image.Resampling.BICUBIC, reducing_gap=3.0)
        w, h = image.size
    if (w, h) == size:
        return image
    left, top = (w - width) // 2, (h - height) // 2
    return image.crop((left, top, left + width, top + height))


def to_tensor(pixels) -> torch.Tensor:
    """uint8 (H, W, 3) array or RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    array = np.asarray(pixels, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def preprocess(image: Image.Image, resolution: int, crop: str = "center", flip: bool = False,
               rng: np.random.Generator | None = None) -> torch.Tensor:
    """RGB PIL image -> (3, resolution, resolution) in [-1, 1]; `rng` drives crop and flip."""
    rng = rng if rng is not None else np.random.default_rng()
    image = resize_and_crop(to_rgb(image), resolution, crop, rng)
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)
