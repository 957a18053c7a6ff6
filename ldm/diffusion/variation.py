"""Variation seeds, as the A1111 web UI's "Variation seed" and "Variation strength" (infotext: "Variation seed: S,
Variation seed strength: X"): the starting noise is slerp(X, noise(seed), noise(subseed)), so X = 0 draws the seed's
image, X = 1 the subseed's, and a small X a nearby variation of the seed's.

Spherical, not linear: two independent Gaussian noises are nearly orthogonal, and their average has norm ~0.71 of
either's at X = 0.5, a noise a model never saw; the great-circle path keeps the norm (Shoemake 1985; White 2016,
"Sampling Generative Networks", for GAN latents).
"""
from __future__ import annotations

import torch

PARALLEL = 0.9995   # cos(angle) above which the two noises count as the same direction: lerp (A1111's threshold)


def slerp(strength: float, low: torch.Tensor, high: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Spherical interpolation from `low` (strength 0) to `high` (1) of the vectors along `dim`, each on its own:
    with omega the angle between them, sin((1 - X) omega) / sin(omega) low + sin(X omega) / sin(omega) high.

    As the A1111 web UI's modules/rng.py `slerp`, which normalises dim 1 of one image's (C, H, W) noise: the vectors
    are each channel's columns of H values, dim -2 of our (B, C, H, W) latents (a seed's CPU torch.randn noise is
    A1111's with its "CPU" noise source, so the two mix it alike, ours in float64). Where two vectors are nearly parallel (cos > 0.9995) it falls back to the lerp (1 - X) low + X high
    vector by vector; A1111 tests the image's mean cosine and weights its lerp the other way round (low X + high
    (1 - X)), which only a subseed equal to the seed reaches, where every weighting gives the same noise."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"variation strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return low
    if strength == 1.0:
        return high
    lo, hi = low.double(), high.double()          # acos near 1 loses digits in float32
    cos = (lo * hi).sum(dim, keepdim=True) / (lo.norm(dim=dim, keepdim=True) * hi.norm(dim=dim, keepdim=True))
    omega = torch.acos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    parallel = cos > PARALLEL
    safe = torch.where(parallel, torch.ones_like(sin), sin)     # no 0 / 0 where the lerp takes over
    a = torch.where(parallel, torch.full_like(sin, 1.0 - strength), torch.sin((1.0 - strength) * omega) / safe)
    b = torch.where(parallel, torch.full_like(sin, strength), torch.sin(strength * omega) / safe)
    return (a * lo + b * hi).to(low.dtype)


def grid_seeds(seed: int, n: int, subseed: int | None = None,
               strength: float = 0.0) -> tuple[list[int], list[int] | None]:
    """Seeds and subseeds of a batch of n images, as the A1111 web UI's process_images: image i takes seed + i, but
    with variation (strength > 0) every image takes `seed`, so a grid shows variations of one image; subseeds are
    subseed + i either way (None without a subseed)."""
    vary = subseed is not None and strength > 0
    return [seed + (0 if vary else i) for i in range(n)], None if subseed is None else [subseed + i for i in range(n)]
