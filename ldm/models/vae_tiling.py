"""Exact tiled decoding and encoding for AutoencoderKL: big images in bounded memory, the same result.

diffusers' `enable_tiling` decodes overlapping tiles on their own and blends them: each tile gets its own
GroupNorm statistics and its own (local) mid-block attention, so the image differs from the untiled decode
and can show seams or tone shifts. Here the network runs op by op over the whole image instead (domain
decomposition with halo exchange), so the result equals the untiled one within float rounding:

- post_quant_conv, conv_in and the mid block (its attention is global) run on the whole latent: at the
  latent resolution they are small. The encoder's mid block, norm_out and conv_out likewise.
- Every op of the up path (down path) runs tile by tile over its output grid. The current full activation
  lives on a store device (the CPU when computing on CUDA; else the compute device itself); a tile reads its
  core plus the halo its 3x3 conv needs from the store (zero outside the image, as the untiled conv pads),
  computes on the compute device and writes its core into the op's output on the store.
- GroupNorm (+SiLU) is fused into the conv that consumes it: its per (sample, group) mean and variance come
  from the producing op, which merges each output tile's fp32 moments into float64 running ones (Chan et al.
  1979's pairwise update, no E[x^2] - E[x]^2); the consumer normalises each input slice, halo included,
  with those global statistics. The normalised tensor is never stored.
- A ResBlock's second conv writes its output over its own input, keeping the 1-px strips of original values
  that later tiles read as halo, so a block holds its input and one activation on the store, not three.

The tile side is given in image pixels; a level at 1/s of the image resolution uses tiles of tile/s.
Measured on a 2-core CPU (store = compute device, docs/provenance/vae_tiling_memory.py): an SD-sized decoder
at 1024x1024 in fp32 takes 3.9 GiB beyond its weights untiled, 2.4 GiB in 512-px tiles, 1.8 GiB in 256-px
tiles, at about the same speed; the activations on the store set that floor. On CUDA with the CPU store the
GPU holds the weights, the latent-resolution blocks and one tile's working set.

Caution: inference only (no autograd graph). Dropout is applied per tile, so only eval mode (or p = 0)
equals the untiled network. Each op moves its whole input through the compute device once, so on CUDA
with a CPU store the decode is bound by host-device copies (not measured here: no GPU was at hand).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

TILINGS = ("off", "auto")      # or a tile side in pixels
AUTO_TILE = 512                # "auto": tiles of 512 px ...
AUTO_ABOVE = 2 * 1024 * 1024   # ... on CUDA for images of more than 2 Mpx (beyond SDXL's and FLUX.1's 1 Mpx)


def parse_tiling(setting: str | int) -> str:
    """A --vae-tiling value checked: "off", "auto" or a positive number of pixels (as a string)."""
    text = str(setting).strip().lower()
    if text in TILINGS or (text.isdigit() and int(text) > 0):
        return text
    raise ValueError(f"VAE tiling must be 'off', 'auto' or a tile side in pixels (> 0), got {setting!r}")


def tile_for(setting: str | int, device: torch.device, height: int, width: int) -> int | None:
    """The tile side in pixels a tiling setting gives for an image of height x width on `device`; None: untiled."""
    text = parse_tiling(setting)
    if text == "off":
        return None
    if text == "auto":
        return AUTO_TILE if torch.device(device).type == "cuda" and height * width > AUTO_ABOVE else None
    return int(text)


# ----------------------------------------------------------------------------
# GroupNorm statistics, merged tile by tile.

class GroupStats:
    """Per (sample, group) element count, mean and sum of squared deviations (M2) of a tensor seen in tiles."""

    def __init__(self, groups: int):
        self.groups, self.n, self.mean, self.m2 = groups, 0, None, None

    def add(self, t: torch.Tensor) -> None:
        """Merge a tile (B, C, h, w): per-channel fp32 moments, combined into groups and into the running ones."""
        B, C, h, w = t.shape
        acc = torch.float32 if t.device.type == "mps" else torch.float64     # MPS has no float64
        var, mean = torch.var_mean(t.float(), dim=(2, 3), correction=0)      # (B, C), any memory format
        mean_c = mean.to(acc).view(B, self.groups, -1)                       # (B, G, C/G)
        m2_c = var.to(acc).view(B, self.groups, -1) * (h * w)
        mean = mean_c.mean(-1)                                               # (B, G): equal counts per channel
        m2 = m2_c.sum(-1) + (h * w) * (mean_c - mean[..., None]).square().sum(-1)
        n = C // self.groups * h * w
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n                                                   # Chan et al.: merge (n_a, n_b)
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total

    def normalizer(self, norm: nn.Module, dropout: nn.Module | None = None):
        """The tile function of GroupNorm module `norm` (+ its activation, then `dropout`) with these statistics:
        y = x * scale + shift per (sample, channel), as ATen's GroupNorm applies it, in fp32."""
        B, G = self.mean.shape
        C = norm.weight.shape[0]
        rstd = (self.m2 / self.n + norm.eps).rsqrt().repeat_interleave(C // G, dim=1)   # (B, C)
        mean = self.mean.repeat_interleave(C // G, dim=1)
        scale = rstd * norm.weight.to(rstd.dtype)
        shift = norm.bias.to(rstd.dtype) - mean * scale
        scale, shift = scale.float()[:, :, None, None], shift.float()[:, :, None, None]   # (B, C, 1, 1)

        def apply(t: torch.Tensor) -> torch.Tensor:
            y = torch.addcmul(shift, t.float(), scale)                     # one fp32 pass, t's memory format
            if norm.activation == "silu":
                y = F.silu(y, inplace=True)
            y = y.to(t.dtype)
            return y if dropout is None else dropout(y)
        return apply


def whole_stats(x: torch.Tensor, groups: int) -> GroupStats:
    stats = GroupStats(groups)
    stats.add(x)
    return stats


# ----------------------------------------------------------------------------
# One op over the image, tile by tile.

def _tiles(height: int, width: int, side: int) -> Iterator[tuple[int, int, int, int]]:
    for a in range(0, height, side):
        for c in range(0, width, side):
            yield a, min(a + side, height), c, min(c + side, width)


def _span(lo: int, hi: int, n: int, up: bool):
    """Conv-input rows [lo, hi) of a source with n rows (2n after a nearest 2x upsample when `up`), zero
    outside: (source rows to read, the rows to keep after upsampling them, zero rows before, zero rows after)."""
    m = 2 * n if up else n
    v0, v1 = max(lo, 0), min(hi, m)
    if not up:
        return slice(v0, v1), slice(None), v0 - lo, hi - v1
    s0, s1 = v0 // 2, (v1 + 1) // 2
    return slice(s0, s1), slice(v0 - 2 * s0, v1 - 2 * s0), v0 - lo, hi - v1


class Tiler:
    """Runs convs tile by tile: inputs and outputs on `store`, the compute on `device`."""

    def __init__(self, device: torch.device, store: torch.device, memory_format: torch.memory_format):
        self.device, self.store, self.memory_format = device, store, memory_format

    def conv(self, x: torch.Tensor, conv: nn.Conv2d, side: int, pre=None, resample: str | None = None,
             residual: torch.Tensor | None = None, skip: nn.Module | None = None, groups: int | None = None,
             overwrite: bool = False) -> tuple[torch.Tensor, GroupStats | None]:
        """conv(pre(x)) (+ skip(residual)) for a 3x3 `conv`; resample "up" (nearest 2x before the conv) or "down"
        (pad right/bottom, stride 2). pre: a per-pixel tile function (`GroupStats.normalizer`). groups: also
        return the output's GroupNorm statistics. overwrite: write the output over x (stride 1, as many channels,
        same dtype), keeping the original halo strips that later tiles read: the band above's last row and the
        left tile's last column."""
        B, _, H, W = x.shape
        up, stride = resample == "up", 2 if resample == "down" else 1
        Ho, Wo = ((2 * H, 2 * W) if up else ((H - 2) // 2 + 1, (W - 2) // 2 + 1) if stride == 2 else (H, W))
        if overwrite and (up or stride != 1 or conv.out_channels != x.shape[1]):
            raise ValueError("overwrite needs a stride-1 conv from and to as many channels")
        stats = GroupStats(groups) if groups else None
        y = above = below = column = None    # overwrite: the original strips
        for a, b, c, d in _tiles(Ho, Wo, side):
            # conv-input rows the output tile reads: a 1-px halo, or the stride-2 window (pad bottom/right only)
            rows, cols = ((2 * a, 2 * b + 1), (2 * c, 2 * d + 1)) if stride == 2 else ((a - 1, b + 1), (c - 1, d + 1))
            (ry, ky, top, bottom), (rx, kx, left, right) = _span(*rows, H, up), _span(*cols, W, up)
            t = x[:, :, ry, rx].to(self.device, memory_format=self.memory_format, copy=overwrite)
            if overwrite:                      # x above and left of this tile already holds outputs
                if c == 0:                     # a new band: its last row, as read by the band below
                    above, below = below, x[:, :, b - 1].clone()
                if a > 0:
                    t[:, :, 0] = above[:, :, rx]
                if c > 0:
                    t[:, :, int(a > 0):int(a > 0) + b - a, 0] = column
                column = x[:, :, a:b, d - 1].clone()
            if pre is not None:
                t = pre(t)
            if up:
                t = F.interpolate(t, scale_factor=2.0, mode="nearest")[:, :, ky, kx]
            t = F.conv2d(F.pad(t, (left, right, top, bottom)), conv.weight, conv.bias, stride)   # (B, C', b-a, d-c)
            if residual is not None:
                t = skip(residual[:, :, a:b, c:d].to(self.device, memory_format=self.memory_format)) + t
            if stats is not None:
                stats.add(t)
            if y is None:
                y = x if overwrite and x.dtype == t.dtype else torch.empty(
                    (B, t.shape[1], Ho, Wo), dtype=t.dtype, device=self.store, memory_format=self.memory_format)
            y[:, :, a:b, c:d] = t
        return y, stats

    def res_block(self, block: nn.Module, x: torch.Tensor, stats: GroupStats, side: int, groups: int):
        """A ResBlock (ldm.models.autoencoder) in two sweeps, the second writing over the first's output: the
        block holds x and one activation as wide as its output on the store."""
        h, h_stats = self.conv(x, block.conv1, side, pre=stats.normalizer(block.norm1), groups=groups)
        return self.conv(h, block.conv2, side, pre=h_stats.normalizer(block.norm2, block.dropout),
                         residual=x, skip=block.skip, groups=groups, overwrite=True)


def _setup(x: torch.Tensor, tile: int, store: torch.device | str | None) -> Tiler:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile!r}")
    store = torch.device("cpu") if store is None and x.device.type == "cuda" else torch.device(store or x.device)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return Tiler(x.device, store, torch.channels_last if channels_last else torch.contiguous_format)


def _side(tile: int, scale: int) -> int:
    return max(1, -(-tile // scale))


# ----------------------------------------------------------------------------
# The two halves of the autoencoder.

@torch.no_grad()
def tiled_decode(decoder: nn.Module, z: torch.Tensor, tile: int, store: torch.device | str | None = None):
    """Decoder(z) (after post_quant_conv) for z (B, z_channels, h, w) in tiles of `tile` image pixels, the
    activations kept on `store` (default: the CPU for CUDA inputs, else z's device). Returns the image on
    z's device; an image within one tile is decoded plainly."""
    tiler = _setup(z, tile, store)
    f = 2 ** (len(decoder.up) - 1)
    if tile >= f * max(z.shape[-2:]):
        return decoder(z)
    groups = decoder.norm_out.num_groups
    x = decoder.conv_in(z)
    for block in decoder.mid.blocks():                 # the whole latent: the attention is global
        x = block(x)
    stats, x = whole_stats(x, groups), x.to(tiler.store)
    scale = f                                          # image pixels per activation pixel
    for level in decoder.up:
        for block in level.res:
            x, stats = tiler.res_block(block, x, stats, _side(tile, scale), groups)
        if level.resample is not None:
            scale //= 2
            x, stats = tiler.conv(x, level.resample.conv, _side(tile, scale), resample="up", groups=groups)
    image, _ = tiler.conv(x, decoder.conv_out, tile, pre=stats.normalizer(decoder.norm_out))
    return image.to(z.device)


@torch.no_grad()
def tiled_encode(encoder: nn.Module, x: torch.Tensor, tile: int, store: torch.device | str | None = None):
    """Encoder(x) (moments before quant_conv) for images x (B, C, H, W) in tiles of `tile` pixels; `store` as in
    `tiled_decode`. The mid block, norm_out and conv_out run on the whole latent. An image within one tile is
    encoded plainly."""
    tiler = _setup(x, tile, store)
    if tile >= max(x.shape[-2:]):
        return encoder(x)
    groups = encoder.norm_out.num_groups
    h, stats = tiler.conv(x.to(tiler.store), encoder.conv_in, tile, groups=groups)
    scale = 1
    for level in encoder.down:
        for block in level.res:
            h, stats = tiler.res_block(block, h, stats, _side(tile, scale), groups)
        if level.resample is not None:
            scale *= 2
            h, stats = tiler.conv(h, level.resample.conv, _side(tile, scale), resample="down", groups=groups)
    h = h.to(x.device)
    for block in encoder.mid.blocks():
        h = block(h)
    return encoder.conv_out(encoder.norm_out(h))


class Tiled(nn.Module):
    """An Encoder or Decoder run by `tiled_encode` / `tiled_decode`; a module, so that AutoencoderKL's
    dtype copies of the weights (functional_call in its fp16 decode) reach the tiled path too."""

    def __init__(self, module: nn.Module, tile: int, store: torch.device | str | None = None):
        super().__init__()
        self.module, self.tile, self.store = module, tile, store

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = tiled_decode if hasattr(self.module, "up") else tiled_encode
        return run(self.module, x, self.tile, self.store)
