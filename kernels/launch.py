"""How the launchers in attention.py and group_norm.py reach Triton.

Each op has two doors to the same launchers: a `torch.library.triton_op` for torch.compile
(Inductor must see every kernel, so launches go through `wrap_triton`) and a plain
autograd.Function for eager calls. In the eager door wrapping is switched off
(`set_wrap_triton_enabled(False)`, as triton_op does internally in eager mode) and `launchable`
hands back a direct launcher of the kernel instead (_Direct below): wrap_triton's checks (on
older torch its higher-order-op dispatch) and Triton's per-call bookkeeping cost host time on
every launch, which at SD shapes is more than the kernel's GPU time.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.library import wrap_triton

try:
    from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled
except ImportError:  # older torch: every launch goes through wrap_triton, just slower
    from contextlib import nullcontext as set_wrap_triton_enabled

    def is_wrap_triton_enabled() -> bool:
        return True

__all__ = ["cdiv", "launchable", "needs_grad", "next_pow2", "set_wrap_triton_enabled"]


def needs_grad(*tensors) -> bool:
    """False when an eager call can skip autograd: grad mode off, or no input (None allowed) needs it."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def launchable(kernel):
    """wrap_triton(kernel) where a tracer must see the launch, else a direct launcher for it."""
    if is_wrap_triton_enabled():
        return wrap_triton(kernel)
    direct = _DIRECT.get(kernel)
    if direct is None:
        direct = _DIRECT[kernel] = _Direct(kernel) if _direct_supported(kernel) else kernel
    return direct


# ----------------------------------------------------------------------------- direct launch
# Triton's JITFunction.run redoes, on every call, the work of its first call: bind the
# arguments, specialize each one (dtype, 16-byte alignment, integer divisibility), hash a cache
# key, look the compiled kernel up, check globals, read its knobs. For our launchers that is
# ~20 us of a 35-50 us call (python -m ldm.kernels.hostbench). _Direct keeps, per exact call
# (every int and float value, each tensor's dtype and alignment, the options), the compiled
# kernel that Triton's own path returned the first time, and then issues the same
# `kernel.run(...)` call JITFunction.run makes (Triton >= 3.4's form), with the same argument
# values in signature order. tests/kernels/test_launch.py checks the two paths hand the driver
# identical arguments. LDM_DIRECT_LAUNCH=0 switches it off.
_DIRECT: dict = {}


def _direct_supported(kernel) -> bool:
    if os.environ.get("LDM_DIRECT_LAUNCH", "1") == "0":
        return False
    try:
        from triton import knobs  # noqa: F401  (3.4+: the launch hooks live in knobs.runtime)
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    return type(kernel) is JITFunction  # not the interpreter's InterpretedFunction


class _Direct:
    """kernel[grid](*args, **kwargs) as Triton launches it, minus the per-call bookkeeping."""

    def __init__(self, kernel):
        from triton import knobs
        from triton.runtime.driver import driver

        self.kernel, self.knobs, self.driver, self.cache = kernel, knobs, driver, {}
        self.params = list(kernel.signature.parameters.values())

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        device = self.driver.active.get_current_device()
        # What Triton specializes on, per argument: a tensor's dtype and 16-byte alignment, any
        # other value itself (with its type, so True and 1 differ). Inline: this runs per launch.
        key = (device, len(args),
               *[(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, Tensor) else
                 a if type(a) is int else (type(a), a) for a in args],
               *[(k, (v.dtype, v.data_ptr() % 16 == 0) if isinstance(v, Tensor) else
                  v if type(v) is int else (type(v), v)) for k, v in kwargs.items()])
        hit = self.cache.get(key)
        if hit is None:  # Triton's own path: compiles (or finds) the kernel and launches it
            if len(self.cache) >= 4096:  # shapes keep changing: stay bounded (Triton keeps the binaries)
                self.cache.clear()
            compiled = self.kernel[grid](*args, **kwargs)
            self.cache[key] = (compiled, self._plan(len(args), kwargs))
            return
        compiled, plan = hit
        values = [args[x] if k == 0 else kwargs[x] if k == 1 else x for k, x in plan]
        grid = tuple(grid) + (1,) * (3 - len(grid))
        stream = self.driver.active.get_current_stream(device)
        runtime = self.knobs.runtime
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata(grid, stream, *values),
                     runtime.launch_enter_hook, runtime.launch_exit_hook, *values)

    def _plan(self, n_args, kwargs):
        """Where each parameter's value comes from: (0, position) | (1, keyword) | (2, default)."""
        plan = []
        for i, p in enumerate(self.params):
            plan.append((0, i) if i < n_args else (1, p.name) if p.name in kwargs else (2, p.default))
        return tuple(plan)


# Plain-Python twins of triton.cdiv / triton.next_power_of_2 for the launchers: in recent Triton
# those are constexpr functions whose host-side call unwraps every argument (several us each,
# measured with cProfile on the CPU dev machine), and launchers call them on every launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1
