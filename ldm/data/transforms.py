"""Image preprocessing shared by every data source: any PIL image -> float (3, H, W) in [-1, 1]."""
from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, ImageOps

CROPS = ("center", "random")

# What a broken, truncated or non-image file raises inside PIL (SyntaxError and
# EOFError come from some older decoders; DecompressionBombError is an Exception).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def eight_bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale (PIL's I;16 modes: PNG depth maps) -> L, 65535 -> 255; other images as they are. PIL's own
    convert clips every value above 255 to white."""
    if not image.mode.startswith("I;16"):
        return image
    return Image.fromarray(np.clip(np.round(np.asarray(image, dtype=np.float64) / 257), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels are composited over white, not left black."""
    image = eight_bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _source(value, root: str | None):
    """What `Image.open` reads for an image value: a path or a bytes buffer."""
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
    return io.BytesIO(data) if data is not None else path


# EXIF orientations 5-8 turn the picture a quarter: its upright width is the stored height.
_QUARTER_TURNS = (5, 6, 7, 8)


def open_image(value, root: str | None = None, draft: int | None = None, mode: str = "RGB") -> Image.Image:
    """Decode an image given as a path, raw bytes, a {"bytes", "path"} dict or a PIL image, upright, in
    `mode` (RGB: `to_rgb`, transparency over white; else PIL's convert, e.g. "L" for masks).

    Relative paths are taken under `root`. Cameras store pictures as shot and record the turn
    in EXIF: the turn is applied, or portraits would train as landscapes. `draft` lets JPEG
    decode at a reduced scale (at least that many pixels a side), which makes a validation
    pass cheap. Raises one of DECODE_ERRORS for anything that is not a complete image.
    """
    as_mode = to_rgb if mode == "RGB" else (lambda image: eight_bit(image).convert(mode))
    if isinstance(value, Image.Image):
        return as_mode(value)
    with Image.open(_source(value, root)) as image:
        if draft is not None:
            image.draft("RGB", (draft, draft))
        image.load()  # decodes every byte: truncated files fail here, not later
        return as_mode(ImageOps.exif_transpose(image))


def image_size(value, root: str | None = None) -> tuple[int, int]:
    """(width, height) of an image value as `open_image` returns it, from its header alone."""
    if isinstance(value, Image.Image):
        return value.size
    with Image.open(_source(value, root)) as image:
        width, height = image.size
        turned = image.getexif().get(0x0112, 1) in _QUARTER_TURNS  # 0x0112: the Orientation tag
    return (height, width) if turned else (width, height)


def cover_and_crop(image: Image.Image, size: tuple[int, int], crop: str = "center",
                   rng: np.random.Generator | None = None, box: bool = False):
    """Resize to cover `size` = (width, height) with the aspect kept, then crop it out (center or random).
    box: also return (top, left, resized width): where the crop sits in the resized picture."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    width, height = size
    w, h = image.size
    scale = max(width / w, height / h)
    if (w, h) != size and scale != 1:  # an image already at size keeps its exact pixels
        image = image.resize((max(width, round(w * scale)), max(height, round(h * scale))),
                             Image.Resampling.BICUBIC, reducing_gap=3.0)
        w, h = image.size
    if crop == "random":
        rng = rng if rng is not None else np.random.default_rng()
        left, top = int(rng.integers(w - width + 1)), int(rng.integers(h - height + 1))
    else:
        left, top = (w - width) // 2, (h - height) // 2
    if (w, h) != size:
        image = image.crop((left, top, left + width, top + height))
    return (image, (top, left, w)) if box else image


def to_tensor(pixels) -> torch.Tensor:
    """uint8 (H, W, 3) array or RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    array = np.asarray(pixels, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def preprocess(image: Image.Image, size: int | tuple[int, int], crop: str = "center", flip: bool = False,
               rng: np.random.Generator | None = None, size_ids: bool = False):
    """RGB PIL image -> (3, height, width) in [-1, 1] (an int size is a square); `rng` drives crop and flip.

    size_ids: also return SDXL's size and crop numbers of the picture (Podell et al. 2023, sec. 2.2):
    (original height, original width, crop top, crop left), float32, the crop's corner in the resized
    picture as it ends up (flipped, if it was), as diffusers' SDXL training script records them."""
    rng = rng if rng is not None else np.random.default_rng()
    original = image.size
    image, (top, left, resized_width) = cover_and_crop(to_rgb(image), (size, size) if isinstance(size, int)
                                                       else tuple(size), crop, rng, box=True)
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = resized_width - image.width - left          # the same box, seen in the flipped picture
    pixels = to_tensor(image)
    if not size_ids:
        return pixels
    return pixels, torch.tensor([original[1], original[0], top, left], dtype=torch.float32)
