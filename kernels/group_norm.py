"""Fused GroupNorm (+ optional SiLU) in Triton: forward, backward, launcher, autograd and reference.

Supported:
- x of shape (N, C, *spatial) in fp32, fp16 or bf16; NCHW or channels_last memory, read through
  strides (no permute copy) whenever the spatial dims flatten to one stride.
- any group size C/G * H*W: each program loops over its part of the group in tiles.
- optional affine weight/bias (any float dtype), optional fused SiLU, grads for x, weight, bias.
- a grid that fills the GPU at batch 1-2: every (sample, group) is split into chunks along the
  spatial axis (and the channel axis when that is not enough).

Numerics: statistics in fp32; each tile is reduced two-pass in registers and tiles/chunks are
merged with Chan et al.'s parallel Welford update (1979), never E[x^2] - E[x]^2. mean and rstd
stay fp32 and are saved for the backward, which recomputes xhat (and the SiLU input) from x.

Determinism: no atomics. Per-chunk partials go to scratch buffers and are combined in a fixed
order. Kernels launched per direction:
- forward: (1) per-chunk (count, mean, M2); (2) normalize (+SiLU). The combine step of the
  partials runs at the top of (2): every program of a group merges the same partials in the
  same order (a few dozen fp32 values), which saves a launch that would cost more than the
  merge at SD shapes. The chunk-0 program stores mean and rstd.
- backward: (1) per-chunk sums of w*dy and xhat*w*dy per group, and per-channel partials of
  dy*xhat and dy for dweight/dbias; (2) dx = rstd * (w*dy - (xhat*c1 + c2)) with the group
  sums merged the same way; dweight/dbias are a fixed-order torch.sum over the partials.

Caution: double backward is not supported. fp64 is not supported (use the reference).
The interpreter (TRITON_INTERPRET=1) runs all of this on CPU tensors, slowly.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from ldm.kernels.launch import launchable, needs_grad, next_pow2, set_wrap_triton_enabled

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TILE = 4096  # elements per tile (BLOCK_C * BLOCK_L): 16 KiB of fp32 registers per program
MAX_CHUNKS = 256  # per (sample, group); the in-kernel merge loads them all in one block


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile(g, c_first, l_first, CG, L, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Channel ids (BLOCK_C,), spatial ids (BLOCK_L,) and in-bounds mask of one tile."""
    c_loc = c_first + tl.arange(0, BLOCK_C)  # channel within the group
    l_idx = l_first + tl.arange(0, BLOCK_L)  # flattened spatial index
    mask = (c_loc < CG)[:, None] & (l_idx < L)[None, :]  # (BLOCK_C, BLOCK_L)
    return g * CG + c_loc, l_idx, mask


@triton.jit
def _offsets(n, c, l_idx, stride_n, stride_c, stride_l):
    """Element offsets (BLOCK_C, BLOCK_L) in int64: SD-sized batches pass 2**31 elements."""
    return (n.to(tl.int64) * stride_n + c.to(tl.int64)[:, None] * stride_c
            + l_idx.to(tl.int64)[None, :] * stride_l)


@triton.jit
def _channels(g, c_first, CG, BLOCK_C: tl.constexpr):
    """Channel ids (BLOCK_C,) of group g from its local channel c_first on, and their mask."""
    c_loc = c_first + tl.arange(0, BLOCK_C)
    return g * CG + c_loc, c_loc < CG


@triton.jit
def _load_affine(w_ptr, b_ptr, c, c_ok, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """w, b at channels c as fp32 (BLOCK_C, 1) (1 and 0 if absent).

    It returns only loaded values: torch.compile's mutation analysis follows a store's
    address back through a call's results to all of the call's arguments, so channel ids
    taken from here would mark w/b as written (and fail on a parameter that needs grad).
    """
    if HAS_W:
        w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    else:
        w = tl.full((BLOCK_C, 1), 1.0, tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    else:
        b = tl.zeros((BLOCK_C, 1), tl.float32)
    return w, b


@triton.jit
def _gn_stats_kernel(
    x_ptr,  # (N, C, L) through strides, any float dtype
    cnt_ptr, mean_ptr, m2_ptr,  # (N*G, P) fp32 per-chunk count, mean, M2
    G, CG, L, CHUNK_C, CHUNK_L, CHUNKS_L,
    sx_n, sx_c, sx_l,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Per-chunk partial (count, mean, M2): each tile two-pass in registers, tiles merged."""
    ng, p = tl.program_id(0), tl.program_id(1)
    n, g = ng // G, ng % G
    c_start = (p // CHUNKS_L) * CHUNK_C
    l_start = (p % CHUNKS_L) * CHUNK_L
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for cp in range(0, CHUNK_C, BLOCK_C):
        for lp in range(0, CHUNK_L, BLOCK_L):
            c, l_idx, mask = _tile(g, c_start + cp, l_start + lp, CG, L, BLOCK_C, BLOCK_L)
            offs = _offsets(n, c, l_idx, sx_n, sx_c, sx_l)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            t_count = tl.sum(mask.to(tl.float32))
            t_mean = tl.sum(x) / tl.maximum(t_count, 1.0)
            d = tl.where(mask, x - t_mean, 0.0)
            t_m2 = tl.sum(d * d)
            # Chan, Golub & LeVeque (1979), parallel variance: merge (count, mean, M2) pairs.
            new_count = count + t_count
            delta = t_mean - mean
            frac = t_count / tl.maximum(new_count, 1.0)
            mean = mean + delta * frac
            m2 = m2 + t_m2 + delta * delta * count * frac
            count = new_count
    out = ng * tl.num_programs(1) + p
    tl.store(cnt_ptr + out, count)
    tl.store(mean_ptr + out, mean)
    tl.store(m2_ptr + out, m2)


@triton.jit
def _gn_forward_kernel(
    x_ptr, y_ptr,  # (N, C, L) through their own strides; y has x's dtype
    w_ptr, b_ptr,  # (C,), or dummies when HAS_W / HAS_B is False
    cnt_ptr, pmean_ptr, pm2_ptr,  # (N*G, P) fp32 partials from _gn_stats_kernel
    mean_ptr, rstd_ptr,  # (N*G,) fp32 outputs, written by chunk 0
    G, CG, L, CHUNK_C, CHUNK_L, CHUNKS_L, eps,
    sx_n, sx_c, sx_l, sy_n, sy_c, sy_l,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Merge the group's partials in a fixed order, then y = act(xhat * w + b) over one chunk."""
    eps = tl.cast(eps, tl.float32)  # Inductor passes Python floats as fp64 scalars
    ng, p = tl.program_id(0), tl.program_id(1)
    P = tl.num_programs(1)
    n, g = ng // G, ng % G
    # Chan et al. (1979) over all chunks at once:
    # mean = sum(n_i m_i) / n ; M2 = sum(M2_i) + sum(n_i (m_i - mean)^2).
    pi = tl.arange(0, BLOCK_P)
    pmask = pi < P
    cnt = tl.load(cnt_ptr + ng * P + pi, mask=pmask, other=0.0)
    pmean = tl.load(pmean_ptr + ng * P + pi, mask=pmask, other=0.0)
    pm2 = tl.load(pm2_ptr + ng * P + pi, mask=pmask, other=0.0)
    count = tl.sum(cnt)
    mean = tl.sum(cnt * pmean) / count
    dm = pmean - mean
    m2 = tl.sum(pm2) + tl.sum(cnt * dm * dm)
    rstd = tl.rsqrt(m2 / count + eps)  # biased variance, as torch.nn.GroupNorm
    if p == 0:
        tl.store(mean_ptr + ng, mean)
        tl.store(rstd_ptr + ng, rstd)

    c_start = (p // CHUNKS_L) * CHUNK_C
    l_start = (p % CHUNKS_L) * CHUNK_L
    for cp in range(0, CHUNK_C, BLOCK_C):
        c_vec, c_ok = _channels(g, c_start + cp, CG, BLOCK_C)
        w, b = _load_affine(w_ptr, b_ptr, c_vec, c_ok, HAS_W, HAS_B, BLOCK_C)
        a = w * rstd  # (BLOCK_C, 1): normalize + affine folded into y = x * a + s
        s = b - mean * a
        for lp in range(0, CHUNK_L, BLOCK_L):
            c, l_idx, mask = _tile(g, c_start + cp, l_start + lp, CG, L, BLOCK_C, BLOCK_L)
            x_offs = _offsets(n, c, l_idx, sx_n, sx_c, sx_l)
            x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
            y = x * a + s
            if SILU:
                y = y * tl.sigmoid(y)
            y_offs = _offsets(n, c, l_idx, sy_n, sy_c, sy_l)
            tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_pre_activation(x, dy, mean, rstd, w, b, SILU: tl.constexpr):
    """xhat and dL/dz for z = xhat * w + b; z is recomputed for SiLU rather than stored."""
    xhat = (x - mean) * rstd
    if SILU:
        z = xhat * w + b
        sig = tl.sigmoid(z)
        dz = dy * sig * (1.0 + z * (1.0 - sig))  # d/dz [z sigmoid(z)]
    else:
        dz = dy
    return xhat, dz


@triton.jit
def _gn_backward_partials_kernel(
    x_ptr, dy_ptr,  # (N, C, L) through their own strides
    w_ptr, b_ptr,  # (C,), or dummies
    mean_ptr, rstd_ptr,  # (N*G,) fp32 saved by the forward
    s1_ptr, s2_ptr,  # (N*G, P) fp32: per-chunk sum(w*dz), sum(xhat*w*dz)
    dw_ptr, db_ptr,  # (N*CHUNKS_L, C) fp32: per-chunk, per-channel sum(dz*xhat), sum(dz)
    G, C, CG, L, CHUNK_C, CHUNK_L, CHUNKS_L,
    sx_n, sx_c, sx_l, sd_n, sd_c, sd_l,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Per-chunk partial sums for dx (per group) and for dweight/dbias (per channel)."""
    ng, p = tl.program_id(0), tl.program_id(1)
    n, g = ng // G, ng % G
    c_start = (p // CHUNKS_L) * CHUNK_C
    l_start = (p % CHUNKS_L) * CHUNK_L
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)
    s1 = 0.0
    s2 = 0.0
    row = (n * CHUNKS_L + p % CHUNKS_L).to(tl.int64) * C  # this chunk's row of dw/db partials
    for cp in range(0, CHUNK_C, BLOCK_C):
        c_vec, c_ok = _channels(g, c_start + cp, CG, BLOCK_C)
        w, b = _load_affine(w_ptr, b_ptr, c_vec, c_ok, HAS_W, HAS_B, BLOCK_C)
        dw_acc = tl.zeros((BLOCK_C,), tl.float32)
        db_acc = tl.zeros((BLOCK_C,), tl.float32)
        for lp in range(0, CHUNK_L, BLOCK_L):
            c, l_idx, mask = _tile(g, c_start + cp, l_start + lp, CG, L, BLOCK_C, BLOCK_L)
            x = tl.load(x_ptr + _offsets(n, c, l_idx, sx_n, sx_c, sx_l), mask=mask, other=0.0)
            dy = tl.load(dy_ptr + _offsets(n, c, l_idx, sd_n, sd_c, sd_l), mask=mask, other=0.0)
            xhat, dz = _grad_pre_activation(x.to(tl.float32), dy.to(tl.float32), mean, rstd,
                                            w, b, SILU)
            xhat = tl.where(mask, xhat, 0.0)  # dz is already 0 off-tile since dy loads as 0
            wdz = w * dz  # (BLOCK_C, BLOCK_L)
            s1 += tl.sum(wdz)
            s2 += tl.sum(xhat * wdz)
            dw_acc += tl.sum(dz * xhat, axis=1)
            db_acc += tl.sum(dz, axis=1)
        tl.store(dw_ptr + row + c_vec, dw_acc, mask=c_ok)
        tl.store(db_ptr + row + c_vec, db_acc, mask=c_ok)
    out = ng * tl.num_programs(1) + p
    tl.store(s1_ptr + out, s1)
    tl.store(s2_ptr + out, s2)


@triton.jit
def _gn_backward_dx_kernel(
    x_ptr, dy_ptr, dx_ptr,  # (N, C, L) through their own strides; dx has x's dtype
    w_ptr, b_ptr,  # (C,), or dummies
    mean_ptr, rstd_ptr,  # (N*G,) fp32
    s1_ptr, s2_ptr,  # (N*G, P) fp32 partials from _gn_backward_partials_kernel
    G, CG, L, CHUNK_C, CHUNK_L, CHUNKS_L, inv_count,
    sx_n, sx_c, sx_l, sd_n, sd_c, sd_l, so_n, so_c, so_l,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """dx = rstd * (w*dz - (xhat*c1 + c2)), c1 = mean(xhat*w*dz), c2 = mean(w*dz) per group."""
    inv_count = tl.cast(inv_count, tl.float32)  # Inductor passes Python floats as fp64 scalars
    ng, p = tl.program_id(0), tl.program_id(1)
    P = tl.num_programs(1)
    n, g = ng // G, ng % G
    pi = tl.arange(0, BLOCK_P)
    pmask = pi < P
    c2 = tl.sum(tl.load(s1_ptr + ng * P + pi, mask=pmask, other=0.0)) * inv_count
    c1 = tl.sum(tl.load(s2_ptr + ng * P + pi, mask=pmask, other=0.0)) * inv_count
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)
    c_start = (p // CHUNKS_L) * CHUNK_C
    l_start = (p % CHUNKS_L) * CHUNK_L
    for cp in range(0, CHUNK_C, BLOCK_C):
        c_vec, c_ok = _channels(g, c_start + cp, CG, BLOCK_C)
        w, b = _load_affine(w_ptr, b_ptr, c_vec, c_ok, HAS_W, HAS_B, BLOCK_C)
        for lp in range(0, CHUNK_L, BLOCK_L):
            c, l_idx, mask = _tile(g, c_start + cp, l_start + lp, CG, L, BLOCK_C, BLOCK_L)
            x = tl.load(x_ptr + _offsets(n, c, l_idx, sx_n, sx_c, sx_l), mask=mask, other=0.0)
            dy = tl.load(dy_ptr + _offsets(n, c, l_idx, sd_n, sd_c, sd_l), mask=mask, other=0.0)
            xhat, dz = _grad_pre_activation(x.to(tl.float32), dy.to(tl.float32), mean, rstd,
                                            w, b, SILU)
            dx = rstd * (w * dz - (xhat * c1 + c2))
            dx_offs = _offsets(n, c, l_idx, so_n, so_c, so_l)
            tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch plan (pure host-side arithmetic)
# ---------------------------------------------------------------------------------------------


def _flat_spatial_stride(x: torch.Tensor) -> Optional[int]:
    """The stride of the flattened spatial index of x (N, C, *spatial), or None if not flat."""
    return _spatial_stride(x.shape, x.stride())


@functools.lru_cache(maxsize=1024)  # host time: called for every tensor of every launch
def _spatial_stride(shape: tuple, stride: tuple) -> Optional[int]:
    dims = [(s, st) for s, st in zip(shape[2:], stride[2:]) if s != 1]
    if not dims:
        return 1
    for (_, outer), (size, inner) in zip(dims[:-1], dims[1:]):
        if outer != inner * size:
            return None
    return dims[-1][1]


@functools.lru_cache(maxsize=1024)
def launch_plan(n: int, groups: int, group_channels: int, length: int, target_programs: int,
                max_tile: int = MAX_TILE) -> dict:
    """Tile sizes and the chunk split of each (sample, group) so about target_programs run."""
    block_c = min(triton.next_power_of_2(group_channels), max_tile)
    block_l = min(triton.next_power_of_2(length), max(1, max_tile // block_c))
    # Split the spatial axis first (keeps whole channel groups, i.e. full NHWC rows, per tile),
    # then the channel axis if batch * groups * spatial chunks still leaves SMs idle.
    want = max(1, math.ceil(target_programs / (n * groups)))
    chunks_l = min(want, triton.cdiv(length, block_l), MAX_CHUNKS)
    chunk_l = triton.cdiv(triton.cdiv(length, chunks_l), block_l) * block_l
    chunks_l = triton.cdiv(length, chunk_l)
    want_c = max(1, math.ceil(want / chunks_l))
    chunks_c = min(want_c, triton.cdiv(group_channels, block_c), MAX_CHUNKS // chunks_l)
    chunk_c = triton.cdiv(triton.cdiv(group_channels, chunks_c), block_c) * block_c
    chunks_c = triton.cdiv(group_channels, chunk_c)
    return dict(BLOCK_C=block_c, BLOCK_L=block_l, CHUNK_C=chunk_c, CHUNK_L=chunk_l,
                CHUNKS_C=chunks_c, CHUNKS_L=chunks_l)


def interpreted() -> bool:
    """True when TRITON_INTERPRET=1 was set before triton was imported (kernels run on CPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_gn_stats_kernel, InterpretedFunction)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_target_programs(device: torch.device) -> int:
    """About four programs per SM on a GPU; a handful in the CPU interpreter (runs serially)."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else 0)
    return 4


def _flat(t: torch.Tensor) -> torch.Tensor:
    """t itself when its spatial dims read as one stride (NCHW, channels_last), else a copy."""
    return t if _flat_spatial_stride(t) is not None else t.contiguous()


# ---------------------------------------------------------------------------------------------
# Custom ops (visible to torch.compile through triton_op + wrap_triton)
# ---------------------------------------------------------------------------------------------


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(stride_n, stride_c, stride_l) of a tensor whose spatial dims flatten to one stride."""
    st = _flat_spatial_stride(t)
    assert st is not None, "outputs are allocated dense, so their spatial dims always flatten"
    return int(t.stride(0)), int(t.stride(1)), int(st)


def _plan_for(x: torch.Tensor, num_groups: int, target_programs: int, max_tile: int):
    """Grid, group channels, flattened length, plan and the kernels' loop arguments."""
    # int() specializes symbolic sizes under torch.compile: the plan is shape-dependent anyway.
    n, c = int(x.shape[0]), int(x.shape[1])
    length = int(math.prod(x.shape[2:]))
    plan = launch_plan(n, num_groups, c // num_groups, length, target_programs, max_tile)
    chunks = plan["CHUNKS_C"] * plan["CHUNKS_L"]
    loops = dict(CHUNK_C=plan["CHUNK_C"], CHUNK_L=plan["CHUNK_L"], CHUNKS_L=plan["CHUNKS_L"],
                 BLOCK_C=plan["BLOCK_C"], BLOCK_L=plan["BLOCK_L"])
    return (n * num_groups, chunks), c // num_groups, length, plan, loops


def _gn_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            num_groups: int, eps: float, silu: bool, target_programs: int,
            max_tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = act(GroupNorm(x)), plus the fp32 mean and rstd (N, G) for the backward."""
    x = _flat(x)
    grid, cg, length, _, loops = _plan_for(x, num_groups, target_programs, max_tile)
    y = torch.empty_like(x)  # keeps x's memory format (NCHW or channels_last)
    part = x.new_empty((3, *grid), dtype=torch.float32)  # (count, mean, M2) per chunk
    cnt, mu, m2 = part.unbind(0)  # one op for three views
    mean = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    sx, sy = _strides(x), _strides(y)
    launchable(_gn_stats_kernel)[grid](
        x, cnt, mu, m2, num_groups, cg, length,
        sx_n=sx[0], sx_c=sx[1], sx_l=sx[2], **loops)
    launchable(_gn_forward_kernel)[grid](
        x, y, weight if weight is not None else part, bias if bias is not None else part,
        cnt, mu, m2, mean, rstd, num_groups, cg, length, eps=eps,
        sx_n=sx[0], sx_c=sx[1], sx_l=sx[2], sy_n=sy[0], sy_c=sy[1], sy_l=sy[2],
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu,
        BLOCK_P=next_pow2(grid[1]), **loops)
    return y, mean, rstd


def _gn_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
            bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
            num_groups: int, silu: bool, target_programs: int,
            max_tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); dweight/dbias are empty when weight/bias is None."""
    x, dy = _flat(x), _flat(dy)
    grid, cg, length, plan, loops = _plan_for(x, num_groups, target_programs, max_tile)
    c = cg * num_groups
    dx = torch.empty_like(x)
    sums = x.new_empty((2, *grid), dtype=torch.float32)  # sum(w*dz), sum(xhat*w*dz) per chunk
    # One row per (sample, spatial chunk); the channel chunks of a row tile all C channels.
    dwb = x.new_empty((2, grid[0] // num_groups * plan["CHUNKS_L"], c), dtype=torch.float32)
    sx, sd, so = _strides(x), _strides(dy), _strides(dx)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu)
    w_arg = weight if weight is not None else sums  # dummies are never read
    b_arg = bias if bias is not None else sums
    s1, s2 = sums.unbind(0)
    dw_rows, db_rows = dwb.unbind(0)
    launchable(_gn_backward_partials_kernel)[grid](
        x, dy, w_arg, b_arg, mean, rstd, s1, s2, dw_rows, db_rows,
        num_groups, c, cg, length, loops["CHUNK_C"], loops["CHUNK_L"], loops["CHUNKS_L"],
        *sx, *sd, **flags, BLOCK_C=loops["BLOCK_C"], BLOCK_L=loops["BLOCK_L"])
    launchable(_gn_backward_dx_kernel)[grid](
        x, dy, dx, w_arg, b_arg, mean, rstd, s1, s2, num_groups, cg, length,
        loops["CHUNK_C"], loops["CHUNK_L"], loops["CHUNKS_L"], 1.0 / (cg * length),
        *sx, *sd, *so, **flags, BLOCK_P=next_pow2(grid[1]),
        BLOCK_C=loops["BLOCK_C"], BLOCK_L=loops["BLOCK_L"])
    # Fixed-order fp32 reductions over (sample, spatial chunk): deterministic, no atomics.
    dweight = dw_rows.sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    dbias = db_rows.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dweight, dbias


# Two doors to the same launchers, as in attention.py: custom ops under torch.compile (Inductor
# sees the kernels, no graph break), a plain autograd.Function in eager mode (the custom-op
# dispatcher costs more host time than the kernels take at SD shapes).
_group_norm_fwd = triton_op("ldm::group_norm_fwd", mutates_args=())(_gn_fwd)
_group_norm_bwd = triton_op("ldm::group_norm_bwd", mutates_args=())(_gn_bwd)


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, _, silu, target_programs, max_tile = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.args = (num_groups, silu, target_programs, max_tile)


def _grads(ctx, dy, bwd):
    """Input gradients from what _setup_context saved; bwd is either door's launcher."""
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = bwd(dy, x, weight, bias, mean, rstd, *ctx.args)
    return (dx, dweight if weight is not None else None, dbias if bias is not None else None,
            None, None, None, None, None)


def _backward(ctx, dy, _dmean, _drstd):
    return _grads(ctx, dy, _group_norm_bwd)


class _EagerGroupNorm(torch.autograd.Function):
    """The eager door: same launchers, saved tensors and gradients as the custom op, less host time."""

    @staticmethod
    def forward(ctx, *inputs):
        with set_wrap_triton_enabled(False):
            output = _gn_fwd(*inputs)
        _setup_context(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, dy):
        with set_wrap_triton_enabled(False):
            return _grads(ctx, dy, _gn_bwd)


_group_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _validate(x, num_groups, weight, bias, activation) -> None:
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if x.dim() < 2:
        raise ValueError(f"x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    c = x.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise ValueError(f"num_groups={num_groups!r} must be a positive divisor of C={c}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (c,) or t.device != x.device):
            raise ValueError(f"{name} must have shape ({c},) on {x.device}, "
                             f"got {tuple(t.shape)} on {t.device}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    if x.device.type != "cuda" and not interpreted():
        raise ValueError(f"fused_group_norm needs CUDA tensors (got {x.device}); CPU tensors "
                         "run only under TRITON_INTERPRET=1 set before triton is imported")


def fused_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, *,
                     target_programs=None, max_tile=MAX_TILE):
    """GroupNorm over (C/G, *spatial) per sample and group, then an optional SiLU, in Triton.

    target_programs / max_tile override the launch plan (tests use them to force chunking).
    """
    _validate(x, num_groups, weight, bias, activation)
    if target_programs is None:
        target_programs = default_target_programs(x.device)
    args = (x, weight, bias, num_groups, float(eps), activation == "silu", int(target_programs),
            int(max_tile))
    if torch.compiler.is_compiling():
        return _group_norm_fwd(*args)[0]
    if not needs_grad(x, weight, bias):  # inference: no autograd node, no saved tensors
        with set_wrap_triton_enabled(False):
            return _gn_fwd(*args)[0]
    return _EagerGroupNorm.apply(*args)



def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None):
    """F.group_norm (+ F.silu) computed in fp32, returned in x's dtype."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    y = F.group_norm(x.float(), num_groups, w, b, eps)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)
