"""Run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET is read when `@triton.jit` decorates a kernel, so it must be set here,
at conftest import time, before any test module imports triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
