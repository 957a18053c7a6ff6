"""LyCORIS's LoHa, LoKr and DoRA updates, as LoRA files for SD 1.x/2.x, SDXL, SD3 and FLUX.1 carry them: kohya's
module keys (`lora_unet_<module>`, `lora_te_`, `lora_te1_`, `lora_te2_`, ldm.models.lora's naming) ending in these
factors. On a fused module (FLUX.1's img_attn.qkv, our q, k, v) dW is built whole, then cut by rows (`fused_deltas`).

    LoHa   dW = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / r,  r = hada_w1_b's rows:
           the Hadamard product of two rank-r matrices reaches rank r^2 (FedPara, Hyeon-Woo et al. 2022).
           Conv kernels: w1_b / w2_b flattened (r, in*kh*kw), or Tucker cores hada_t1 / hada_t2 (r, r, kh, kw)
           with w*_a (r, out), w*_b (r, in): each factor is the core times w*_a and w*_b on its first two modes.
    LoKr   dW = W1 kron W2 * alpha / r (Yeh et al. 2024, "Navigating text-to-image customization: from LyCORIS
           fine-tuning to model evaluation"), W1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, W2 = lokr_w2 or
           lokr_w2_a @ lokr_w2_b or the Tucker core lokr_t2 with lokr_w2_a (r, b), lokr_w2_b (r, d);
           r = the rank of the factored W2, else of the factored W1; both full: scale 1, the file's alpha unused.
           Conv kernels: W2 a kernel (b, d, kh, kw) (W1's entries scale whole kernels), or W2 flattened
           (b, d*kh*kw), whose kron is the same numbers as the kernel's once reshaped.
    No `.alpha` key: scale 1 (kohya's LoRA likewise defaults alpha to r).
    DoRA   `.dora_scale` m beside a LoRA's, LoHa's or LoKr's factors: W' = m (W + dW) / ||W + dW|| (Liu et al. 2024,
           eq. 5), the norm per output row (m (out, 1[, 1, 1]) or (out,): LyCORIS's wd_on_out, peft's layout) or per
           input column (m (1, in[, 1, 1]): LyCORIS's older default), as m's shape says (`Decomposed`).
These scale rules are LyCORIS's own (lycoris/modules/loha.py, lokr.py) and ComfyUI's and A1111's loaders'.
peft's LoKr scales by alpha / r even with both factors full (its r, which such a file does not carry; LyCORIS
writes alpha = its r there, so that its own scale is 1 too).

Caution (DoRA): a :SCALE s gives W + s (W' - W), ComfyUI's strength (the base at 0, the paper's W' at 1); LyCORIS's
own multiplier instead scales m / ||W + dW|| - 1, and peft's scales dW inside the norm: the three agree at s = 1
only. ComfyUI divides by ||W|| instead of ||W + dW|| for an output-row m; here both axes follow the paper, as
LyCORIS and peft do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
KEYS = LOHA_KEYS + LOKR_KEYS
DORA_KEY = "dora_scale"                                # DoRA's magnitude m, beside any of the three


def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """core (r1, r2, kh, kw) with a (r1, out) on mode 1 and b (r2, in) on mode 2 -> (out, in, kh, kw)."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, a, b)


def loha_product(f: dict[str, torch.Tensor]) -> torch.Tensor:
    """(w1a w1b) * (w2a w2b) elementwise, each side rebuilt from its Tucker core where the file has one."""
    sides = [tucker(f[f"hada_t{i}"], f[f"hada_w{i}_a"], f[f"hada_w{i}_b"]) if f"hada_t{i}" in f
             else f[f"hada_w{i}_a"] @ f[f"hada_w{i}_b"] for i in (1, 2)]
    return sides[0] * sides[1]


def lokr_product(f: dict[str, torch.Tensor]) -> torch.Tensor:
    """kron(W1, W2), W1 / W2 full or rebuilt from their low-rank (or Tucker) factors."""
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in f else tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"]) \
        if "lokr_t2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]                      # (a, c, 1, 1): each W1 entry scales a whole W2 kernel
    return torch.kron(w1, w2.contiguous())              # kron views its inputs: an einsum's result may not be


def missing_factors(kind: str, names) -> list[str]:
    """The factors a LoHa / LoKr module lacks, given the ones it has (empty: complete)."""
    have = set(names)
    if kind == "LoHa":
        need = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        if have & {"hada_t1", "hada_t2"}:
            need += ["hada_t1", "hada_t2"]               # Tucker: both sides or neither
        return [n for n in need if n not in have]
    out = [] if "lokr_w1" in have else [n for n in ("lokr_w1_a", "lokr_w1_b") if n not in have]
    return out + ([] if "lokr_w2" in have else [n for n in ("lokr_w2_a", "lokr_w2_b") if n not in have])


def rank(kind: str, f: dict[str, torch.Tensor]) -> int | None:
    """The r of alpha / r: LoHa's w1_b rows; LoKr's factored W2's, else factored W1's; None if both full."""
    if kind == "LoHa":
        return f["hada_w1_b"].shape[0]
    b = f.get("lokr_w2_b", f.get("lokr_w1_b"))
    return None if b is None else b.shape[0]


@dataclass
class Factored:
    """One module's LoHa or LoKr update: weight += scale * dW(factors), reshaped to the weight's shape."""
    kind: str                          # "LoHa" or "LoKr"
    factors: dict[str, torch.Tensor]   # the file's key ends (hada_w1_a, lokr_w2, ...) -> tensors
    scale: float                       # alpha / r (1 without alpha, or LoKr with both factors full)
    key: str = ""                      # the file's module key (lora_unet_...), for messages

    def _named(self) -> str:
        return ", ".join(f"{self.key}.{k} {tuple(v.shape)}" for k, v in self.factors.items())

    def delta(self, shape: torch.Size) -> torch.Tensor:
        f = {k: v.float() for k, v in self.factors.items()}
        try:
            dw = loha_product(f) if self.kind == "LoHa" else lokr_product(f)
        except RuntimeError as err:                    # inner sizes that do not multiply
            raise ValueError(f"{self.kind} factors {self._named()} do not combine ({err})") from None
        if dw.shape[0] != shape[0] or dw[0].numel() != math.prod(shape[1:]):
            raise ValueError(f"{self.kind} factors {self._named()} make a {tuple(dw.shape)} update, which does "
                             f"not fit a weight of shape {tuple(shape)}")
        return dw.reshape(shape) * self.scale


def factored(factors: dict[str, torch.Tensor], alpha: float | None, key: str) -> Factored:
    """A module's LoHa or LoKr factors (key end -> tensor) and its `.alpha` (None if absent) -> its update."""
    kinds = {"LoHa" if k in LOHA_KEYS else "LoKr" for k in factors}
    if len(kinds) > 1:
        raise ValueError(f"{key} has both LoHa (hada_) and LoKr (lokr_) factors")
    kind = kinds.pop()
    lacking = missing_factors(kind, factors)
    if lacking:
        raise ValueError(f"{kind} module {key} has no {', '.join(lacking)}")
    r = rank(kind, factors)
    return Factored(kind, dict(factors), 1.0 if alpha is None or r is None else alpha / r, key)


def norm_axis(magnitude: torch.Tensor, shape: torch.Size) -> int:
    """DoRA's m for a weight of `shape`: 0 if it holds one magnitude per output row, 1 if per input column."""
    out, inp = shape[0], shape[1]
    if magnitude.numel() == out and (magnitude.dim() == 1 or magnitude.shape[0] == out):
        return 0
    if magnitude.numel() == inp and magnitude.dim() > 1 and magnitude.shape[0] == 1 and magnitude.shape[1] == inp:
        return 1
    raise ValueError(f"dora_scale {tuple(magnitude.shape)} is neither one magnitude per output row ({out}, 1) nor "
                     f"per input column (1, {inp}) of a weight of shape {tuple(shape)}")


def decompose(weight: torch.Tensor, magnitude: torch.Tensor, axis: int) -> torch.Tensor:
    """m * W / ||W||: each output row (axis 0) or input column (axis 1) of W rescaled to its magnitude in m."""
    dims = tuple(d for d in range(weight.dim()) if d != axis)
    norm = torch.linalg.vector_norm(weight, dim=dims, keepdim=True)   # (out, 1, ...) or (1, in, ...)
    return weight * (magnitude.float().reshape(norm.shape) / (norm + torch.finfo(weight.dtype).eps))


@dataclass
class Decomposed:
    """DoRA around a LoRA / LoHa / LoKr update: weight -> m (weight + dW) / ||weight + dW|| (Liu et al. 2024, eq. 5)."""
    inner: object              # lora.Update or Factored: dW
    magnitude: torch.Tensor    # m: (out, 1[, 1, 1]) / (out,) per output row, or (1, in[, 1, 1]) per input column
    key: str = ""              # the file's module key, for messages

    def delta(self, shape: torch.Size, weight: torch.Tensor | None = None) -> torch.Tensor:
        """W' - W for the weight W (float32); without it, the shapes checked and dW returned."""
        dw = self.inner.delta(shape)
        try:
            axis = norm_axis(self.magnitude, shape)
        except ValueError as err:
            raise ValueError(f"{self.key}.{err}") from None
        if weight is None:
            return dw
        return decompose(weight + dw.to(weight.device), self.magnitude.to(weight.device), axis) - weight


def swap_halves(rows: torch.Tensor) -> torch.Tensor:
    """The two halves of the rows exchanged ((shift, scale) <-> (scale, shift)); its own inverse."""
    return torch.cat(rows.chunk(2)[::-1])


def fused_deltas(update, weights: list, swap: bool = False) -> list:
    """W' - W (float32) for each row block of one fused weight that `update` covers whole (FLUX.1's qkv as our q,
    k, v), the blocks stacked in `weights`' order; a part the model drops (None) gets None, as tall as the first
    block. swap: the file's fused weight holds the stack's two halves exchanged. dW is built for the whole fused
    weight and then cut by rows, which is exact for any update; DoRA's norms are taken on the fused W + dW."""
    present = next(w for w in weights if w is not None)
    rows = [present.shape[0] if w is None else w.shape[0] for w in weights]
    shape = torch.Size((sum(rows), *present.shape[1:]))
    if not isinstance(update, Decomposed):
        dw = update.delta(shape)
    else:
        if None in weights and norm_axis(update.magnitude, shape) == 1:   # a column's norm needs every row
            raise ValueError(f"{update.key}: a DoRA magnitude per input column needs the whole fused weight, "
                             "and this model drops a part of it")
        fused = present.float() if len(weights) == 1 else \
            torch.cat([torch.zeros(r, *shape[1:], device=present.device) if w is None else w.float()
                       for w, r in zip(weights, rows)])              # a dropped part's rows: unused (row norms)
        dw = update.delta(shape, swap_halves(fused) if swap else fused)
    dw = swap_halves(dw) if swap else dw
    return [None if w is None else d for w, d in zip(weights, dw.split(rows))]
