"""MMDiT, the transformer of Stable Diffusion 3 (Esser et al. 2024, "Scaling Rectified Flow Transformers
for High-Resolution Image Synthesis", Sec. 4 and Fig. 2).

Image patches and text tokens keep separate weights (two streams) but meet in one attention over the
concatenated sequence [image; text] in every block (Fig. 2b). Both streams are modulated by the vector
c = MLP(sinusoid(t)) + MLP(pooled text) through adaLN-Zero (Peebles & Xie 2023): shift and scale before
the attention and the MLP, a gate on each residual branch. pooled_dim=0 (ours, for a text encoder without a
pooled vector, such as the shapes world's scratch one): c = MLP(sinusoid(t)) alone. Options of the later releases:
- qk_norm="rms_norm" (SD3.5, Sec. 5.3.2): queries and keys RMS-normalized per head, for stable training.
- dual_attention_layers (SD3.5 medium, "MMDiT-X"): in those blocks the image tokens also attend to
  themselves alone, with a third modulation triple (shift, scale, gate).
The last block's text tokens only serve as keys and values (nothing reads them afterwards): that half
of the block has no query, output projection or MLP, and one (scale, shift) modulation.

Time: t on diffusers' scale, sigma * 1000 for a rectified flow x_t = (1 - sigma) x0 + sigma * noise.
Positions: a fixed 2-D sin/cos table of pos_embed_max_size^2 patches, cropped at its centre to the
latent's patch grid; stored as a buffer (`pos_embed`, (M, M, D)), as the released checkpoints hold it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ldm import ops
from ldm.models.layers import TimestepMLP, timestep_embedding
from ldm.models.weights import Pretrained, strict_from_dict

QK_NORMS = (None, "rms_norm")
TIME_FREQS = 256  # width of the timestep sinusoid


@dataclass
class MMDiTConfig:
    in_channels: int = 16                  # latent channels in
    out_channels: int = 16                 # prediction channels (SD3: the flow velocity)
    patch_size: int = 2                    # latent pixels per patch side
    depth: int = 24                        # joint blocks (diffusers: num_layers)
    num_heads: int = 24                    # attention heads; width D = num_heads * head_dim
    head_dim: int = 64                     # channels per head
    context_dim: int = 4096                # text token width in (diffusers: joint_attention_dim)
    caption_dim: int = 1536                # text token width inside; must be D (caption_projection_dim)
    pooled_dim: int = 2048                 # pooled text width (diffusers: pooled_projection_dim); 0 = no pooled text
    pos_embed_max_size: int = 192          # side of the position table, in patches: latents up to M * p
    sample_size: int = 128                 # training latent side: the table's positions are in its patches
    qk_norm: str | None = None             # "rms_norm": per-head RMSNorm of q and k (SD3.5)
    dual_attention_layers: tuple[int, ...] = ()  # blocks with an extra image self-attention (SD3.5 medium)
    gradient_checkpointing: bool = False   # recompute blocks in backward: less memory, more time
    kind: str = "mmdit"                    # what a folder's config.json holds (a U-Net's has no kind)

    def __post_init__(self):
        self.dual_attention_layers = tuple(self.dual_attention_layers)
        width = self.num_heads * self.head_dim
        if self.kind != "mmdit":
            raise ValueError(f"MMDiTConfig.kind must be 'mmdit', got {self.kind!r}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"MMDiTConfig.qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.caption_dim != width:
            raise ValueError(f"MMDiTConfig.caption_dim {self.caption_dim} must equal the width num_heads * head_dim "
                             f"= {width}: the text tokens enter the joint blocks at that width")
        if self.pooled_dim < 0:
            raise ValueError(f"MMDiTConfig.pooled_dim must be >= 0 (0: no pooled text), got {self.pooled_dim}")
        if width % 4:
            raise ValueError(f"MMDiTConfig: width {width} must divide by 4 (sin and cos of two axes)")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"MMDiTConfig.dual_attention_layers: blocks {bad} outside 0..{self.depth - 1}")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def time_embed_dim(self) -> int:
        """Width of c = time embedding + pooled embedding (a distilled student adds its w-embedding to c)."""
        return self.width

    @property
    def downsample_factor(self) -> int:
        """Latent sides must divide by this: one token per patch."""
        return self.patch_size

    @classmethod
    def from_dict(cls, d: dict) -> "MMDiTConfig":
        return strict_from_dict(cls, d)


# ---- pieces --------------------------------------------------------------------------------

def sincos_table(max_size: int, width: int, base_size: int) -> torch.Tensor:
    """(M, M, D) fixed 2-D position table (MAE/DiT style): channels [sin, cos](x f) then [sin, cos](y f),
    f_i = 10^(-4 i / (D/4)); positions are patch indices scaled by base_size / M (SD3's training grid)."""
    pos = torch.arange(max_size, dtype=torch.float32) / (max_size / base_size)  # float32, as trained
    freqs = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    ang = pos.double()[:, None] * freqs[None]                                   # (M, D/4)
    axis = torch.cat([ang.sin(), ang.cos()], dim=1)                             # (M, D/2)
    x = axis[None, :, :].expand(max_size, max_size, -1)                         # varies along columns
    y = axis[:, None, :].expand(max_size, max_size, -1)                         # varies along rows
    return torch.cat([x, y], dim=-1).float()                                    # (M, M, D)


def modulate(x, shift, scale):
    """adaLN: x (B, N, D) times (1 + scale) plus shift, both (B, 1, D)."""
    return x * (1 + scale) + shift


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)  # no affine: the modulation is the affine


class RMSNorm(nn.Module):
    """Per-head RMSNorm of queries or keys (Zhang & Sennrich 2019), learned gain."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


class MLP(nn.Module):
    """Linear D -> 4D, tanh-GELU, Linear 4D -> D."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Projections(nn.Module):
    """One stream's q, k, v (optionally RMS-normed per head) and output projections."""

    def __init__(self, width: int, heads: int, qk_norm: str | None, query: bool = True):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width) if query else None
        self.k, self.v = nn.Linear(width, width), nn.Linear(width, width)
        norm = qk_norm == "rms_norm"
        self.q_norm = RMSNorm(width // heads) if norm and query else None
        self.k_norm = RMSNorm(width // heads) if norm else None
        self.out = nn.Linear(width, width) if query else None

    def _heads(self, x, norm):
        B, N, _ = x.shape
        x = x.view(B, N, self.heads, -1).transpose(1, 2)  # (B, H, N, d)
        return x if norm is None else norm(x)

    def qkv(self, x):
        """x (B, N, D) -> q, k, v (B, H, N, d); q is None for a key/value-only stream."""
        q = None if self.q is None else self._heads(self.q(x), self.q_norm)
        return q, self._heads(self.k(x), self.k_norm), self._heads(self.v(x), None)


def merge_heads(x):
    return x.transpose(1, 2).flatten(2)  # (B, H, N, d) -> (B, N, D)


class Stream(nn.Module):
    """One modality's half of a joint block: adaLN modulation of c, attention projections, MLP.
    pre_only (the text half of the last block): keys and values only, modulation (scale, shift)."""

    def __init__(self, width: int, heads: int, qk_norm: str | None, n_mod: int = 6, pre_only: bool = False):
        super().__init__()
        self.mod = nn.Linear(width, (2 if pre_only else n_mod) * width)
        self.attn = Projections(width, heads, qk_norm, query=not pre_only)
        self.mlp = None if pre_only else MLP(width)

    def modulation(self, c):
        """c (B, D) -> its shifts, scales and gates, each (B, 1, D)."""
        return self.mod(F.silu(c))[:, None].chunk(self.mod.out_features // self.mod.in_features, dim=-1)

    def finish(self, x, attn_out, gate, shift_mlp, scale_mlp, gate_mlp):
        """The gated residuals after attention (attn_out (B, N, D), before `out`) and of the MLP."""
        x = x + gate * self.attn.out(attn_out)
        return x + gate_mlp * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Fig. 2b: both streams' q, k, v concatenated [image; text], one attention, split, per-stream rest."""

    def __init__(self, width: int, heads: int, qk_norm: str | None, last: bool, dual: bool):
        super().__init__()
        self.image = Stream(width, heads, qk_norm, n_mod=9 if dual else 6)
        self.text = Stream(width, heads, qk_norm, pre_only=last)
        self.self_attn = Projections(width, heads, qk_norm) if dual else None

    def forward(self, x, ctx, c, mask=None):
        """x (B, N, D) image tokens, ctx (B, L, D) text tokens, c (B, D), mask (B, N + L) bool or None.
        Returns (x, ctx); ctx is None after the last block."""
        N = x.shape[1]
        m = self.image.modulation(c)           # shift, scale, gate (attention), same (MLP)[, same (self-attn)]
        mc = self.text.modulation(c)           # as m; the last block: (scale, shift)
        hx = layer_norm(x)
        shift_c, scale_c = mc[:2] if self.text.mlp is not None else mc[::-1]
        qx, kx, vx = self.image.attn.qkv(modulate(hx, m[0], m[1]))
        qc, kc, vc = self.text.attn.qkv(modulate(layer_norm(ctx), shift_c, scale_c))
        q = qx if qc is None else torch.cat([qx, qc], dim=2)   # the last block: image queries only
        out = merge_heads(ops.attention(q, torch.cat([kx, kc], dim=2), torch.cat([vx, vc], dim=2),
                                        key_padding_mask=mask))  # (B, N (+ L), D)
        if self.self_attn is not None:         # MMDiT-X: image tokens attend to themselves too, gate m[8]
            q2, k2, v2 = self.self_attn.qkv(modulate(hx, m[6], m[7]))
            x = x + m[8] * self.self_attn.out(merge_heads(ops.attention(q2, k2, v2)))
        x = self.image.finish(x, out[:, :N], *m[2:6])
        return x, (None if qc is None else self.text.finish(ctx, out[:, N:], *mc[2:6]))


def unpatchify(h, grid_h: int, grid_w: int, p: int):
    """(B, gh * gw, p * p * C) tokens, each a (p, p, C) patch, -> (B, C, gh * p, gw * p)."""
    B = h.shape[0]
    h = h.reshape(B, grid_h, grid_w, p, p, -1)  # (B, gh, gw, p, p, C)
    return h.permute(0, 5, 1, 3, 2, 4).reshape(B, -1, grid_h * p, grid_w * p)


# ---- the network -----------------------------------------------------------------------------

class MMDiT(Pretrained, nn.Module):
    """Velocity-prediction MMDiT: forward(x (B,C,H,W), t (B,), context (B,L,D_ctx), pooled=(B,P)) -> (B,C_out,H,W);
    pooled is None where pooled_dim is 0."""

    config_class = MMDiTConfig

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.width, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, D, p, stride=p)
        self.register_buffer("pos_embed", sincos_table(cfg.pos_embed_max_size, D, cfg.sample_size // p))
        self.time_embed = TimestepMLP(TIME_FREQS, D)
        # the same Linear-SiLU-Linear on pooled text; none without it
        self.pooled_embed = TimestepMLP(cfg.pooled_dim, D) if cfg.pooled_dim else None
        self.context_embed = nn.Linear(cfg.context_dim, cfg.caption_dim)
        self.blocks = nn.ModuleList(
            JointBlock(D, cfg.num_heads, cfg.qk_norm, last=i == cfg.depth - 1, dual=i in cfg.dual_attention_layers)
            for i in range(cfg.depth))
        self.final_mod = nn.Linear(D, 2 * D)  # (scale, shift) of the output norm
        self.proj_out = nn.Linear(D, p * p * cfg.out_channels)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.cfg.gradient_checkpointing = enabled

    @torch.no_grad()
    def init_for_training(self) -> "MMDiT":
        """DiT's initialization for training from scratch (Peebles & Xie 2023, sec. 3.2 "adaLN-Zero" and their
        code's choices): Xavier-uniform Linear and patch weights, zero biases, N(0, 0.02) timestep MLP, and
        every modulation and the output projection at zero, so each block starts as the identity and the net
        predicts 0. Imported weights replace all of it."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.out_channels, -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.time_embed.fc1, self.time_embed.fc2):
            nn.init.normal_(layer.weight, std=0.02)
        zero = [self.final_mod, self.proj_out] + [s.mod for b in self.blocks for s in (b.image, b.text)]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        return self

    def _run(self, block, *args):
        if self.cfg.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _check_inputs(self, x, context, context_mask, pooled, control, time_ids) -> None:
        cfg = self.cfg
        if time_ids is not None:
            raise ValueError("MMDiT: this net takes no `time_ids` (SDXL)")
        if control is not None and not (isinstance(control, (list, tuple)) and all(map(torch.is_tensor, control))):
            raise ValueError("MMDiT: control must be a list of ControlNet residuals (B, N, D)")
        if not cfg.pooled_dim:
            if pooled is not None:
                raise ValueError("MMDiT: pooled_dim=0 takes no `pooled` text embedding")
        elif pooled is None:
            raise ValueError(f"MMDiT: needs `pooled` (B, {cfg.pooled_dim}), the pooled text embedding")
        elif pooled.shape != (x.shape[0], cfg.pooled_dim):
            raise ValueError(f"MMDiT: pooled shape {tuple(pooled.shape)}, expected ({x.shape[0]}, {cfg.pooled_dim})")
        if context.shape[-1] != cfg.context_dim:
            raise ValueError(f"MMDiT: context width {context.shape[-1]}, config context_dim {cfg.context_dim}")
        if context_mask is not None and context_mask.shape != context.shape[:2]:
            raise ValueError(f"MMDiT: context_mask shape {tuple(context_mask.shape)}, "
                             f"expected {tuple(context.shape[:2])}")
        p, M = cfg.patch_size, cfg.pos_embed_max_size
        H, W = x.shape[-2:]
        if H % p or W % p:
            raise ValueError(f"MMDiT: spatial size {(H, W)} must be divisible by the patch size {p}")
        if H // p > M or W // p > M:
            raise ValueError(f"MMDiT: latents {(H, W)} are {(H // p, W // p)} patches, more than the "
                             f"{M} x {M} position table (pos_embed_max_size)")

    def _conditioning(self, t, pooled, cond_emb, batch: int, dtype):
        """c = MLP(sinusoid(t)) + MLP(pooled) (+ cond_emb), (B, D); pooled_dim=0: no pooled term."""
        if not torch.is_tensor(t):
            t = torch.tensor(t)
        t = t.to(self.patch_embed.weight.device).reshape(-1)
        t = t.expand(batch) if t.numel() == 1 else t
        if t.shape[0] != batch:
            raise ValueError(f"MMDiT: t has {t.shape[0]} entries for a batch of {batch}")
        c = self.time_embed(timestep_embedding(t, TIME_FREQS).to(dtype))
        if self.pooled_embed is not None:
            c = c + self.pooled_embed(pooled.to(dtype))
        if cond_emb is not None:
            if cond_emb.shape != c.shape:
                raise ValueError(f"MMDiT: cond_emb shape {tuple(cond_emb.shape)}, expected {tuple(c.shape)}")
            c = c + cond_emb.to(dtype)
        return c

    def positions(self, grid_h: int, grid_w: int):
        """The table's centre grid_h x grid_w patches, (gh * gw, D)."""
        M = self.cfg.pos_embed_max_size
        top, left = (M - grid_h) // 2, (M - grid_w) // 2
        return self.pos_embed[top:top + grid_h, left:left + grid_w].reshape(grid_h * grid_w, -1)

    def forward(self, x, t, context, context_mask=None, cond_emb=None, control=None, pooled=None, time_ids=None):
        """x (B,C,H,W), t (B,) or scalar (sigma * 1000), context (B,L,D_ctx), context_mask (B,L) bool
        True = a real token (masked ones are no keys), cond_emb (B, D) added to c, pooled (B, P) required (none
        where pooled_dim is 0), control: a list of (B, N, D) ControlNet residuals (ldm.models.controlnet_sd3)
        added to the image tokens after the blocks but the last, in runs as diffusers' SD3Transformer2DModel."""
        self._check_inputs(x, context, context_mask, pooled, control, time_ids)
        dtype, p = self.patch_embed.weight.dtype, self.cfg.patch_size
        B, _, H, W = x.shape
        c = self._conditioning(t, pooled, cond_emb, B, dtype)
        h = self.patch_embed(x.to(dtype)).flatten(2).transpose(1, 2)   # (B, N, D), N = (H/p)(W/p)
        h = h + self.positions(H // p, W // p).to(dtype)
        ctx = self.context_embed(context.to(dtype))                     # (B, L, D)
        mask = None
        if context_mask is not None:                                   # image tokens are always keys
            mask = torch.cat([context_mask.new_ones(B, h.shape[1]), context_mask], dim=1).bool()
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            h, ctx = self._run(block, h, ctx, c, mask)
            if control and i < n - 1:      # a ControlNet's residual; none after the last block (diffusers' choice)
                h = h + control[int(i / (n / len(control)))]   # residual j serves blocks j n / len .. (j + 1) n / len
        scale, shift = self.final_mod(F.silu(c))[:, None].chunk(2, dim=-1)
        h = self.proj_out(modulate(layer_norm(h), shift, scale))        # (B, N, p * p * C_out)
        return unpatchify(h, H // p, W // p, p)
