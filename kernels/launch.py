"""How the launchers in attention.py and group_norm.py reach Triton.

Each op has two doors to the same launchers: a `torch.library.triton_op` for torch.compile
(Inductor must see every kernel, so launches go through `wrap_triton`) and a plain
autograd.Function for eager calls. In the eager door wrapping is switched off
(`set_wrap_triton_enabled(False)`, as triton_op does internally in eager mode) and `launchable`
hands back the kernel itself: wrap_triton's checks, and on older torch its higher-order-op
dispatch, cost host time on every launch, which at SD shapes is larger than the kernel.
"""
from __future__ import annotations

from torch.library import wrap_triton

try:
    from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled
except ImportError:  # older torch: every launch goes through wrap_triton, just slower
    from contextlib import nullcontext as set_wrap_triton_enabled

    def is_wrap_triton_enabled() -> bool:
        return True

__all__ = ["cdiv", "launchable", "next_pow2", "set_wrap_triton_enabled"]


def launchable(kernel):
    """wrap_triton(kernel) where a tracer must see the launch, else the kernel itself."""
    return wrap_triton(kernel) if is_wrap_triton_enabled() else kernel


# Plain-Python twins of triton.cdiv / triton.next_power_of_2 for the launchers: in recent Triton
# those are constexpr functions whose host-side call unwraps every argument (several us each,
# measured with cProfile on the CPU dev machine), and launchers call them on every launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1
