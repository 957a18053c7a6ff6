"""Fused attention in Triton, forward and backward, FlashAttention-2 style.

out = softmax(scale * q k^T + mask) v without materializing the (Nq, Nk) score matrix:
the forward streams key blocks through an online softmax (Milakov & Gimelshein 2018;
Dao 2023, "FlashAttention-2", Alg. 1) and saves the row log-sum-exp; the backward
recomputes P from it (Alg. 2), split into a dK/dV pass and a dQ pass so that no two
programs write the same output: the backward is deterministic (no atomics).

Supported:
- q (B, H, Nq, d), k and v (B, H, Nk, d), like F.scaled_dot_product_attention; any Nq, Nk
  (77 text tokens, 65 queries); d any multiple of 8 up to 256 (40, 80, 160 included),
  loaded as a BLOCK_D = next_power_of_2(d) tile with a mask on the d axis.
- Any strides, e.g. q a transposed view of a (B, N, H, d) tensor: nothing is copied.
  Outputs and gradients take their input's memory layout when it is dense.
- fp32, fp16, bf16 inputs; fp32 accumulation and softmax statistics. fp32 dots run in
  IEEE fp32 by default (tight against references); fp32_precision="tf32" trades that
  for tensor-core speed.
- key_padding_mask: bool (B, Nk), True = attend. Masked and out-of-range keys score
  -inf, never 0. A query row whose keys are all masked gets output 0 and zero gradients.
- torch.compile: the forward and backward are `torch.library.triton_op`s (ldm::flash_attn_fwd,
  ldm::flash_attn_bwd); autograd is attached with `register_autograd`, so Inductor sees the
  kernels of both passes and a module calling `flash_attention` compiles without graph
  breaks. Eager calls take a plain autograd.Function around the same launchers instead
  (less host time per call; see "autograd" below).
- CPU tensors run through Triton's interpreter when TRITON_INTERPRET=1 (tests only).

Caution:
- Block sizes are fixed per (head_dim, dtype, shared memory) (no autotune). The 16-bit
  head_dim 72-128 tiles come from `python -m ldm.kernels.tune` on an H200; the others were
  chosen to fit shared memory and measured (the d=40 ones won that sweep too); head_dim
  129-256 is not yet tuned. Compiled for sm_90, 16-bit kernels use <= 128 KB of shared
  memory (the tuned d=72-128 forward; <= 96 KB elsewhere); on 99 KB parts (sm_86/sm_89)
  that forward falls back to smaller tiles, and the fp32 backward at d > 128 does not fit.
- Rows must start at multiples of 8 elements for 16-byte loads (ALIGN=8, see _align): true
  of dense (B, H, N, d) and (B, N, H, d) tensors with d % 8 == 0. Other strides work, with
  2-byte loads (the path every head_dim-40 launch took before ALIGN: 2.4x slower than d=64
  on the H200 in bf16, docs/results).
- The backward's delta = rowsum(dO * O) uses the output rounded to the input dtype, as
  FA2 does; in bf16 this makes dQ/dK a little noisier than an fp32-intermediate backward.
- No causal masking, no dropout, no additive bias, no dense (Nq, Nk) mask: only
  key padding. Grouped-query attention (Hk != Hq) is not supported.
- Under the interpreter bf16 `tl.dot` is wrong (bf16 is stored as raw uint16), so there
  the dot operands are upcast to fp32; on a GPU bf16 dots are native.
- torch.compile on CPU tensors (interpreter) cannot trace the kernels: the interpreter
  runs them eagerly on fake tensors. Compile is a GPU feature.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ldm.kernels.launch import cdiv, launchable, needs_grad, next_pow2, set_wrap_triton_enabled

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); exp2 is the cheaper instruction
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP32_PRECISIONS = ("ieee", "tf32")


# ----------------------------------------------------------------------------- tile I/O
@triton.jit
def _load_tile(ptrs, offs_r, offs_c, n_r, n_c, EVEN_R: tl.constexpr, EVEN_C: tl.constexpr):
    """Load a (R, C) tile, zero-filling rows >= n_r and columns >= n_c unless known even."""
    if EVEN_R:
        if EVEN_C:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_c[None, :] < n_c, other=0.0)
    else:
        if EVEN_C:
            x = tl.load(ptrs, mask=offs_r[:, None] < n_r, other=0.0)
        else:
            x = tl.load(ptrs, mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c), other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, offs_r, offs_c, n_r, n_c, EVEN_R: tl.constexpr, EVEN_C: tl.constexpr):
    """Store a (R, C) tile, skipping rows >= n_r and columns >= n_c unless known even."""
    if EVEN_R:
        if EVEN_C:
            tl.store(ptrs, x)
        else:
            tl.store(ptrs, x, mask=offs_c[None, :] < n_c)
    else:
        if EVEN_C:
            tl.store(ptrs, x, mask=offs_r[:, None] < n_r)
        else:
            tl.store(ptrs, x, mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c))


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST works around the interpreter's bf16 dot."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tile_ptrs(Base, off_b, off_h, offs_r, offs_d, stride_b, stride_h, stride_r, stride_d):
    """(R, D) pointers to rows offs_r of head (off_b, off_h) of a (B, H, N, d) tensor with any strides."""
    return Base + off_b * stride_b + off_h * stride_h + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d


@triton.jit
def _rows(stride_b, stride_h, stride_r, ALIGN: tl.constexpr):
    """Undo the launcher's division by ALIGN: the products tell Triton's alignment analysis that
    every row starts at a multiple of ALIGN elements, so 16-bit tiles load in 16-byte vectors
    (cp.async) even at head_dim 40, where a row stride of 40 (or a head offset of 40) is not
    one of the multiples of 16 that Triton's launcher detects by itself."""
    return stride_b * ALIGN, stride_h * ALIGN, stride_r * ALIGN


@triton.jit
def _key_bias(Mask, stride_mb, off_b, offs_n, n_k, HAS_MASK: tl.constexpr, EVEN_N: tl.constexpr):
    """(BLOCK_N,) additive score bias: 0 for keys to attend, -inf for masked or out-of-range."""
    if HAS_MASK:
        keep = tl.load(Mask + off_b * stride_mb + offs_n, mask=offs_n < n_k, other=0) != 0
    elif EVEN_N:
        keep = offs_n >= 0
    else:
        keep = offs_n < n_k
    return tl.where(keep, 0.0, float("-inf"))


# ----------------------------------------------------------------------------- forward
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out,  # (B, H, Nq, d), (B, H, Nk, d), (B, H, Nk, d), (B, H, Nq, d); any strides
    Lse,  # (B*H, Nq) fp32, natural-log log-sum-exp of the scaled scores (+inf: no key)
    Mask,  # (B, Nk) uint8 copy of the bool key padding mask, unit stride on Nk
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_mb,
    n_heads, n_q, n_k, head_dim,
    qk_scale,  # scale * log2(e): scores go straight into exp2
    HAS_MASK: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ALIGN: tl.constexpr,
):
    # Inductor passes Python floats as fp64 scalars (Triton's own launcher: fp32); fp64 would
    # promote the fp32 softmax state and fail Triton's loop-carried type check.
    qk_scale = tl.cast(qk_scale, tl.float32)
    head_dim = head_dim * ALIGN
    stride_qb, stride_qh, stride_qn = _rows(stride_qb, stride_qh, stride_qn, ALIGN)
    stride_kb, stride_kh, stride_kn = _rows(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = _rows(stride_vb, stride_vh, stride_vn, ALIGN)
    stride_ob, stride_oh, stride_on = _rows(stride_ob, stride_oh, stride_on, ALIGN)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # int64: batch offsets may pass 2^31 elements
    off_b = pid_bh // n_heads
    off_h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = _tile_ptrs(Q, off_b, off_h, offs_m, offs_d, stride_qb, stride_qh, stride_qn, stride_qd)
    # Key/value tiles of row block 0; block start_n is start_n * stride rows further.
    k_base = _tile_ptrs(K, off_b, off_h, offs_n0, offs_d, stride_kb, stride_kh, stride_kn, stride_kd)
    v_base = _tile_ptrs(V, off_b, off_h, offs_n0, offs_d, stride_vb, stride_vh, stride_vn, stride_vd)
    q = _load_tile(q_ptrs, offs_m, offs_d, n_q, head_dim, EVEN_M, EVEN_D)  # (M, D)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running row max, log2 units
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, n_k, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_base + start_n * stride_kn, offs_n, offs_d, n_k, head_dim, EVEN_N, EVEN_D)
        v = _load_tile(v_base + start_n * stride_vn, offs_n, offs_d, n_k, head_dim, EVEN_N, EVEN_D)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale  # (M, N), log2 units
        s += _key_bias(Mask, stride_mb, off_b, offs_n, n_k, HAS_MASK, EVEN_N)[None, :]
        # Online softmax (FA2 Alg. 1): rescale the old sums by exp2(m_old - m_new).
        # A row with no key yet has m = -inf; subtracting 0 instead avoids inf - inf = NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    empty = l_i == 0.0  # every key masked: output 0, lse = +inf so the backward's P is 0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
    o_ptrs = _tile_ptrs(Out, off_b, off_h, offs_m, offs_d, stride_ob, stride_oh, stride_on, stride_od)
    _store_tile(o_ptrs, out.to(Out.dtype.element_ty), offs_m, offs_d, n_q, head_dim, EVEN_M, EVEN_D)
    if EVEN_M:
        tl.store(Lse + pid_bh * n_q + offs_m, lse)
    else:
        tl.store(Lse + pid_bh * n_q + offs_m, lse, mask=offs_m < n_q)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, dOut,  # (B, H, Nq, d) each, any strides
    Delta,  # (B*H, Nq) fp32: rowsum(dO * O), the softmax-backward correction (FA2 Alg. 2 l.4)
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    n_heads, n_q, head_dim,
    EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,
):
    head_dim = head_dim * ALIGN
    stride_ob, stride_oh, stride_on = _rows(stride_ob, stride_oh, stride_on, ALIGN)
    stride_dob, stride_doh, stride_don = _rows(stride_dob, stride_doh, stride_don, ALIGN)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // n_heads
    off_h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o_ptrs = _tile_ptrs(Out, off_b, off_h, offs_m, offs_d, stride_ob, stride_oh, stride_on, stride_od)
    do_ptrs = _tile_ptrs(dOut, off_b, off_h, offs_m, offs_d, stride_dob, stride_doh, stride_don, stride_dod)
    o = _load_tile(o_ptrs, offs_m, offs_d, n_q, head_dim, EVEN_M, EVEN_D).to(tl.float32)
    do = _load_tile(do_ptrs, offs_m, offs_d, n_q, head_dim, EVEN_M, EVEN_D).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if EVEN_M:
        tl.store(Delta + pid_bh * n_q + offs_m, delta)
    else:
        tl.store(Delta + pid_bh * n_q + offs_m, delta, mask=offs_m < n_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, dOut, dK, dV,  # q/dO (B, H, Nq, d); k/v/dK/dV (B, H, Nk, d); any strides
    Lse, Delta,  # (B*H, Nq) fp32 each
    Mask,  # (B, Nk) uint8, unit stride on Nk
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb,
    n_heads, n_q, n_k, head_dim,
    scale, qk_scale,
    HAS_MASK: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ALIGN: tl.constexpr,
):
    """One program per key block: dV = P^T dO, dK = scale * dS^T Q over all query blocks."""
    scale, qk_scale = tl.cast(scale, tl.float32), tl.cast(qk_scale, tl.float32)  # fp64 under Inductor
    head_dim = head_dim * ALIGN
    stride_qb, stride_qh, stride_qn = _rows(stride_qb, stride_qh, stride_qn, ALIGN)
    stride_kb, stride_kh, stride_kn = _rows(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = _rows(stride_vb, stride_vh, stride_vn, ALIGN)
    stride_dob, stride_doh, stride_don = _rows(stride_dob, stride_doh, stride_don, ALIGN)
    stride_dkb, stride_dkh, stride_dkn = _rows(stride_dkb, stride_dkh, stride_dkn, ALIGN)
    stride_dvb, stride_dvh, stride_dvn = _rows(stride_dvb, stride_dvh, stride_dvn, ALIGN)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // n_heads
    off_h = pid_bh % n_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    k_ptrs = _tile_ptrs(K, off_b, off_h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd)
    v_ptrs = _tile_ptrs(V, off_b, off_h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd)
    k = _load_tile(k_ptrs, offs_n, offs_d, n_k, head_dim, EVEN_N, EVEN_D)  # (N, D)
    v = _load_tile(v_ptrs, offs_n, offs_d, n_k, head_dim, EVEN_N, EVEN_D)  # (N, D)
    bias = _key_bias(Mask, stride_mb, off_b, offs_n, n_k, HAS_MASK, EVEN_N)  # (N,)
    # Query/dO tiles of row block 0; block start_m is start_m * stride rows further.
    q_base = _tile_ptrs(Q, off_b, off_h, offs_m0, offs_d, stride_qb, stride_qh, stride_qn, stride_qd)
    do_base = _tile_ptrs(dOut, off_b, off_h, offs_m0, offs_d, stride_dob, stride_doh, stride_don, stride_dod)

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start_m in range(0, n_q, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_tile(q_base + start_m * stride_qn, offs_m, offs_d, n_q, head_dim, EVEN_M, EVEN_D)
        do = _load_tile(do_base + start_m * stride_don, offs_m, offs_d, n_q, head_dim, EVEN_M, EVEN_D)
        # Out-of-range query rows read lse = +inf, so their P row is exactly 0.
        if EVEN_M:
            lse = tl.load(Lse + pid_bh * n_q + offs_m)
            delta = tl.load(Delta + pid_bh * n_q + offs_m)
        else:
            lse = tl.load(Lse + pid_bh * n_q + offs_m, mask=offs_m < n_q, other=float("inf"))
            delta = tl.load(Delta + pid_bh * n_q + offs_m, mask=offs_m < n_q, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale + bias[None, :]  # (M, N), log2 units
        p = tl.math.exp2(s - lse[:, None] * 1.4426950408889634)  # recomputed softmax (M, N)
        dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)  # (M, N)
        ds = p * (dp - delta[:, None])  # softmax backward: dS = P * (dP - rowsum(dO * O))
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)
    dk *= scale

    dk_ptrs = _tile_ptrs(dK, off_b, off_h, offs_n, offs_d, stride_dkb, stride_dkh, stride_dkn, stride_dkd)
    dv_ptrs = _tile_ptrs(dV, off_b, off_h, offs_n, offs_d, stride_dvb, stride_dvh, stride_dvn, stride_dvd)
    _store_tile(dk_ptrs, dk.to(dK.dtype.element_ty), offs_n, offs_d, n_k, head_dim, EVEN_N, EVEN_D)
    _store_tile(dv_ptrs, dv.to(dV.dtype.element_ty), offs_n, offs_d, n_k, head_dim, EVEN_N, EVEN_D)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, dOut, dQ,  # q/dO/dQ (B, H, Nq, d); k/v (B, H, Nk, d); any strides
    Lse, Delta,  # (B*H, Nq) fp32 each
    Mask,  # (B, Nk) uint8, unit stride on Nk
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_mb,
    n_heads, n_q, n_k, head_dim,
    scale, qk_scale,
    HAS_MASK: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ALIGN: tl.constexpr,
):
    """One program per query block: dQ = scale * dS K over all key blocks."""
    scale, qk_scale = tl.cast(scale, tl.float32), tl.cast(qk_scale, tl.float32)  # fp64 under Inductor
    head_dim = head_dim * ALIGN
    stride_qb, stride_qh, stride_qn = _rows(stride_qb, stride_qh, stride_qn, ALIGN)
    stride_kb, stride_kh, stride_kn = _rows(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = _rows(stride_vb, stride_vh, stride_vn, ALIGN)
    stride_dob, stride_doh, stride_don = _rows(stride_dob, stride_doh, stride_don, ALIGN)
    stride_dqb, stride_dqh, stride_dqn = _rows(stride_dqb, stride_dqh, stride_dqn, ALIGN)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // n_heads
    off_h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = _tile_ptrs(Q, off_b, off_h, offs_m, offs_d, stride_qb, stride_qh, stride_qn, stride_qd)
    do_ptrs = _tile_ptrs(dOut, off_b, off_h, offs_m, offs_d, stride_dob, stride_doh, stride_don, stride_dod)
    q = _load_tile(q_ptrs, offs_m, offs_d, n_q, head_dim, EVEN_M, EVEN_D)  # (M, D)
    do = _load_tile(do_ptrs, offs_m, offs_d, n_q, head_dim, EVEN_M, EVEN_D)  # (M, D)
    if EVEN_M:
        lse = tl.load(Lse + pid_bh * n_q + offs_m)
        delta = tl.load(Delta + pid_bh * n_q + offs_m)
    else:
        lse = tl.load(Lse + pid_bh * n_q + offs_m, mask=offs_m < n_q, other=float("inf"))
        delta = tl.load(Delta + pid_bh * n_q + offs_m, mask=offs_m < n_q, other=0.0)
    lse2 = lse * 1.4426950408889634
    # Key/value tiles of row block 0; block start_n is start_n * stride rows further.
    k_base = _tile_ptrs(K, off_b, off_h, offs_n0, offs_d, stride_kb, stride_kh, stride_kn, stride_kd)
    v_base = _tile_ptrs(V, off_b, off_h, offs_n0, offs_d, stride_vb, stride_vh, stride_vn, stride_vd)

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, n_k, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_base + start_n * stride_kn, offs_n, offs_d, n_k, head_dim, EVEN_N, EVEN_D)
        v = _load_tile(v_base + start_n * stride_vn, offs_n, offs_d, n_k, head_dim, EVEN_N, EVEN_D)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale  # (M, N), log2 units
        s += _key_bias(Mask, stride_mb, off_b, offs_n, n_k, HAS_MASK, EVEN_N)[None, :]
        p = tl.math.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
    dq *= scale

    dq_ptrs = _tile_ptrs(dQ, off_b, off_h, offs_m, offs_d, stride_dqb, stride_dqh, stride_dqn, stride_dqd)
    _store_tile(dq_ptrs, dq.to(dQ.dtype.element_ty), offs_m, offs_d, n_q, head_dim, EVEN_M, EVEN_D)


# ----------------------------------------------------------------------------- launchers
def _interpreted() -> bool:
    """True when TRITON_INTERPRET=1 was set before triton was imported."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_attn_fwd_kernel, InterpretedFunction)


# Shared memory per block of sm_80/sm_90 parts (A100 163 KB, H100/H200 227 KB) versus consumer
# Ampere/Ada (99 KB): the larger tiles below only fit the former.
BIG_SMEM = 160 * 1024


@functools.lru_cache(maxsize=None)
def _smem_per_block(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 99 * 1024))


def _smem(device: torch.device) -> int:
    return _smem_per_block(device.index if device.index is not None else torch.cuda.current_device())


def _block_config(block_d: int, dtype: torch.dtype, device: torch.device, smem: int | None = None) -> dict:
    """Forward tiles: fewer keys per block as a row grows, to fit shared memory.

    The 16-bit head_dim 72-128 entry comes from `python -m ldm.kernels.tune` on an H200
    (docs/results/tune-h200-2026-11-27.json): at N=1024, d=80 fp16, 128x64 tiles, 8 warps and
    3 stages took 0.0268 ms against 0.0491 ms for the 128x32/2-stage tiles used before.
    """
    if device.type != "cuda":  # interpreter: small tiles so tests cross block edges
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=1, num_stages=1)
    row_bytes = block_d * dtype.itemsize  # one q/k/v row of the tile
    if row_bytes <= 128:  # fp16 d <= 64
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if row_bytes <= 256 and dtype.itemsize == 2:  # 16-bit d in (64, 128]: big tiles if they fit
        if (_smem(device) if smem is None else smem) >= BIG_SMEM:  # looked up only here
            return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    if row_bytes <= 256:  # fp32 d <= 64, or 16-bit d in (64, 128] on 99 KB parts
        return dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)
    if row_bytes <= 512:  # fp16 d in (128, 256], fp32 d in (64, 128]
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)  # fp32 d > 128


def _bwd_block_config(block_d: int, dtype: torch.dtype, device: torch.device,
                      smem: int | None = None) -> dict:
    """Backward tiles: two fp32 (BLOCK, D) accumulators and four input tiles, so smaller.

    16-bit head_dim 72-128: 32x64 tiles, 4 warps, from the same H200 sweep (N=1024, d=80 fp16:
    0.169 ms for the three backward kernels against 0.265 ms with 64x32 tiles and 8 warps).
    """
    if device.type != "cuda":
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=1, num_stages=1)
    row_bytes = block_d * dtype.itemsize
    if row_bytes <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if row_bytes <= 256 and dtype.itemsize == 2:
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1)
    if row_bytes <= 256:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1)
    return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1)


def _mask_arg(key_padding_mask, q):
    """The mask as uint8 with unit stride on Nk (a (B, Nk) copy: a few hundred bytes), or a
    dummy pointer. Not .view(torch.uint8): Inductor in torch 2.11 cannot lower a bool->uint8
    view (TypeError in to_dtype_bitcast, seen on an H200), which broke torch.compile."""
    if key_padding_mask is None:
        return q, 0
    m = key_padding_mask.to(torch.uint8)
    if m.stride(1) != 1:
        m = m.contiguous()
    return m, m.stride(0)


def _align(*tensors: torch.Tensor) -> int:
    """8 when every batch, head and row stride is a multiple of 8 elements, else 1.

    The kernels take those strides and head_dim (always a multiple of 8) divided by it and
    multiply back (_rows): a fact Triton cannot see by itself unless a stride is a multiple of 16.
    """
    return 8 if all(s % 8 == 0 for t in tensors for s in t.stride()[:3]) else 1


def _strides(t: torch.Tensor, align: int) -> tuple[int, int, int, int]:
    sb, sh, sr, sd = t.stride()
    return sb // align, sh // align, sr // align, sd


def _dot_flags(dtype: torch.dtype, fp32_precision: str, device: torch.device) -> dict:
    precision = fp32_precision if dtype == torch.float32 else "tf32"  # ignored for 16-bit dots
    return dict(PRECISION=precision, UPCAST=device.type != "cuda" and dtype == torch.bfloat16)


def _attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
    scale: float, fp32_precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher: returns out (B, H, Nq, d) and the fp32 log-sum-exp (B, H, Nq)."""
    B, H, n_q, d = q.shape
    n_k = k.shape[2]
    block_d = max(16, next_pow2(d))  # tl.dot needs tile sides >= 16
    cfg = _block_config(block_d, q.dtype, q.device)
    out = torch.empty_like(q)  # keeps q's dense layout, e.g. (B, N, H, d) memory order
    lse = torch.empty((B, H, n_q), device=q.device, dtype=torch.float32)
    mask, stride_mb = _mask_arg(key_padding_mask, q)
    grid = (cdiv(n_q, cfg["BLOCK_M"]), B * H)
    a = _align(q, k, v, out)
    launchable(_attn_fwd_kernel)[grid](
        q, k, v, out, lse, mask,
        *_strides(q, a), *_strides(k, a), *_strides(v, a), *_strides(out, a), stride_mb,
        H, n_q, n_k, d // a, scale * LOG2E, ALIGN=a,
        HAS_MASK=key_padding_mask is not None,
        EVEN_M=n_q % cfg["BLOCK_M"] == 0, EVEN_N=n_k % cfg["BLOCK_N"] == 0, EVEN_D=d == block_d,
        BLOCK_D=block_d, **cfg, **_dot_flags(q.dtype, fp32_precision, q.device),
    )
    return out, lse


def _attn_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, key_padding_mask: torch.Tensor | None, scale: float, fp32_precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher: delta = rowsum(dO * O), then the dK/dV pass and the dQ pass."""
    B, H, n_q, d = q.shape
    n_k = k.shape[2]
    block_d = max(16, next_pow2(d))
    cfg = _bwd_block_config(block_d, q.dtype, q.device)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    even = dict(EVEN_M=n_q % bm == 0, EVEN_N=n_k % bn == 0, EVEN_D=d == block_d)
    flags = _dot_flags(q.dtype, fp32_precision, q.device)
    mask, stride_mb = _mask_arg(key_padding_mask, q)
    delta = torch.empty((B, H, n_q), device=q.device, dtype=torch.float32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    a = _align(q, k, v, out, do, dq, dk, dv)

    launchable(_attn_bwd_preprocess_kernel)[(cdiv(n_q, bm), B * H)](
        out, do, delta, *_strides(out, a), *_strides(do, a), H, n_q, d // a,
        EVEN_M=even["EVEN_M"], EVEN_D=even["EVEN_D"], BLOCK_M=bm, BLOCK_D=block_d, ALIGN=a,
        num_warps=cfg["num_warps"],
    )
    launchable(_attn_bwd_dkdv_kernel)[(cdiv(n_k, bn), B * H)](
        q, k, v, do, dk, dv, lse, delta, mask,
        *_strides(q, a), *_strides(k, a), *_strides(v, a), *_strides(do, a), *_strides(dk, a),
        *_strides(dv, a), stride_mb,
        H, n_q, n_k, d // a, scale, scale * LOG2E, ALIGN=a,
        HAS_MASK=key_padding_mask is not None, BLOCK_D=block_d, **even, **cfg, **flags,
    )
    launchable(_attn_bwd_dq_kernel)[(cdiv(n_q, bm), B * H)](
        q, k, v, do, dq, lse, delta, mask,
        *_strides(q, a), *_strides(k, a), *_strides(v, a), *_strides(do, a), *_strides(dq, a),
        stride_mb,
        H, n_q, n_k, d // a, scale, scale * LOG2E, ALIGN=a,
        HAS_MASK=key_padding_mask is not None, BLOCK_D=block_d, **even, **cfg, **flags,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------- autograd
# Two doors to the same launchers. Under torch.compile: custom ops (triton_op), so Inductor
# sees every kernel and a module compiles without graph breaks. In eager mode: a plain
# autograd.Function, because the custom-op dispatcher and its autograd wrapper cost more host
# time per call than the kernels take at SD's smaller shapes (attention at 16x16 latents runs
# in ~30 us on an H200, see docs/results). set_wrap_triton_enabled(False) makes wrap_triton
# launch directly instead of through its higher-order-op dispatch, as triton_op itself does
# in eager mode.
_flash_attn_fwd = triton_op("ldm::flash_attn_fwd", mutates_args=())(_attn_fwd)
_flash_attn_bwd = triton_op("ldm::flash_attn_bwd", mutates_args=())(_attn_bwd)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale, fp32_precision = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.scale, ctx.fp32_precision = scale, fp32_precision


def _grads(ctx, dout, bwd):
    """(dq, dk, dv, None, None, None) from what _setup_context saved; bwd is either door's launcher."""
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = bwd(dout, q, k, v, out, lse, key_padding_mask, ctx.scale, ctx.fp32_precision)
    return dq, dk, dv, None, None, None


def _backward(ctx, dout, dlse):
    # dlse is unused: the log-sum-exp is a saved statistic, not an output anyone differentiates.
    return _grads(ctx, dout, _flash_attn_bwd)


_flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerFlashAttention(torch.autograd.Function):
    """The eager door: same launchers, saved tensors and gradients as the custom op, less host time."""

    @staticmethod
    def forward(ctx, *inputs):
        with set_wrap_triton_enabled(False):
            output = _attn_fwd(*inputs)
        _setup_context(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, dout):
        with set_wrap_triton_enabled(False):
            return _grads(ctx, dout, _attn_bwd)


# ----------------------------------------------------------------------------- public API
def _check_inputs(q, k, v, key_padding_mask, fp32_precision) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, N, d), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} dtype must be one of {DTYPES}, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    B, H, _, d = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != d or k.shape != v.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match "
                         "(B, H, Nq, d), (B, H, Nk, d), (B, H, Nk, d)")
    if d % 8 != 0 or not 8 <= d <= 256:
        raise ValueError(f"head_dim must be a multiple of 8 in [8, 256], got {d}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"key_padding_mask must be (B, Nk) = {(B, k.shape[2])}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    if q.device.type != "cuda" and not _interpreted():
        raise ValueError(f"flash_attention needs CUDA tensors (got {q.device}); "
                         "CPU tensors run only under TRITON_INTERPRET=1")


def flash_attention(q, k, v, key_padding_mask=None, scale=None, *, fp32_precision="ieee"):
    """softmax(scale * q k^T) v for q (B, H, Nq, d), k/v (B, H, Nk, d); mask (B, Nk) True = attend.

    Differentiable, deterministic in backward, traceable by torch.compile. scale defaults
    to 1/sqrt(d); fp32_precision ("ieee" or "tf32") picks the fp32 dot precision on GPUs.
    """
    _check_inputs(q, k, v, key_padding_mask, fp32_precision)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if torch.compiler.is_compiling():
        out, _ = _flash_attn_fwd(q, k, v, key_padding_mask, scale, fp32_precision)
        return out
    if not needs_grad(q, k, v):
        with set_wrap_triton_enabled(False):  # inference: no autograd node, no saved tensors
            return _attn_fwd(q, k, v, key_padding_mask, scale, fp32_precision)[0]
    return _EagerFlashAttention.apply(q, k, v, key_padding_mask, scale, fp32_precision)


def attention_reference(q, k, v, key_padding_mask=None, scale=None):
    """Plain PyTorch attention in fp32 (inputs upcast), returned in the input dtype.

    Rows with every key masked return 0, matching `flash_attention`.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale  # (B, H, Nq, Nk)
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all -inf rows give NaN: define them as 0
    return torch.einsum("bhqk,bhkd->bhqd", p, v.float()).to(q.dtype)
