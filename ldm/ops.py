"""The one dispatch front for the U-Net's and the autoencoder's hot ops.

Every model in `ldm` calls `attention` and `group_norm` from here and nothing else;
the backend is picked per call: "auto" takes our Triton kernels on CUDA and PyTorch
on CPU. "triton" on CPU tensors runs through Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "sdpa", "xformers", "torch")
ACTIVATIONS = (None, "silu")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def attention(q, k, v, *, key_padding_mask=None, scale=None, backend="auto"):
    """softmax(q k^T * scale) v for q (B, H, Nq, d), k and v (B, H, Nk, d).

    key_padding_mask: optional bool (B, Nk), True = attend. Returns (B, H, Nq, d).
    """
    _check_backend(backend)
    if backend in ("auto", "sdpa", "torch"):
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    raise NotImplementedError(f"attention backend {backend!r} is not wired yet")


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, backend="auto"):
    """GroupNorm over (C/G, H, W) per sample and group, then an optional activation."""
    _check_backend(backend)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if backend in ("auto", "torch", "sdpa"):
        y = F.group_norm(x, num_groups, weight, bias, eps)
        return F.silu(y) if activation == "silu" else y
    raise NotImplementedError(f"group_norm backend {backend!r} is not wired yet")
