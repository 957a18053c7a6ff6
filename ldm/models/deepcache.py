"""DeepCache (Ma, Fang, Wang, CVPR 2024, "DeepCache: Accelerating Diffusion Models for Free"), training-free.

A U-Net's skip branch m joins encoder block D_m to decoder block U_m: U_m takes Concat(D_m(.), U_{m+1}(.))
(their Sec. 3). Adjacent steps' deep features U_{m+1}(.) barely change, so a full call caches
F_cache = U_{m+1}(.) and the next calls of the run compute only D_1..D_m and U_m..U_1 on their own input,
U_m taking Concat(D_m(x_{t-1}), F_cache); a full call every N ("1:N inference", uniform).

Branches here are the U-Net's skips (`UNet.skip_channels`), counted from conv_in's output (0, the shallowest:
the most saved) as the released code's (block, layer) pairs count them; the cached feature is the h that enters
the decoder ResBlock taking that skip (after the level's upsampler when that block opens a level).

Steps are counted as U-Net calls (`DeepCache.reuse`): a call is full when calls % N == 0, so a sampler with two
calls a step (heun, dpm_2, dpmpp_2s_ancestral, dpmpp_sde) refreshes every N calls, not every N steps. CFG, PAG,
InstructPix2Pix and MultiDiffusion windows batch their parts into one call, so one cache covers them. A call whose
input differs in shape, dtype or device from the cached one (the batch halving outside a guidance interval, a new
image size) runs in full and caches afresh. `TextToImage.sample` resets the cache at the start and end of a run.

Caution: the cached feature is reused whatever the call's t, text or control; that is the method's approximation.
Only the uniform 1:N strategy: the paper's non-uniform one (full steps denser around a chosen step) is not
here. On the shapes64 teacher, DeepCache matched, not beat, plain sampling at fewer steps of equal FLOPs
(docs/eval/deepcache/report.md).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class DeepCache:
    """Options and the per-run cache of one U-Net: a full call every `interval` calls, reuse at skip `branch`."""

    def __init__(self, interval: int, branch: int = 0):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"DeepCache interval N must be an integer >= 1 (1: every call full, off), got {interval!r}")
        if isinstance(branch, bool) or not isinstance(branch, int) or branch < 0:
            raise ValueError(f"DeepCache branch must be an integer >= 0 (0: conv_in's skip), got {branch!r}")
        self.interval, self.branch = interval, branch
        self.reset()

    def reset(self) -> None:
        """Forget the cached feature and restart the call count: the next call is full."""
        self.calls, self.feature, self.key = 0, None, None

    def check(self, skips: int) -> None:
        """ValueError unless `branch` names one of a U-Net's `skips` skip connections."""
        if self.branch >= skips:
            raise ValueError(f"DeepCache branch {self.branch}: this U-Net has {skips} skip branches, 0..{skips - 1}")

    def reuse(self, x: torch.Tensor) -> bool:
        """Whether this call (input x) takes the cached feature; counts the call. Full at calls 0, N, 2N, ...
        and whenever no feature was cached for an input like x."""
        full = self.calls % self.interval == 0 or self.feature is None or self.key != _key(x)
        self.calls += 1
        return not full

    def store(self, x: torch.Tensor, feature: torch.Tensor) -> None:
        """Keep a full call's deep feature F_cache = U_{m+1}(.) for the calls after it (input x)."""
        self.feature, self.key = feature.detach(), _key(x)

    def __repr__(self) -> str:
        return f"DeepCache(interval={self.interval}, branch={self.branch})"


def _key(x: torch.Tensor) -> tuple:
    return tuple(x.shape), x.dtype, x.device


@contextmanager
def fresh_caches(unets):
    """Within it, each U-Net's DeepCache (if any) starts empty, and none keeps a feature after: one sampling run."""
    caches = [u.deepcache for u in unets if getattr(u, "deepcache", None) is not None]
    for cache in caches:
        cache.reset()
    try:
        yield
    finally:
        for cache in caches:
            cache.reset()


def skipped_fraction(unet, x: torch.Tensor, t, context: torch.Tensor, branch: int, **kwargs) -> float:
    """The fraction of a full U-Net call's FLOPs (torch's FLOP counter: matmuls and convolutions) that a call
    reusing skip `branch`'s cache does not run, measured on the given inputs; load-independent."""
    from torch.utils.flop_counter import FlopCounterMode
    saved, unet.deepcache = unet.deepcache, DeepCache(2, branch)
    try:
        flops = []
        with torch.no_grad():
            for _ in range(2):                   # call 0 full (fills the cache), call 1 reuses it
                with FlopCounterMode(display=False) as counter:
                    unet(x, t, context, **kwargs)
                flops.append(counter.get_total_flops())
    finally:
        unet.deepcache = saved
    return 1.0 - flops[1] / flops[0]
