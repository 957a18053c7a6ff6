"""What torch.compile needs from our Triton kernels, checked without a GPU.

1. Each kernel writes only its outputs. Inductor decides which tensors a `wrap_triton` kernel mutates by reading the kernel's TTIR
(torch._higher_order_ops.triton_kernel_wrap). If it thinks an input such as GroupNorm's
weight is written, AOTAutograd copies the "mutation" back into that parameter and the
compile fails with "a leaf Variable that requires grad is being used in an in-place
operation" (seen on an H200 with torch 2.11).
2. Each kernel compiles when its float scalars arrive as fp64, which is how Inductor types
Python floats in a user-defined kernel's signature (Triton's own launcher says fp32). An
fp64 softmax scale promoted the fp32 running max and failed Triton's loop-carried type
check (seen on the same H200).

Both need only Triton's front end and ptxas, so this runs on a CPU: a subprocess without
the interpreter, a pretend sm_90 target, and the launchers run with their launches
recorded instead of executed.
"""
import json
import os
import subprocess
import sys

import pytest

_ANALYSE = r"""
import json, torch, triton
from triton.backends.compiler import GPUTarget
from torch._higher_order_ops import triton_kernel_wrap as tkw
import ldm.kernels.attention as A
import ldm.kernels.group_norm as G

class Sm90:  # Triton's front end only asks for the target; no GPU is touched
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_current_device(self): return 0
    def get_current_stream(self, *a): return 0
    def get_device_capability(self, *a): return (9, 0)
    def get_active_torch_device(self): return torch.device("cpu")
triton.runtime.driver.set_active(Sm90())

launches = []
class Record:
    def __init__(self, kernel): self.kernel = kernel
    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))
A.launchable = G.launchable = Record

g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 2, n, 40, generator=g) for n in (65, 77, 77))
mask = torch.rand(2, 77, generator=g) > 0.3
out, lse = torch.randn_like(q), torch.randn(2, 2, 65)
A._flash_attn_fwd(q, k, v, mask, 0.15, "ieee")
A._flash_attn_bwd(torch.randn_like(q), q, k, v, out, lse, mask, 0.15, "ieee")
x = torch.randn(2, 64, 8, 8, generator=g)
w, b = torch.rand(64, generator=g), torch.rand(64, generator=g)
mean, rstd = torch.randn(2, 8), torch.rand(2, 8)
G._group_norm_fwd(x, w, b, 8, 1e-5, True, 528, G.MAX_TILE)
G._group_norm_bwd(torch.randn_like(x), x, w, b, mean, rstd, 8, True, 528, G.MAX_TILE)

from triton.compiler import ASTSource
TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.uint8: "*u8"}
OPTIONS = ("num_warps", "num_stages")
written, compiled = {}, {}
for kernel, args, kwargs in launches:
    named = dict(zip(kernel.arg_names, args), **{k: v for k, v in kwargs.items() if k not in OPTIONS})
    if hasattr(tkw, "identify_accessed_tensors"):
        acc = tkw.identify_accessed_tensors(kernel, named, {})
        written[kernel.__name__] = sorted(dep.name for dep in acc.read_writes.writes)
    sig, consts = {}, {}
    for p in kernel.params:
        value = named[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", value
        else:  # Inductor's typing of a user kernel's runtime arguments
            sig[p.name] = (TYPES[value.dtype] if isinstance(value, torch.Tensor) else
                           "fp64" if isinstance(value, float) else "i32")
    opts = {k: kwargs[k] for k in OPTIONS if k in kwargs}
    try:
        triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32), options=opts)
        compiled[kernel.__name__] = "ok"
    except Exception as err:
        compiled[kernel.__name__] = f"{type(err).__name__}: {str(err)[-300:]}"
print(json.dumps(dict(written=written, compiled=compiled)))
"""

EXPECTED = {
    "_attn_fwd_kernel": ["Lse", "Out"],
    "_attn_bwd_preprocess_kernel": ["Delta"],
    "_attn_bwd_dkdv_kernel": ["dK", "dV"],
    "_attn_bwd_dq_kernel": ["dQ"],
    "_gn_stats_kernel": ["cnt_ptr", "m2_ptr", "mean_ptr"],
    "_gn_forward_kernel": ["mean_ptr", "rstd_ptr", "y_ptr"],
    "_gn_backward_partials_kernel": ["db_ptr", "dw_ptr", "s1_ptr", "s2_ptr"],
    "_gn_backward_dx_kernel": ["dx_ptr"],
}


@pytest.fixture(scope="module")
def recorded():
    """{written: kernel -> tensors it writes, compiled: kernel -> "ok" or the error}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _ANALYSE], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "assuming every input is mutated" not in done.stderr, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernels_write_only_their_outputs(recorded):
    from torch._higher_order_ops import triton_kernel_wrap

    if not hasattr(triton_kernel_wrap, "identify_accessed_tensors"):
        pytest.skip("this torch names its Triton mutation analysis differently")
    assert recorded["written"] == EXPECTED


def test_kernels_compile_with_fp64_scalars(recorded):
    assert recorded["compiled"] == {name: "ok" for name in EXPECTED}
