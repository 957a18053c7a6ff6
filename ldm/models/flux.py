"""Flux, the rectified-flow transformer of Black Forest Labs' FLUX.1 (BFL's FLUX.1 release, Aug. 2024, and
its reference code github.com/black-forest-labs/flux; the joint blocks are the MMDiT of Esser et al. 2024,
"Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", Sec. 4, Fig. 2b).

- Double-stream blocks: SD3's joint blocks (ldm.models.mmdit.Stream), q and k RMS-normed per head, no last-block
  special case; the joint sequence is [text; image], as in BFL's code.
- Single-stream blocks over the joined [text; image] sequence: one adaLN (shift, scale, gate), then attention and
  a 4x tanh-GELU MLP in parallel, one output Linear on their concatenation, one gated residual.
- Positions: no table; 3-axis rotary embeddings (RoPE, Su et al. 2021) on q and k after their RMSNorm. Every
  token has an id (axis 0, row, column); image tokens are (0, row, col) of the packed grid, text tokens (0, 0, 0);
  FLUX.1 Kontext's reference-image tokens (`reference`) follow the image tokens as (1, row, col) of their own grid
  head channels split sum(axes_dims_rope) = head_dim over the axes, and each axis rotates adjacent channel pairs
  (2i, 2i + 1) by the angle id * theta^(-2i / axis_dim).
- Conditioning c = MLP(sinusoid(t)) [+ MLP(sinusoid(1000 g))] + MLP(pooled CLIP) (+ cond_emb); the guidance term
  exists in the guidance-distilled FLUX.1-dev only (guidance_embeds).

Latents: (B, 16, H, W) in, like our other nets; each 2 x 2 patch is packed into one token of 16 * 4 channels, in
diffusers' (C, 2, 2) order (FluxPipeline._pack_latents), and patch_embed is a Linear on those packed patches, so
diffusers' x_embedder (in_channels 64) loads 1:1. Hence in_channels = 16 latent channels, downsample_factor = 2.

Scales: t = 1000 sigma for x_t = (1 - sigma) x0 + sigma noise (diffusers' FluxTransformer2DModel takes sigma and
multiplies by 1000 inside); guidance = the guidance scale itself (e.g. 3.5), multiplied by 1000 inside exactly
as diffusers does with its `guidance`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ldm import ops
from ldm.models.layers import TimestepMLP, timestep_embedding
from ldm.models.mmdit import TIME_FREQS, RMSNorm, Stream, layer_norm, merge_heads, modulate
from ldm.models.weights import Pretrained, strict_from_dict

PATCH = 2                # latent pixels per token side (the 2 x 2 packing)
GUIDANCE_SCALE = 1000.0  # diffusers' and BFL's factor on the guidance scale before its sinusoid


@dataclass
class FluxConfig:
    in_channels: int = 16                  # latent channels in (diffusers counts packed ones: 4x this)
    out_channels: int = 16                 # prediction channels, the flow velocity (diffusers: 4x this)
    depth_double: int = 19                 # double-stream blocks (diffusers: num_layers)
    depth_single: int = 38                 # single-stream blocks (diffusers: num_single_layers)
    num_heads: int = 24                    # attention heads; width D = num_heads * head_dim
    head_dim: int = 128                    # channels per head = sum(axes_dims_rope)
    context_dim: int = 4096                # text token width in, T5-XXL (diffusers: joint_attention_dim)
    pooled_dim: int = 768                  # pooled text width, CLIP-L (diffusers: pooled_projection_dim)
    guidance_embeds: bool = False          # FLUX.1-dev: the distilled guidance scale enters c
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)  # head channels per position axis (axis 0, row, column)
    rope_theta: float = 10000.0            # RoPE base period
    gradient_checkpointing: bool = False   # recompute blocks in backward: less memory, more time
    kind: str = "flux"                     # what a folder's config.json holds

    def __post_init__(self):
        self.axes_dims_rope = tuple(self.axes_dims_rope)
        if self.kind != "flux":
            raise ValueError(f"FluxConfig.kind must be 'flux', got {self.kind!r}")
        if sum(self.axes_dims_rope) != self.head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"FluxConfig.axes_dims_rope {self.axes_dims_rope} must be even and sum to head_dim "
                             f"{self.head_dim}: RoPE rotates channel pairs of every head")
        if min(self.in_channels, self.out_channels, self.pooled_dim, self.context_dim) < 1:
            raise ValueError("FluxConfig: in_channels, out_channels, pooled_dim and context_dim must be >= 1")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def time_embed_dim(self) -> int:
        """Width of c (a distilled student adds its w-embedding to c)."""
        return self.width

    @property
    def downsample_factor(self) -> int:
        """Latent sides must divide by this: one token per packed 2 x 2 patch."""
        return PATCH

    @classmethod
    def from_dict(cls, d: dict) -> "FluxConfig":
        return strict_from_dict(cls, d)


# ---- packing and positions -------------------------------------------------------------------

def pack(x):
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): one token per 2 x 2 patch, channels in (C, 2, 2) order."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // PATCH, PATCH, W // PATCH, PATCH)          # (B, C, gh, 2, gw, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // PATCH) * (W // PATCH), C * PATCH * PATCH)


def unpack(h, grid_h: int, grid_w: int):
    """Inverse of pack: (B, gh * gw, C * 4) -> (B, C, 2 gh, 2 gw)."""
    B = h.shape[0]
    h = h.reshape(B, grid_h, grid_w, -1, PATCH, PATCH)                   # (B, gh, gw, C, 2, 2)
    return h.permute(0, 3, 1, 4, 2, 5).reshape(B, -1, grid_h * PATCH, grid_w * PATCH)


def position_ids(text_len: int, grid_h: int, grid_w: int, device=None):
    """(L + gh * gw, 3) ids of the [text; image] sequence: text (0, 0, 0), image (0, row, col) row-major."""
    rows = torch.arange(grid_h, device=device)[:, None].expand(grid_h, grid_w)
    cols = torch.arange(grid_w, device=device)[None, :].expand(grid_h, grid_w)
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return torch.cat([image.new_zeros(text_len, 3), image])


def reference_ids(grid_h: int, grid_w: int, device=None):
    """(gh * gw, 3) ids of FLUX.1 Kontext's reference tokens: (1, row, col) row-major, the image's ids on axis 1."""
    ids = position_ids(0, grid_h, grid_w, device)
    ids[:, 0] = 1
    return ids


def rope_angles(ids, axes_dims: tuple[int, ...], theta: float):
    """ids (N, n_axes) -> (cos, sin), each (N, d/2) float32: pair i of axis a turns by id_a * theta^(-2i / d_a)."""
    dtype = torch.float32 if ids.device.type == "mps" else torch.float64   # float64 as BFL, where the device has it
    angles = []
    for axis, dim in enumerate(axes_dims):
        freqs = theta ** -(torch.arange(0, dim, 2, dtype=dtype, device=ids.device) / dim)   # (d_a / 2,)
        angles.append(ids[:, axis].float().to(dtype)[:, None] * freqs[None])               # (N, d_a / 2)
    angles = torch.cat(angles, dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate each adjacent channel pair (x_2i, x_2i+1) of x (B, H, N, d) by its angle, in float32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)                # (B, H, N, d/2) each
    out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.flatten(-2).to(x.dtype)


def joint_attention(q, k, v, rope, mask):
    """RoPE on q and k (B, H, N, d), attention over the joint sequence, heads merged: (B, N, D)."""
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return merge_heads(ops.attention(q, k, v, key_padding_mask=mask))


# ---- blocks ----------------------------------------------------------------------------------

class DoubleBlock(nn.Module):
    """MMDiT joint block (Esser et al. 2024, Fig. 2b): per-stream weights, one attention over [text; image]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.image = Stream(width, heads, "rms_norm")
        self.text = Stream(width, heads, "rms_norm")
        self.ip = None          # an IP-Adapter's attention on image-prompt tokens (ldm.models.ip_adapter_flux)

    def forward(self, x, ctx, c, rope, mask=None):
        """x (B, N, D) image tokens, ctx (B, L, D) text tokens, c (B, D), rope (cos, sin) (L + N, d/2),
        mask (B, L + N) bool or None. Returns (x, ctx)."""
        L = ctx.shape[1]
        m, mc = self.image.modulation(c), self.text.modulation(c)   # shift, scale, gate (attn), same (MLP)
        qx, kx, vx = self.image.attn.qkv(modulate(layer_norm(x), m[0], m[1]))
        qc, kc, vc = self.text.attn.qkv(modulate(layer_norm(ctx), mc[0], mc[1]))
        out = joint_attention(torch.cat([qc, qx], dim=2), torch.cat([kc, kx], dim=2), torch.cat([vc, vx], dim=2),
                              rope, mask)                                 # (B, L + N, D)
        x = self.image.finish(x, out[:, L:], *m[2:])
        if self.ip is not None:   # IP-Adapter: the image queries (no RoPE) attend to the image prompt, added last
            x = x + self.ip(qx)
        return x, self.text.finish(ctx, out[:, :L], *mc[2:])


class SingleBlock(nn.Module):
    """Single stream over [text; image]: h + gate * out([attention(n); GELU(mlp_in(n))]), n = adaLN(h)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.mod = nn.Linear(width, 3 * width)                 # shift, scale, gate
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.q_norm, self.k_norm = RMSNorm(width // heads), RMSNorm(width // heads)
        self.mlp_in = nn.Linear(width, mlp_ratio * width)
        self.out = nn.Linear((1 + mlp_ratio) * width, width)   # on [attention; MLP hidden], in that order

    def _heads(self, x, norm=None):
        x = x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, N, d)
        return x if norm is None else norm(x)

    def forward(self, h, c, rope, mask=None):
        """h (B, L + N, D), c (B, D), rope (cos, sin), mask (B, L + N) bool or None -> (B, L + N, D)."""
        shift, scale, gate = self.mod(F.silu(c))[:, None].chunk(3, dim=-1)   # (B, 1, D) each
        n = modulate(layer_norm(h), shift, scale)
        attn = joint_attention(self._heads(self.q(n), self.q_norm), self._heads(self.k(n), self.k_norm),
                               self._heads(self.v(n)), rope, mask)           # (B, L + N, D)
        mlp = F.gelu(self.mlp_in(n), approximate="tanh")                     # (B, L + N, 4D)
        return h + gate * self.out(torch.cat([attn, mlp], dim=-1))


def control_residual(residuals: list, i: int, blocks: int):
    """The ControlNet residual for block i of `blocks`: each of the n residuals serves k = ceil(blocks / n) blocks
    in a row (diffusers' FluxTransformer2DModel: a ControlNet of 2 double blocks feeds FLUX.1's 19 in runs of 10)."""
    return residuals[i // -(-blocks // len(residuals))]


# ---- the network -----------------------------------------------------------------------------

class Flux(Pretrained, nn.Module):
    """Velocity-prediction Flux: forward(x (B,C,H,W), t (B,) = 1000 sigma, context (B,L,D_ctx), pooled=(B,P),
    guidance=(B,) scale (FLUX.1-dev only), reference=(B,C,H',W') latents (FLUX.1 Kontext)) -> (B,C_out,H,W)."""

    config_class = FluxConfig

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.patch_embed = nn.Linear(cfg.in_channels * PATCH * PATCH, D)   # on packed 2 x 2 patches
        self.time_embed = TimestepMLP(TIME_FREQS, D)
        self.guidance_embed = TimestepMLP(TIME_FREQS, D) if cfg.guidance_embeds else None
        self.pooled_embed = TimestepMLP(cfg.pooled_dim, D)          # the same Linear-SiLU-Linear on pooled CLIP
        self.context_embed = nn.Linear(cfg.context_dim, D)
        self.double_blocks = nn.ModuleList(DoubleBlock(D, cfg.num_heads) for _ in range(cfg.depth_double))
        self.single_blocks = nn.ModuleList(SingleBlock(D, cfg.num_heads) for _ in range(cfg.depth_single))
        self.final_mod = nn.Linear(D, 2 * D)                        # (scale, shift) of the output norm
        self.proj_out = nn.Linear(D, PATCH * PATCH * cfg.out_channels)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.cfg.gradient_checkpointing = enabled

    def _run(self, block, *args):
        if self.cfg.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _check_inputs(self, x, context, context_mask, pooled, control, time_ids, guidance, reference) -> None:
        cfg, B = self.cfg, x.shape[0]
        if time_ids is not None:
            raise ValueError("Flux: this net takes no `time_ids` (SDXL)")
        if control is not None and (len(control) != 2 or not all(
                isinstance(part, (list, tuple)) and all(torch.is_tensor(r) for r in part) for part in control)):
            raise ValueError("Flux: control must be a pair (double, single) of ControlNet residual lists")
        if pooled is None:
            raise ValueError(f"Flux: needs `pooled` (B, {cfg.pooled_dim}), the pooled CLIP text embedding")
        if pooled.shape != (B, cfg.pooled_dim):
            raise ValueError(f"Flux: pooled shape {tuple(pooled.shape)}, expected ({B}, {cfg.pooled_dim})")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("Flux: guidance_embeds=True (FLUX.1-dev) needs `guidance`, the guidance scale (e.g. 3.5)")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError("Flux: guidance_embeds=False takes no `guidance` (only the distilled FLUX.1-dev has it)")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"Flux: latents have {x.shape[1]} channels, config in_channels {cfg.in_channels}")
        if context.shape[-1] != cfg.context_dim:
            raise ValueError(f"Flux: context width {context.shape[-1]}, config context_dim {cfg.context_dim}")
        if context_mask is not None and context_mask.shape != context.shape[:2]:
            raise ValueError(f"Flux: context_mask shape {tuple(context_mask.shape)}, "
                             f"expected {tuple(context.shape[:2])}")
        for name, z in (("spatial size", x), ("reference size", reference)):
            if z is not None and (z.shape[-2] % PATCH or z.shape[-1] % PATCH):
                raise ValueError(f"Flux: {name} {tuple(z.shape[-2:])} must be divisible by the patch size {PATCH}")
        if reference is not None and (reference.ndim != 4 or reference.shape[:2] != x.shape[:2]):
            raise ValueError(f"Flux: reference latents {tuple(reference.shape)}, expected ({B}, {x.shape[1]}, H', W')")

    def _per_sample(self, value, name: str, batch: int):
        """A scalar or (B,) tensor -> (B,) float32 on the model's device."""
        value = torch.as_tensor(value).to(self.patch_embed.weight.device, torch.float32).reshape(-1)
        value = value.expand(batch) if value.numel() == 1 else value
        if value.shape[0] != batch:
            raise ValueError(f"Flux: {name} has {value.shape[0]} entries for a batch of {batch}")
        return value

    def _conditioning(self, t, guidance, pooled, cond_emb, batch: int, dtype):
        """c = MLP(sinusoid(t)) [+ MLP(sinusoid(1000 guidance))] + MLP(pooled) (+ cond_emb), (B, D)."""
        c = self.time_embed(timestep_embedding(self._per_sample(t, "t", batch), TIME_FREQS).to(dtype))
        if self.guidance_embed is not None:
            g = self._per_sample(guidance, "guidance", batch) * GUIDANCE_SCALE
            c = c + self.guidance_embed(timestep_embedding(g, TIME_FREQS).to(dtype))
        c = c + self.pooled_embed(pooled.to(dtype))
        if cond_emb is not None:
            if cond_emb.shape != c.shape:
                raise ValueError(f"Flux: cond_emb shape {tuple(cond_emb.shape)}, expected {tuple(c.shape)}")
            c = c + cond_emb.to(dtype)
        return c

    def forward(self, x, t, context, context_mask=None, cond_emb=None, control=None, pooled=None, time_ids=None,
                guidance=None, reference=None):
        """x (B,C,H,W), t (B,) or scalar (1000 sigma), context (B,L,D_ctx), context_mask (B,L) bool True = a real
        token (masked ones are no keys), cond_emb (B, D) added to c, pooled (B, P) required, guidance (B,) or
        scalar: the guidance scale, required iff guidance_embeds. reference (B,C,H',W'): FLUX.1 Kontext's image
        latents, packed by the same patch_embed into tokens after the image's (ids `reference_ids`); they are
        attended to and dropped from the output. control: (double, single) lists of (B, N, D) residuals added to the
        image tokens after the blocks (`control_residual` says which after which); [] adds none."""
        self._check_inputs(x, context, context_mask, pooled, control, time_ids, guidance, reference)
        dtype = self.patch_embed.weight.dtype
        B, _, H, W = x.shape
        gh, gw = H // PATCH, W // PATCH
        c = self._conditioning(t, guidance, pooled, cond_emb, B, dtype)
        h = self.patch_embed(pack(x.to(dtype)))                        # (B, N, D), N = gh * gw
        ctx = self.context_embed(context.to(dtype))                    # (B, L, D)
        L, N = ctx.shape[1], h.shape[1]
        ids = position_ids(L, gh, gw, x.device)
        if reference is not None:                                      # Kontext: [image; reference] tokens
            h = torch.cat([h, self.patch_embed(pack(reference.to(dtype)))], dim=1)     # (B, N + N_ref, D)
            ids = torch.cat([ids, reference_ids(reference.shape[-2] // PATCH, reference.shape[-1] // PATCH, x.device)])
        rope = rope_angles(ids, self.cfg.axes_dims_rope, self.cfg.rope_theta)
        mask = None
        if context_mask is not None:                                  # image tokens are always keys
            mask = torch.cat([context_mask.bool(), context_mask.new_ones(B, h.shape[1], dtype=torch.bool)], dim=1)
        double, single = control or ([], [])
        for i, block in enumerate(self.double_blocks):
            h, ctx = self._run(block, h, ctx, c, rope, mask)
            if double:                                                 # a ControlNet's residual, image tokens
                h = h + F.pad(control_residual(double, i, len(self.double_blocks)), (0, 0, 0, h.shape[1] - N))
        h = torch.cat([ctx, h], dim=1)                                 # (B, L + N [+ N_ref], D)
        for i, block in enumerate(self.single_blocks):
            h = self._run(block, h, c, rope, mask)
            if single:
                h = h + F.pad(control_residual(single, i, len(self.single_blocks)), (0, 0, L, h.shape[1] - L - N))
        scale, shift = self.final_mod(F.silu(c))[:, None].chunk(2, dim=-1)
        h = self.proj_out(modulate(layer_norm(h[:, L:L + N]), shift, scale))   # (B, N, 4 C_out): image tokens
        return unpack(h, gh, gw)
