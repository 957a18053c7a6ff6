"""Host time per eager call of our kernels, measured on a CPU: no GPU needed.

    python -m ldm.kernels.hostbench [--out FILE.json] [--reps N]

On the SD-1.5 U-Net at batch 2 the GPU work of most attention and GroupNorm calls is 10-50 us
(H200, docs/results), so what an eager model pays per call is mostly Python: our checks, the
autograd door, allocation and Triton's launcher. This runs the real launch path (Triton's JIT
binding, specialization and cache lookup, compiled for a pretend sm_90) with CPU tensors of SD
shapes, and stubs only the final driver call, so it isolates exactly the host time a GPU run
would add. It replaces Triton's active driver and CompiledKernel's loader: run it as its own
process (never inside one that uses a GPU). Needs Triton's CUDA compiler (ptxas), as the
sm_90 compile tests do. Figures depend on the CPU: compare runs on the same machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

# (label, B, H, Nq, Nk, d): SD-1.5 self- and cross-attention at its largest and smallest levels
ATTN_CASES = [("self N=4096 d=40", 2, 8, 4096, 4096, 40), ("cross N=64 d=160", 2, 8, 64, 77, 160)]
GN_CASES = [("C=320 64x64", (2, 320, 64, 64)), ("C=1280 8x8", (2, 1280, 8, 8))]


def _pretend_sm90():
    """Make Triton compile for sm_90 and treat every launch as done, without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import CompiledKernel

    class Sm90Driver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, *_):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    def load_nothing(self):  # the launcher and module a GPU would load: a no-op launch instead
        self._run = lambda *args: None
        self.module = self.function = 0

    triton.runtime.driver.set_active(Sm90Driver())
    CompiledKernel._init_handles = load_nothing


def _patch_for_cpu(A, G):
    """Our launchers, on CPU tensors, as they run on an H100/H200."""
    A._interpreted = lambda: True  # lets CPU tensors past the device check
    G.interpreted = lambda: True
    fwd, bwd = A._block_config, A._bwd_block_config
    cuda = torch.device("cuda")
    A._block_config = lambda bd, dt, device, smem=None: fwd(bd, dt, cuda, 227 * 1024)
    A._bwd_block_config = lambda bd, dt, device, smem=None: bwd(bd, dt, cuda, 227 * 1024)
    G.default_target_programs = lambda device: 4 * 132  # H100 SXM: 132 SMs


def _reuse_cpu_memory():
    """Keep glibc from mmap/munmap-ing every multi-MB CPU buffer: the GPU's caching allocator
    reuses its blocks, and page-mapping system calls are not a host cost a GPU run pays."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: and keep freed heap memory for reuse
    except (OSError, AttributeError):  # not glibc: allocation cost stays in the figures
        pass


def _time_us(fn, reps: int) -> float:
    for _ in range(5):  # compile (first call) and warm caches
        fn()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(times)


def cases(A, G, dtype):
    """(op, case, direction, fn) for every measured call."""
    out = []
    for label, b, h, n_q, n_k, d in ATTN_CASES:
        q = torch.randn(b, h, n_q, d, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(b, h, n_k, d, dtype=dtype, requires_grad=True) for _ in range(2))
        dout = torch.randn_like(q)

        def fwd(q=q, k=k, v=v):
            with torch.no_grad():
                A.flash_attention(q, k, v)

        def fwd_bwd(q=q, k=k, v=v, dout=dout):
            torch.autograd.grad(A.flash_attention(q, k, v), (q, k, v), dout)
        out += [("attention", label, "fwd (no grad)", fwd), ("attention", label, "fwd+bwd", fwd_bwd)]
    for label, shape in GN_CASES:
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        w, bias = (torch.rand(shape[1], dtype=dtype, requires_grad=True) for _ in range(2))
        dy = torch.randn_like(x)

        def gn_fwd(x=x, w=w, bias=bias):
            with torch.no_grad():
                G.fused_group_norm(x, 32, w, bias, activation="silu")

        def gn_fwd_bwd(x=x, w=w, bias=bias, dy=dy):
            y = G.fused_group_norm(x, 32, w, bias, activation="silu")
            torch.autograd.grad(y, (x, w, bias), dy)
        out += [("group_norm", label, "fwd (no grad)", gn_fwd), ("group_norm", label, "fwd+bwd", gn_fwd_bwd)]
    return out


def pytorch_cases():
    """PyTorch's own calls at tiny CPU shapes, for scale: their compute is a few hundred flops, so the
    time is mostly dispatch, the part of diffusers' eager GroupNorm+SiLU and SDPA that costs host time."""
    import torch.nn.functional as F
    x, w, b = torch.randn(2, 320, 1, 1), torch.rand(320), torch.rand(320)
    q = torch.randn(2, 8, 1, 40)

    def gn_silu():
        with torch.no_grad():
            F.silu(F.group_norm(x, 32, w, b), inplace=True)

    def sdpa():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, q, q)
    return [("pytorch", "F.group_norm + F.silu, 2x320x1x1", "fwd (no grad)", gn_silu),
            ("pytorch", "F.scaled_dot_product_attention, N=1", "fwd (no grad)", sdpa)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--reps", type=int, default=200, help="calls per timing (7 timings, median)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: this measures the compiled launch path, not the interpreter")
    _pretend_sm90()
    import triton

    from ldm.kernels import attention as A
    from ldm.kernels import group_norm as G

    _patch_for_cpu(A, G)
    _reuse_cpu_memory()
    torch.set_num_threads(1)
    rows = []
    for op, case, direction, fn in cases(A, G, torch.float16) + pytorch_cases():
        us = _time_us(fn, args.reps if direction.startswith("fwd (") else max(1, args.reps // 4))
        rows.append(dict(op=op, case=case, dtype="fp32" if op == "pytorch" else "fp16", direction=direction,
                         host_us=us))
        print(f"{op:<11} {case:<18} {direction:<14} {us:8.1f} us/call", flush=True)
    report = dict(cpu=platform.processor() or platform.machine(), python=platform.python_version(),
                  torch=torch.__version__, triton=triton.__version__,
                  command=" ".join(["python", "-m", "ldm.kernels.hostbench", *argv]),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  note="host time per call, launches stubbed; CPU-dependent", results=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
