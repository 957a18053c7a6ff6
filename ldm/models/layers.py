"""Small building blocks shared by the U-Net and the autoencoder.

Timestep embedding, GroupNorm(+SiLU), ResBlock, resamplers, attention, GEGLU
feed-forward and the spatial transformer of Rombach et al. 2022 (LDM, Sec. 3.3).
Attention and GroupNorm always go through `ldm.ops`, so the Triton kernels reach
every model without the models knowing about them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm import ops


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)] with f_i = max_period^(-i/half) (Vaswani 2017).

    t: (B,) float or int, any scale; the frequencies suit discrete steps in [0, 1000).
    Returns (B, dim) float32.
    """
    if dim % 2:
        raise ValueError(f"timestep embedding dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class GroupNorm(nn.Module):
    """GroupNorm with an optional fused SiLU; holds weight/bias and calls ldm.ops.group_norm."""

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-5, activation: str | None = None):
        super().__init__()
        if channels % groups:
            raise ValueError(f"GroupNorm: channels {channels} not divisible by groups {groups}")
        self.groups, self.eps, self.activation = groups, eps, activation
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return ops.group_norm(x, self.groups, self.weight, self.bias, self.eps, activation=self.activation)


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal embedding (DDPM, Ho et al. 2020)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


class ResBlock(nn.Module):
    """Pre-activation residual block; the embedding (if any) is added between the two convs."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int | None = None,  # time(+cond) embedding width; None: no embedding input
        groups: int = 32,            # GroupNorm groups
        eps: float = 1e-5,           # GroupNorm epsilon
        dropout: float = 0.0,        # before the second conv, as in DDPM
    ):
        super().__init__()
        self.norm1 = GroupNorm(in_ch, groups, eps, activation="silu")
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch) if emb_dim is not None else None
        self.norm2 = GroupNorm(out_ch, groups, eps, activation="silu")
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, emb=None):
        h = self.conv1(self.norm1(x))  # (B, out, H, W)
        if self.emb_proj is not None:
            h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class Downsample(nn.Module):
    """Strided 3x3 conv halving H and W."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x then a 3x3 conv (avoids transposed-conv checkerboards, Odena 2016)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention from x (B, N, C) to context (B, L, C_ctx); self-attention when context is None."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, head_dim: int = 64):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim)
        # Perturbed-attention guidance (ldm.models.unet.perturbed_self_attention sets it for one call):
        # (B,) bool, the samples whose self-attention map is replaced by the identity; None: none.
        self.identity: torch.Tensor | None = None

    def _split(self, x):
        B, N, _ = x.shape
        return x.view(B, N, self.heads, -1).transpose(1, 2)  # (B, H, N, d)

    def attend(self, x, context=None, mask=None):
        """(q, heads' output), both (B, H, N, d), before `merge`: adapters add their own terms in between."""
        context = x if context is None else context
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
        return q, ops.attention(q, k, v, key_padding_mask=mask)

    def merge(self, out):
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, H, N, d) -> (B, N, C)

    def forward(self, x, context=None, mask=None):
        if self.identity is not None:
            return self.perturbed(x, context, mask)
        return self.merge(self.attend(x, context, mask)[1])

    def perturbed(self, x, context=None, mask=None):
        """Self-attention with its map softmax(Q K^T / sqrt(d)) replaced by the identity for the samples in
        `identity` (Ahn et al. 2024, sec. 4, "perturbed self-attention": I V = V): each token attends only to
        itself, so every head returns its own V and the layer gives to_out(to_v(x)), computed without any
        attention kernel, so alike on every backend. The other samples attend as usual."""
        if context is not None:
            raise ValueError("perturbed-attention guidance replaces self-attention maps; this is a cross-attention")
        chosen = self.identity.to(x.device)
        if chosen.shape != (x.shape[0],):
            raise ValueError(f"perturbed samples {tuple(chosen.shape)} for a batch of {x.shape[0]}")
        identity = self.to_out(self.to_v(x[chosen]))                      # (b, N, C)
        out = identity.new_empty(x.shape[0], x.shape[1], identity.shape[-1])
        out[chosen] = identity
        if not bool(chosen.all()):
            out[~chosen] = self.merge(self.attend(x[~chosen], None, None if mask is None else mask[~chosen])[1])
        return out


class GEGLU(nn.Module):
    """x W * GELU(x V): the gated GELU of Shazeer 2020, eq. 6."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU expansion by `mult`, dropout, projection back."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.geglu = GEGLU(dim, dim * mult)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim * mult, dim)

    def forward(self, x):
        return self.out(self.dropout(self.geglu(x)))


class TransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the text tokens, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x, context, mask=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


def position_features(h: int, w: int, n_freq: int, device=None) -> torch.Tensor:
    """(h*w, 4*n_freq) sin/cos of each token's centre (y, x) in [0, 1] at frequencies 1..n_freq * pi.

    Resolution-free: a token's features depend on where it sits in the image, not on h, w.
    """
    y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    f = torch.arange(1, n_freq + 1, device=device, dtype=torch.float32) * math.pi
    ang = torch.cat([yy.reshape(-1, 1) * f, xx.reshape(-1, 1) * f], dim=1)  # (h*w, 2*n_freq)
    return torch.cat([ang.sin(), ang.cos()], dim=1)


POS_FREQS = 8  # position features per axis and per sin/cos: frequencies pi .. 8 pi


class SpatialTransformer(nn.Module):
    """GroupNorm, project to tokens, `depth` transformer blocks, project back, residual (LDM Sec. 3.3).

    pos_embed (not in SD): adds a learned projection of fixed 2-D sin/cos position features to
    the tokens, so cross-attention can tie words such as "on the left" to places. Convolutions
    see position only through the zero padding, weakly. The projection has nn.Linear's default
    (random) initialisation: a zero start is a saddle, as a 4000-step fine-tune found (its
    projections stayed at ~0.003, docs/stage2-latent.md). Stage 2's init_from zeroes it instead
    when the source folder was trained without it, so that run starts as exactly that model.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        depth: int = 1,
        groups: int = 32,
        linear_projection: bool = False,  # SD 2.x projects with Linear, SD 1.x with a 1x1 conv
        dropout: float = 0.0,
        pos_embed: bool = False,
    ):
        super().__init__()
        inner = heads * head_dim
        self.linear_projection = linear_projection
        if pos_embed:
            self.pos_proj = nn.Linear(4 * POS_FREQS, inner)
        else:
            self.pos_proj = None
        # eps 1e-6 here (not the ResBlocks' 1e-5) matches the released SD weights
        self.norm = GroupNorm(channels, groups, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear_projection else nn.Conv2d(channels, inner, 1)
        self.blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim, dropout) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if linear_projection else nn.Conv2d(inner, channels, 1)

    def forward(self, x, context, mask=None):
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.linear_projection:
            h = self.proj_in(h.flatten(2).transpose(1, 2))  # (B, HW, inner)
        else:
            h = self.proj_in(h).flatten(2).transpose(1, 2)  # (B, HW, inner)
        if self.pos_proj is not None:
            feats = position_features(H, W, POS_FREQS, h.device)
            h = h + self.pos_proj(feats.to(self.pos_proj.weight.dtype)).to(h.dtype)
        for block in self.blocks:
            h = block(h, context, mask)
        if self.linear_projection:
            h = self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)
        else:
            h = self.proj_out(h.transpose(1, 2).reshape(B, -1, H, W))
        return x + h
