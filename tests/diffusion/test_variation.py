"""Variation seeds' slerp against its closed form: the ends exactly, the angles and norm of the great-circle path,
column by column as the A1111 web UI's slerp (dim 1 of one image's (C, H, W)), and the lerp where noises coincide."""
import math

import numpy as np
import pytest
import torch

from ldm.diffusion.variation import grid_seeds, slerp


def _pair(angle: float, shape=(2, 3, 16, 5), seed=0):
    """Two unit vectors along dim -2 of every (b, c, :, w) column, `angle` apart (Gram-Schmidt on Gaussians)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    u = a / a.norm(dim=-2, keepdim=True)
    v = b - (b * u).sum(-2, keepdim=True) * u
    v = v / v.norm(dim=-2, keepdim=True)
    return u, math.cos(angle) * u + math.sin(angle) * v


def _angle(x, y):
    cos = (x * y).sum(-2) / (x.norm(dim=-2) * y.norm(dim=-2))
    return torch.acos(cos.clamp(-1, 1))


def test_strength_zero_and_one_give_each_noise_exactly():
    g = torch.Generator().manual_seed(1)
    low, high = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert torch.equal(slerp(0.0, low, high), low)
    assert torch.equal(slerp(1.0, low, high), high)


@pytest.mark.parametrize("t", [0.1, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("omega", [0.4, math.pi / 2, 2.5])
def test_the_path_is_the_great_circle(t, omega):
    """Unit vectors omega apart: the result is a unit vector t omega from low and (1 - t) omega from high."""
    low, high = _pair(omega)
    out = slerp(t, low, high)
    torch.testing.assert_close(out.norm(dim=-2), torch.ones_like(out.norm(dim=-2)), atol=1e-12, rtol=0)
    torch.testing.assert_close(_angle(out, low), torch.full_like(_angle(out, low), t * omega), atol=1e-9, rtol=0)
    torch.testing.assert_close(_angle(out, high), torch.full_like(_angle(out, low), (1 - t) * omega), atol=1e-9,
                               rtol=0)


def test_unequal_norms_follow_the_formula_in_numpy():
    """sin((1 - t) w) / sin w low + sin(t w) / sin w high, w the angle of each column, computed per column in numpy."""
    g = torch.Generator().manual_seed(2)
    low, high = torch.randn(1, 2, 6, 3, generator=g) * 3, torch.randn(1, 2, 6, 3, generator=g)
    out, t = slerp(0.25, low, high).numpy(), 0.25
    lo, hi = low.double().numpy(), high.double().numpy()
    for c in range(2):
        for w in range(3):
            x, y = lo[0, c, :, w], hi[0, c, :, w]
            om = np.arccos(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
            ref = np.sin((1 - t) * om) / np.sin(om) * x + np.sin(t * om) / np.sin(om) * y
            np.testing.assert_allclose(out[0, c, :, w], ref, rtol=1e-5, atol=1e-6)


def test_columns_are_interpolated_each_on_its_own():
    """Along dim -2 only (A1111's dim 1 of (C, H, W)): a column's result depends on that column alone."""
    g = torch.Generator().manual_seed(3)
    low, high = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    out = slerp(0.4, low, high)
    high2 = high.clone()
    high2[0, 1, :, 5] *= -2                          # another column's partner changed
    changed = slerp(0.4, low, high2)
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[0, 1, :, 5] = False
    assert torch.equal(changed[mask], out[mask]) and not torch.equal(changed[~mask], out[~mask])


def test_coinciding_noises_fall_back_to_the_lerp():
    """A subseed equal to the seed: cos rounds to 1, acos(1) / sin(0) would be 0 / 0; the lerp gives the noise."""
    low = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    for t in (0.2, 0.5, 0.8):
        torch.testing.assert_close(slerp(t, low, low), low, atol=1e-6, rtol=0)
        torch.testing.assert_close(slerp(t, low, 1.0001 * low), (1 + 1e-4 * t) * low, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"in \[0, 1\], got 1.5"):
        slerp(1.5, low, low)


def test_grid_seeds_follow_a1111():
    """processing.py: all_seeds = seed + (i if strength == 0 else 0), all_subseeds = subseed + i."""
    assert grid_seeds(7, 3) == ([7, 8, 9], None)
    assert grid_seeds(7, 3, 20, 0.0) == ([7, 8, 9], [20, 21, 22])
    assert grid_seeds(7, 3, 20, 0.3) == ([7, 7, 7], [20, 21, 22])
