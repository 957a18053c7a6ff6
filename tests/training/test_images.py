"""Image grids against torchvision's make_grid (a test-only reference)."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid as tv_make_grid

from ldm.training import make_grid, save_image_grid


def reference(images, nrow):
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return tv_make_grid(pixels, nrow=nrow, padding=2, pad_value=0).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("n, nrow", [(6, 4), (4, 4), (5, 8), (2, 1)])  # ragged last row, one row, nrow > n, one column
def test_grid_matches_torchvision(n, nrow):
    images = torch.rand(n, 3, 5, 7, generator=torch.Generator().manual_seed(n)) * 2.4 - 1.2  # some clipped
    assert np.array_equal(make_grid(images, nrow), reference(images, nrow))


def test_png_round_trip_gray_and_rgb(tmp_path):
    rgb = torch.rand(3, 3, 4, 4) * 2 - 1
    img = save_image_grid(rgb, tmp_path / "sub" / "rgb.png", nrow=2)
    assert img.mode == "RGB"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sub" / "rgb.png")), reference(rgb, 2))
    gray = torch.rand(2, 1, 4, 4) * 2 - 1
    save_image_grid(gray, tmp_path / "gray.png", nrow=2)
    loaded = np.asarray(Image.open(tmp_path / "gray.png"))
    assert loaded.ndim == 2 and np.array_equal(loaded, reference(gray, 2)[..., 0])


def test_bad_shape_named():
    with pytest.raises(ValueError, match=r"\(4, 4, 8, 8\)"):
        make_grid(torch.zeros(4, 4, 8, 8))
