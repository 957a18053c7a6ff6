"""Suite-wide setup: Triton's interpreter on machines without CUDA.

TRITON_INTERPRET must be set before triton is imported anywhere (triton.jit reads it
when a kernel is decorated), so it lives here, in the root conftest, which pytest
loads before collecting any test module.
"""
import os

try:  # torch is cheap to ask; triton itself is not imported here.
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch missing means nothing else runs either
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
