"""The one dispatch front for the U-Net's and the autoencoder's hot ops.

Every model in `ldm` calls `attention` and `group_norm` from here and nothing else;
the backend is picked per call:
- "auto": our Triton kernels on CUDA when they support the inputs, else PyTorch
  (SDPA for attention, F.group_norm for GroupNorm); always PyTorch on CPU.
- "triton": our kernels (ldm.kernels.attention / ldm.kernels.group_norm). CPU tensors run
  through Triton's interpreter, which needs TRITON_INTERPRET=1 set before triton is imported.
- "sdpa": F.scaled_dot_product_attention (GroupNorm has no SDPA: it takes the PyTorch path).
- "xformers": xformers.ops.memory_efficient_attention (`pip install .[gpu]`); GroupNorm
  takes the PyTorch path.
- "torch": explicit PyTorch math (fp32 softmax attention; F.group_norm + F.silu).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

flash_attention = fused_group_norm = interpreted = None   # ldm.kernels' entry points, once imported
_TRITON_ERROR: ImportError | None = None


def _load_kernels() -> None:
    """Import our Triton kernels, once. triton is a Linux-only dependency: without it the PyTorch
    paths stay importable and backend='triton' names the import error."""
    global flash_attention, fused_group_norm, interpreted, _TRITON_ERROR
    if flash_attention is not None or _TRITON_ERROR is not None:
        return
    try:
        from ldm.kernels.attention import flash_attention
        from ldm.kernels.group_norm import fused_group_norm, interpreted
    except ImportError as err:  # pragma: no cover - exercised only where triton is missing
        _TRITON_ERROR = err


# Where the kernels can run (CUDA, or Triton's interpreter) they load now, so "auto" and torch.compile
# see them from the first call; elsewhere only backend="triton" loads them. Triton and the kernels'
# torch.library registration pull in torch._inductor: ~1.5 s of a CPU txt2img's start-up.
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    _load_kernels()

BACKENDS = ("auto", "triton", "sdpa", "xformers", "torch")
ACTIVATIONS = (None, "silu")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_triton(device: torch.device) -> None:
    """Raise a clear error when the Triton backend cannot run on this device."""
    _load_kernels()
    if _TRITON_ERROR is not None:
        raise RuntimeError(f"backend='triton' needs the triton package: {_TRITON_ERROR}")
    if device.type == "cuda":
        return
    if not interpreted():
        raise RuntimeError(
            f"backend='triton' got {device.type} tensors: use a CUDA device, or set "
            "TRITON_INTERPRET=1 in the environment before triton is imported to run the "
            "kernels in Triton's (slow) CPU interpreter")


# ----------------------------------------------------------------------------- attention
def _check_attention(q, k, v, key_padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, N, d), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    B, H, _, d = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != d or k.shape != v.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         "(B, H, Nq, d), (B, H, Nk, d), (B, H, Nk, d)")
    if key_padding_mask is not None:
        expected = (B, k.shape[2])
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != expected:
            raise ValueError(f"key_padding_mask must be bool {expected} (True = attend), got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def _flash_supports(q) -> bool:
    d = q.shape[-1]
    return q.dtype in TRITON_DTYPES and d % 8 == 0 and 8 <= d <= 256


def _attention_math(q, k, v, key_padding_mask, scale):
    """softmax(q k^T * scale) v in fp32; rows with every key masked return 0."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # an all -inf row softmaxes to NaN
    return (p @ v.float()).to(q.dtype)


def _attention_sdpa(q, k, v, key_padding_mask, scale):
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _attention_xformers(q, k, v, key_padding_mask, scale):
    try:
        import xformers.ops as xops
    except ImportError as err:
        raise ImportError("backend='xformers' needs xformers: install it with "
                          f"`pip install .[gpu]` (or pick another backend); {err}") from err
    B, H, n_q, _ = q.shape
    n_k = k.shape[2]
    bias = None
    if key_padding_mask is not None:
        # xformers wants an additive (B, H, Nq, Nk) bias whose storage rows are 8-aligned.
        storage = q.new_zeros(B, H, n_q, (n_k + 7) // 8 * 8)
        bias = storage[..., :n_k].masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    # xformers layout is (B, N, H, d): transposed views, no copies.
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=bias, scale=scale)
    return out.transpose(1, 2)  # (B, H, Nq, d)


def attention(q, k, v, *, key_padding_mask=None, scale=None, backend="auto"):
    """softmax(q k^T * scale) v for q (B, H, Nq, d), k and v (B, H, Nk, d).

    key_padding_mask: optional bool (B, Nk), True = attend. Returns (B, H, Nq, d).
    """
    _check_backend(backend)
    _check_attention(q, k, v, key_padding_mask)
    if backend == "auto":
        backend = "triton" if q.is_cuda and flash_attention is not None and _flash_supports(q) else "sdpa"
    if backend == "triton":
        _check_triton(q.device)
        return flash_attention(q, k, v, key_padding_mask, scale)
    if backend == "sdpa":
        return _attention_sdpa(q, k, v, key_padding_mask, scale)
    if backend == "xformers":
        return _attention_xformers(q, k, v, key_padding_mask, scale)
    return _attention_math(q, k, v, key_padding_mask, scale)


# ----------------------------------------------------------------------------- group norm
def _check_group_norm(x, num_groups, weight, bias, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() < 2:
        raise ValueError(f"x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    c = x.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise ValueError(f"num_groups={num_groups!r} must be a positive divisor of C={c}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"{name} must have shape ({c},), got {tuple(t.shape)}")


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, backend="auto"):
    """GroupNorm over (C/G, H, W) per sample and group, then an optional activation."""
    _check_backend(backend)
    _check_group_norm(x, num_groups, weight, bias, activation)
    if backend == "auto":
        use_triton = x.is_cuda and fused_group_norm is not None and x.dtype in TRITON_DTYPES
        backend = "triton" if use_triton else "torch"
    if backend == "triton":
        _check_triton(x.device)
        return fused_group_norm(x, num_groups, weight, bias, eps, activation)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    # In place when autograd does not need y (inference): y is our own fresh tensor, and on a
    # CPU the extra allocation + memory pass was a tenth of the shapes64 decoder's time.
    return F.silu(y, inplace=not y.requires_grad) if activation == "silu" else y
